"""The mitmproxy addon: asks the shared engine at CONNECT, at the TLS ClientHello and per request, and acts.

Most HTTPS is passed through undecrypted (`ignore_connection`): every allowed host that has no URL rule, no
safe-search rewrite and no portal redirect — so certificate-pinned apps keep working and the proxy stays cheap.
Only what needs it is intercepted: hosts with URL rules, search and video hosts under safe search, and blocked
hosts (to show the block page rather than a TLS error).
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from mitmproxy import connection, http, tls

from blocklists.errors import NameRejected
from blocklists.names import ip_literal, normalize_domain, normalize_path, parent_domains
from filter_proxy.block_page import BlockPageFacts, CategoryText, preferred_language, render
from filter_proxy.pac import is_pac_request, pac_response
from filter_proxy.rewrite import enforce_safe_search, portal_redirect
from policy.clients import Client
from policy.decision import Action, Decision, Query, Reason
from policy.engine import decide
from policy.metrics import BLOCK_PAGES, PAC_SERVED, PROXY_REQUESTS, PROXY_TLS
from policy.snapshot import Snapshot
from policy.state import StateView

log = logging.getLogger(__name__)

REALM = "Vigie"
_TLS_PORTS = (443, 8443)


@dataclass(frozen=True)
class KnownConnection:
    """Who is on a client connection, identified once per rules generation (a reload may move a device), with
    the credentials it gave and the host its CONNECT asked for."""

    client: Client
    generation: int
    credentials: str | None
    connect_host: str | None


@functools.lru_cache(maxsize=16384)
def normalize_host(raw: str) -> str | None:
    """A request's host as the engine wants it (IP literals in canonical form); None when it is not a host.
    Memoised: the same few thousand hosts come back all day."""
    literal = ip_literal(raw)
    if literal is not None:
        return literal
    try:
        return normalize_domain(raw)
    except NameRejected:
        return None


class VigieAddon:
    def __init__(self, snapshot: Callable[[], Snapshot], state: Callable[[], StateView], *,
                 count_minute: Callable[[str], None] = lambda device: None, block_page_for_https: bool = True,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._snapshot = snapshot
        self._state = state
        self._count_minute = count_minute  # the device's current minute counts as screen time
        self._now = now
        self.block_page_for_https = block_page_for_https
        self._connections: dict[str, KnownConnection] = {}

    # -- hooks ---------------------------------------------------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> None:
        snapshot = self._snapshot()
        host = normalize_host(flow.request.host)
        client = self._client_of(flow, snapshot, connect_host=host)
        if client is None:
            return
        if host is None:
            flow.response = http.Response.make(400, b"not a host name\n")
            return
        decision = self._decide(client, host, snapshot)
        if decision.action is Action.BLOCK and (not self.block_page_for_https or
                                                 flow.request.port not in (*_TLS_PORTS, 80)):
            # No page can be shown (the option is off, or the port carries no web traffic): refuse the tunnel.
            PROXY_REQUESTS.labels(*decision.labels).inc()
            flow.response = http.Response.make(403, f"blocked by Vigie: {decision.explanation}\n".encode())

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        snapshot = self._snapshot()
        known = self._connections.get(data.context.client.id)
        client, _ = self._identify(snapshot, data.context.client.peername[0], known.credentials if known else None)
        connect_host = known.connect_host if known else None
        sni = normalize_host(data.client_hello.sni) if data.client_hello.sni else None
        host = sni or connect_host
        if host is None and data.context.server.address:
            host = ip_literal(str(data.context.server.address[0]))
        if client is None or host is None or (connect_host and sni and sni != connect_host):
            PROXY_TLS.labels("intercept").inc()  # the request hook refuses it with an explanation
            return
        decision = self._decide(client, host, snapshot)
        if decision.action is Action.ALLOW and not self._needs_inspection(host, decision, snapshot):
            data.ignore_connection = True
            PROXY_TLS.labels("passthrough").inc()
        else:
            PROXY_TLS.labels("intercept").inc()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        if is_pac_request(flow):
            flow.response = pac_response(flow)
            PAC_SERVED.inc()
            return
        snapshot = self._snapshot()
        client = self._client_of(flow, snapshot)
        if client is None:
            return
        flow.request.headers.pop("Proxy-Authorization", None)
        host = normalize_host(_host_without_port(flow.request.host_header or flow.request.host))
        if host is None:
            flow.response = http.Response.make(400, b"not a host name\n")
            return
        sni = flow.client_conn.sni
        at = self._now()
        opened_for = sni if flow.request.scheme == "https" and sni else self._destination(flow)
        if opened_for is not None and normalize_host(opened_for) != host:
            # Domain fronting: a harmless name in the TLS handshake (or the request line, or the CONNECT), another
            # in the Host header; the server reached would be the one, the page asked for the other. 421 also
            # makes a browser that merely reused a connection retry on a new one.
            decision = Decision(Action.BLOCK, Reason.BYPASS,
                                f"request for {host} on a connection opened for {opened_for}",
                                group=client.group, device=client.device, rule="domain-fronting")
            self._block(flow, host, decision, snapshot, at, status=421)
            return
        # URL rules see the path as a server reads it: `/%61dult`, `//adult` and `/x/../adult` are `/adult`.
        path = normalize_path(flow.request.path)
        url = f"{flow.request.scheme}://{host}{path}"
        decision = self._counted(decide(Query(client, host, at, path, url), snapshot, self._state()))
        PROXY_REQUESTS.labels(*decision.labels).inc()
        if decision.action in (Action.BLOCK, Action.REFUSE):
            self._block(flow, host, decision, snapshot, at)
        elif decision.profile is not None:
            self._rewrite(flow, host, decision, snapshot)

    @staticmethod
    def _destination(flow: http.HTTPFlow) -> str | None:
        """The host the proxy will connect to, when the client named it (absolute-form request line, CONNECT);
        None in transparent mode, where the destination is an address and the Host header the only name."""
        if flow.client_conn.proxy_mode.type_name == "transparent" or flow.request.host_header is None:
            return None
        return flow.request.host

    def client_disconnected(self, client: connection.Client) -> None:
        self._connections.pop(client.id, None)

    # -- steps ---------------------------------------------------------------------------------------------------

    def _client_of(self, flow: http.HTTPFlow, snapshot: Snapshot, connect_host: str | None = None) -> Client | None:
        """The client of a flow: remembered for its connection, else by proxy credentials or address. Sets a 407
        or 403 response and returns None when the client may not use the proxy."""
        connection_id = flow.client_conn.id
        known = self._connections.get(connection_id)
        credentials = flow.request.headers.get("Proxy-Authorization")
        if known and known.generation == snapshot.generation and credentials in (None, known.credentials):
            return known.client
        credentials = credentials or (known.credentials if known else None)
        client, refusal = self._identify(snapshot, flow.client_conn.peername[0], credentials)
        if client is None:
            flow.response = refusal
            return None
        self._connections[connection_id] = KnownConnection(
            client, snapshot.generation, credentials, connect_host or (known.connect_host if known else None))
        return client

    @staticmethod
    def _identify(snapshot: Snapshot, address: str,
                  credentials: str | None) -> tuple[Client | None, http.Response | None]:
        """(client, None), or (None, the 407 or 403 to answer)."""
        if credentials is not None:
            client = _client_by_credentials(credentials, snapshot)
            return (client, None) if client else (None, _ask_credentials(b"wrong proxy user or password\n"))
        client = snapshot.identify(address)
        if client is not None and client.known:
            return client, None
        if snapshot.clients.has_credentials:
            return None, _ask_credentials(b"this proxy needs the device's user and password\n")
        if client is not None:
            return client, None  # the rules' default group for unknown devices
        return None, http.Response.make(403, b"this device is not allowed to use the Vigie proxy\n")

    def _decide(self, client: Client, host: str, snapshot: Snapshot) -> Decision:
        return self._counted(decide(Query(client, host, self._now()), snapshot, self._state()))

    def _counted(self, decision: Decision) -> Decision:
        if decision.counts_screen_time and decision.device is not None:
            self._count_minute(decision.device)
        return decision

    @staticmethod
    def _needs_inspection(host: str, decision: Decision, snapshot: Snapshot) -> bool:
        """Whether requests to an allowed `host` must be seen: URL rules, or a portal redirect."""
        if snapshot.lists.urls.has_host(host):
            return True
        profile = snapshot.profiles[decision.profile] if decision.profile else None
        if profile is None:
            return False
        if profile.profile.search_portal and host in snapshot.safe_search:
            return True
        suffixes = parent_domains(host)
        return any(suffix in profile.allow_urls or suffix in profile.deny_urls for suffix in suffixes)

    def _rewrite(self, flow: http.HTTPFlow, host: str, decision: Decision, snapshot: Snapshot) -> None:
        target = snapshot.safe_search.get(host)
        if target is None or decision.profile is None:
            return
        profile = snapshot.profiles[decision.profile].profile
        if profile.search_portal and profile.search_portal != host:
            redirect = portal_redirect(flow.request, target.provider, profile.search_portal)
            if redirect is not None:
                flow.response = redirect
                return
        if decision.action is Action.REWRITE:
            enforce_safe_search(flow.request, target.provider, profile.safe_search)

    def _block(self, flow: http.HTTPFlow, host: str, decision: Decision, snapshot: Snapshot, at: datetime,
               status: int = 403) -> None:
        local = at.astimezone(snapshot.clock.zone)
        profile = snapshot.profiles.get(decision.profile or "")
        categories = tuple(
            CategoryText(ref, (info.titles if info else {}), (info.descriptions if info else {}))
            for ref in decision.lists for info in (snapshot.lists.info.get(ref),)
        ) or tuple(CategoryText(name, {}, {}) for name in decision.categories)
        facts = BlockPageFacts(host, decision, categories, local, profile.profile.message if profile else None,
                               snapshot.generation)
        language = preferred_language(flow.request.headers.get("Accept-Language"))
        flow.response = http.Response.make(status, render(facts, language), {
            "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store", "Content-Language": language})
        BLOCK_PAGES.labels(decision.reason.value).inc()


def _host_without_port(authority: str) -> str:
    """`example.fr:8080` → `example.fr`, `[2001:db8::1]:443` → `2001:db8::1`; the Host header as the client sent it."""
    if authority.startswith("["):
        return authority[1:].partition("]")[0]
    host, colon, port = authority.rpartition(":")
    return host if colon and port.isdigit() and ":" not in host else authority


def _client_by_credentials(header: str, snapshot: Snapshot) -> Client | None:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return snapshot.clients.identify_credential(user, password)


def _ask_credentials(body: bytes) -> http.Response:
    return http.Response.make(407, body, {"Proxy-Authenticate": f'Basic realm="{REALM}"'})
