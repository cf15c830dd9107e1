"""The mitmproxy addon: asks the shared engine at CONNECT, at the TLS ClientHello and per request, and checks the
address at the moment of connecting.

Every name a flow carries is decided: the CONNECT target, the TLS name (SNI), the request line and the Host header
must all be the same host, or the request is refused (421). The connection to the server is then opened only to an
address this addon resolved and judged (`server_connect`): not the server itself, not the school network (unless
listed in `server.proxy.internal_hosts`), not a listed resolver's address — whatever name led there. Any exception
in a hook blocks the flow (fail closed).

Most HTTPS is passed through undecrypted (`ignore_connection`): every allowed host that has no URL rule, no
safe-search rewrite and no portal redirect — so certificate-pinned apps keep working and the proxy stays cheap.
Only what needs it is intercepted: hosts with URL rules, search and video hosts under safe search, and blocked
hosts (to show the block page rather than a TLS error).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import socket
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime

from mitmproxy import connection, http, tls
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from blocklists.errors import NameRejected
from blocklists.names import normalize_host as _normalize_host
from blocklists.names import normalize_path, parent_domains, parse_ip
from filter_proxy.block_page import BlockPageFacts, CategoryText, preferred_language, render
from filter_proxy.client_hello import State, read_client_hello
from filter_proxy.pac import is_pac_request, pac_response
from filter_proxy.rewrite import enforce_safe_search, portal_redirect
from policy.clients import Client
from policy.decision import Action, Decision, Query, Reason
from policy.destination import decide_destination, port_allowed
from policy.engine import decide, next_allowed
from policy.metrics import (
    BLOCK_PAGES,
    PAC_SERVED,
    PROXY_DESTINATIONS_REFUSED,
    PROXY_ERRORS,
    PROXY_REQUESTS,
    PROXY_TLS,
)
from policy.model import IPAddress, PacMode, PortRange
from policy.proxy_scope import ProxyScope, hosts_for_proxy
from policy.snapshot import Snapshot
from policy.state import StateView

log = logging.getLogger(__name__)

REALM = "Vigie"
MAX_DECISIONS = 65_536  # host decisions kept (see `_decide`); past that the cache starts again


@dataclass(frozen=True)
class KnownConnection:
    """Who is on a client connection, identified once per rules generation (a reload may move a device), with
    the credentials it gave and the host its CONNECT asked for."""

    client: Client
    generation: int
    credentials: str | None
    connect_host: str | None


@dataclass(frozen=True)
class Pinned:
    """A server connection opened to `address`, the judged resolution of `name`."""

    name: str
    address: str


@functools.lru_cache(maxsize=16384)
def normalize_host(raw: str) -> str | None:
    """A request's host as the engine wants it (addresses in canonical form, whatever their spelling); None when
    it is not a host. Memoised: the same few thousand hosts come back all day."""
    try:
        return _normalize_host(raw)
    except NameRejected:
        return None


class VigieAddon:
    def __init__(self, snapshot: Callable[[], Snapshot], state: Callable[[], StateView], *,
                 count_minute: Callable[[str], None] = lambda device: None, block_page_for_https: bool = True,
                 own_addresses: Collection[IPAddress] = frozenset(),
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._snapshot = snapshot
        self._state = state
        self._count_minute = count_minute  # the device's current minute counts as screen time
        self._now = now
        self.block_page_for_https = block_page_for_https
        self._own_addresses = frozenset(own_addresses)
        self._connections: dict[str, KnownConnection] = {}
        self._pinned: dict[str, Pinned] = {}  # by server connection id
        self._pac_scopes: dict[tuple[int, str], ProxyScope] = {}  # (rules generation, group) → selective PAC
        self._decided: dict[tuple[str, str | None, str, bool, str], Decision] = {}  # see `_decide`
        self._decided_with: tuple[Snapshot | None, StateView | None] = (None, None)

    # -- hooks: each one fails closed ------------------------------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> None:
        try:
            self._http_connect(flow)
        except Exception as exc:
            _failed("http_connect", exc)
            flow.response = http.Response.make(403, b"blocked by Vigie: the filter could not decide\n")

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        try:
            self._tls_clienthello(data)
        except Exception as exc:
            _failed("tls_clienthello", exc)
            data.ignore_connection = False  # intercepted: every request is decided (and blocked) on its own

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        try:
            self._requestheaders(flow)
        except Exception as exc:
            _failed("requestheaders", exc)
            flow.response = _engine_error_page()

    async def server_connect(self, data: ServerConnectionHookData) -> None:
        try:
            await self._server_connect(data)
        except Exception as exc:
            _failed("server_connect", exc)
            data.server.error = "blocked by Vigie: the filter could not check the destination"

    def server_connected(self, data: ServerConnectionHookData) -> None:
        pinned = self._pinned.get(data.server.id)
        if pinned is not None and data.server.address is not None:
            # The socket is connected to the judged address; the name comes back so that mitmproxy finds this
            # connection again for the next request naming it (it matches connections by address). Its guard
            # against changing an open connection's address is for addons that would move a live connection.
            object.__setattr__(data.server, "address", (pinned.name, data.server.address[1]))

    def server_disconnected(self, data: ServerConnectionHookData) -> None:
        self._pinned.pop(data.server.id, None)

    def server_connect_error(self, data: ServerConnectionHookData) -> None:
        self._pinned.pop(data.server.id, None)

    def client_disconnected(self, client: connection.Client) -> None:
        self._connections.pop(client.id, None)

    # -- what each hook does -------------------------------------------------------------------------------------

    def _http_connect(self, flow: http.HTTPFlow) -> None:
        snapshot = self._snapshot()
        host = normalize_host(flow.request.host)
        client = self._client_of(flow, snapshot, connect_host=host)
        if client is None:
            return
        if host is None:
            flow.response = http.Response.make(400, b"not a host name\n")
            return
        reach = snapshot.rules.server.proxy_reach
        if not port_allowed(flow.request.port, reach.connect_ports, reach):
            flow.response = self._refused_port(flow, snapshot, client, host, "connect_ports")
            return
        decision = self._decide(client, host, snapshot)
        if decision.action is Action.BLOCK and not self.block_page_for_https:
            # No page can be shown: refuse the tunnel.
            PROXY_REQUESTS.labels(*decision.labels).inc()
            flow.response = http.Response.make(403, f"blocked by Vigie: {decision.explanation}\n".encode())

    def _tls_clienthello(self, data: tls.ClientHelloData) -> None:
        snapshot = self._snapshot()
        known = self._connections.get(data.context.client.id)
        client, _ = self._identify(snapshot, data.context.client.peername[0], known.credentials if known else None)
        connect_host = known.connect_host if known else None
        # The front's reader, not mitmproxy's `sni`: that reads a TLS name that is no host name (`roblox.com:443`,
        # two names) as none, and a server might read a host in it.
        hello = read_client_hello(data.client_hello.raw_bytes(wrap_in_record=True))
        raw_sni = hello.server_name
        sni = normalize_host(raw_sni) if raw_sni else None
        host = sni or connect_host
        if host is None and data.context.server.address:
            host = normalize_host(str(data.context.server.address[0]))
        if client is None or host is None or hello.state is not State.READ or (raw_sni and sni is None) \
                or (connect_host and sni and sni != connect_host):
            # Unknown client, a ClientHello the reader refuses, a TLS name that is no host name, or one that differs
            # from the CONNECT target: intercepted, and the request hook refuses it with an explanation.
            PROXY_TLS.labels("intercept").inc()
            return
        decision = self._decide(client, host, snapshot)
        if decision.action is Action.ALLOW and not self._needs_inspection(host, decision, snapshot):
            data.ignore_connection = True
            PROXY_TLS.labels("passthrough").inc()
        else:
            PROXY_TLS.labels("intercept").inc()

    def _requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        if is_pac_request(flow):
            flow.response = self._pac(flow)
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
        at = self._now()
        reach = snapshot.rules.server.proxy_reach
        if flow.request.scheme == "http" and not _transparent(flow) and \
                not port_allowed(flow.request.port, reach.http_ports, reach):
            decision = self._port_decision(snapshot, client, host, flow.request.port, "http_ports")
            self._block(flow, host, decision, snapshot, at)
            return
        query = _request_query(client, flow.request.scheme, host, flow.request.path, at)
        decision = self._counted(decide(query, snapshot, self._state()))
        PROXY_REQUESTS.labels(*decision.labels).inc()
        if decision.action in (Action.BLOCK, Action.REFUSE):
            self._block(flow, host, decision, snapshot, at, query=query)
            return
        for opened_for in self._names_of_connection(flow):
            other = normalize_host(opened_for)
            if other == host:
                continue
            # Domain fronting: a harmless name in the TLS handshake, the CONNECT or the request line, another in
            # the Host header; the server reached would be the one, the page asked for the other. The other name
            # blocked shows its block page; both allowed still ends here, with 421, which also makes a browser
            # that merely reused a connection retry on a new one.
            if other is not None:
                other_decision = self._decide(client, other, snapshot)
                if other_decision.action in (Action.BLOCK, Action.REFUSE):
                    self._block(flow, other, other_decision, snapshot, at, query=Query(client, other, at))
                    return
            decision = Decision(Action.BLOCK, Reason.BYPASS,
                                f"request for {host} on a connection opened for {opened_for}",
                                group=client.group, device=client.device, rule="domain-fronting")
            self._block(flow, host, decision, snapshot, at, status=421)
            return
        if decision.profile is not None:
            self._rewrite(flow, host, decision, snapshot)

    async def _server_connect(self, data: ServerConnectionHookData) -> None:
        """Resolve the server's name once, judge every address it has, and connect to a judged one only."""
        if data.server.address is None or data.server.error:
            return
        name, port = data.server.address
        snapshot = self._snapshot()
        known = self._connections.get(data.client.id)
        client, _ = self._identify(snapshot, data.client.peername[0], known.credentials if known else None)
        if client is None:
            self._refuse_destination(data, "unknown_client", "this device is not allowed to use the Vigie proxy")
            return
        literal = parse_ip(name)
        if literal is not None:
            addresses: list[IPAddress] = [literal]
        else:
            try:
                # AI_ADDRCONFIG: no IPv6 address when this host has no IPv6 route (the connection tries one only).
                found = await asyncio.get_running_loop().getaddrinfo(
                    name, port, type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG)
            except OSError as exc:
                self._refuse_destination(data, "unresolved", f"{name} does not resolve ({exc.strerror or exc})")
                return
            addresses = [a for a in (parse_ip(str(info[4][0])) for info in found) if a is not None]
            if not addresses:
                self._refuse_destination(data, "unresolved", f"{name} has no address")
                return
        at = self._now()
        for address in addresses:  # every address: a name with one good and one internal address is refused
            refused = decide_destination(client, address, port, at, snapshot, self._own_addresses)
            if refused is not None:
                PROXY_REQUESTS.labels(*refused.labels).inc()
                why = "deny_networks" if refused.rule == "server.proxy.deny_networks" else "address_list"
                self._refuse_destination(data, why, f"{name}: {refused.explanation}")
                return
        judged = str(addresses[0])
        if judged != name:  # a name, or an address spelled another way: connect to what was judged
            self._pinned[data.server.id] = Pinned(name, judged)
            data.server.address = (judged, port)

    def _names_of_connection(self, flow: http.HTTPFlow) -> list[str]:
        """The names a request's connection was opened for, beside its Host header: the TLS name (SNI), and the
        request line's or CONNECT's host (not in transparent mode, where that is an address). Each must be the
        Host header's host."""
        names = []
        sni = flow.client_conn.sni
        if flow.request.scheme == "https" and sni:
            names.append(sni)
        destination = self._destination(flow)
        if destination is not None:
            names.append(destination)
        return names

    @staticmethod
    def _refuse_destination(data: ServerConnectionHookData, why: str, explanation: str) -> None:
        PROXY_DESTINATIONS_REFUSED.labels(why).inc()
        data.server.error = f"blocked by Vigie: {explanation}"

    @staticmethod
    def _port_decision(snapshot: Snapshot, client: Client, host: str, port: int, setting: str) -> Decision:
        reach = snapshot.rules.server.proxy_reach
        ports = ", ".join(str(r) for r in getattr(reach, setting))
        explanation = f"port {port} of {host} is not in server.proxy.{setting} ({ports})"
        return Decision(Action.BLOCK, Reason.DESTINATION, explanation, group=client.group, device=client.device,
                        rule=f"server.proxy.{setting}", trail=(explanation,))

    def _refused_port(self, flow: http.HTTPFlow, snapshot: Snapshot, client: Client, host: str,
                      setting: str) -> http.Response:
        decision = self._port_decision(snapshot, client, host, flow.request.port, setting)
        PROXY_REQUESTS.labels(*decision.labels).inc()
        return http.Response.make(403, f"blocked by Vigie: {decision.explanation}\n".encode())

    def _destination(self, flow: http.HTTPFlow) -> str | None:
        """The host the proxy will connect to, when the client named it (absolute-form request line, CONNECT);
        None in transparent mode, where the destination is an address and the Host header the only name."""
        if _transparent(flow) or flow.request.host_header is None:
            return None
        pinned = self._pinned.get(flow.server_conn.id)
        if pinned is not None and flow.request.host == pinned.address:
            return pinned.name  # a request read while its tunnel's connection was being opened to the address
        return flow.request.host

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

    def snapshot(self) -> Snapshot:
        return self._snapshot()

    def tunnel_passes_through(self, address: str, host: str, port: int, snapshot: Snapshot) -> bool:
        """Whether a CONNECT to `host:port` from `address` without proxy credentials is passed through
        undecrypted when its TLS name is `host` or none: what `http_connect` and `tls_clienthello` decide for such
        a tunnel (a known client, a port CONNECT may name, allowed, nothing to inspect)."""
        client = self._client_at(snapshot, address, port, snapshot.rules.server.proxy_reach.connect_ports)
        if client is None:
            return False
        decision = self._decide(client, host, snapshot)
        return decision.action is Action.ALLOW and not self._needs_inspection(host, decision, snapshot)

    def _client_at(self, snapshot: Snapshot, address: str, port: int,
                   ports: tuple[PortRange, ...]) -> Client | None:
        """The client at `address`, without proxy credentials, when it may name `port` (one of `ports`)."""
        client, _ = self._identify(snapshot, address, None)
        reach = snapshot.rules.server.proxy_reach
        return client if client is not None and port_allowed(port, ports, reach) else None

    def _decide(self, client: Client, host: str, snapshot: Snapshot) -> Decision:
        """The decision for a host (no path), kept until its `until` for the rules and state it was taken with, as
        the DNS front keeps its verdicts: a page opens many connections to the same hosts."""
        state = self._state()
        if self._decided_with[0] is not snapshot or self._decided_with[1] is not state:
            self._decided.clear()  # the cache holds both: their ids cannot be reused meanwhile
            self._decided_with = (snapshot, state)
        at = self._now()
        key = (client.group, client.device, client.matched_by, client.known, host)
        decision = self._decided.get(key)
        if decision is None or (decision.until is not None and at >= decision.until):
            decision = decide(Query(client, host, at), snapshot, state)
            if len(self._decided) >= MAX_DECISIONS:
                self._decided.clear()
            self._decided[key] = decision
        return self._counted(decision)

    def _counted(self, decision: Decision) -> Decision:
        if decision.counts_screen_time and decision.device is not None:
            self._count_minute(decision.device)
        return decision

    def _pac(self, flow: http.HTTPFlow) -> http.Response:
        """The PAC for the client's group. A PAC that fails to load makes browsers go DIRECT, unfiltered: on any
        error, the one that sends every request to the proxy."""
        try:
            return self._pac_for_group(flow)
        except Exception as exc:
            _failed("pac", exc, "the PAC sends everything to the proxy")
            return pac_response(flow, (), None, "fallback")

    def _pac_for_group(self, flow: http.HTTPFlow) -> http.Response:
        """Selective when the client's group (or the server) says so; every request through the proxy for a client
        the address does not place in a group."""
        snapshot = self._snapshot()
        settings = snapshot.rules.server
        proxies = tuple(str(address) for address in settings.pac_proxies)
        client = snapshot.identify(flow.client_conn.peername[0])
        group = snapshot.rules.groups.get(client.group) if client is not None and client.known else None
        mode = (group.pac or settings.proxy_pac) if group is not None else PacMode.ALL
        scope = None
        if group is not None and mode is PacMode.SELECTIVE:
            key = (snapshot.generation, group.name)
            scope = self._pac_scopes.get(key)
            if scope is None:
                if any(generation != snapshot.generation for generation, _ in self._pac_scopes):
                    self._pac_scopes.clear()
                scope = self._pac_scopes[key] = hosts_for_proxy(snapshot, group.name)
        return pac_response(flow, proxies, scope, f"{snapshot.generation}-{mode.value}")

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
               status: int = 403, query: Query | None = None) -> None:
        """Answer with the block page; `query`, when the block may end, to say when the site really opens."""
        body, headers = self.block_page(host, decision, snapshot, at, flow.request.headers.get("Accept-Language"),
                                        query)
        flow.response = http.Response.make(status, body, headers)

    def block_page(self, host: str, decision: Decision, snapshot: Snapshot, at: datetime,
                   accept_language: str | None, query: Query | None = None) -> tuple[bytes, dict[str, str]]:
        """The block page (body, headers) in the browser's language, counted in `vigie_block_pages_total`."""
        local = at.astimezone(snapshot.clock.zone)
        opens_at = next_allowed(query, snapshot, self._state()) if query is not None else None
        profile = snapshot.profiles.get(decision.profile or "")
        categories = tuple(
            CategoryText(ref, (info.titles if info else {}), (info.descriptions if info else {}))
            for ref in decision.lists for info in (snapshot.lists.info.get(ref),)
        ) or tuple(CategoryText(name, {}, {}) for name in decision.categories)
        facts = BlockPageFacts(host, decision, categories, local, profile.profile.message if profile else None,
                               snapshot.generation, opens_at)
        language = preferred_language(accept_language)
        BLOCK_PAGES.labels(decision.reason.value).inc()
        return render(facts, language), {
            "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store", "Content-Language": language}

    def plain_request(self, address: str, host: str, port: int,
                      raw_path: str) -> tuple[Decision, Query, Snapshot] | None:
        """What `requestheaders` decides for a plain HTTP GET of `http://host:port<raw_path>` from `address`, without
        proxy credentials and with `host` in its Host header, when it would either answer with the block page (the
        decision is a block) or send the request on unchanged (an allow): the decision (counted), its query and
        snapshot. None when anything else would happen (a rewrite or portal redirect, a port to refuse, no client):
        mitmproxy then takes the request and decides it itself, so nothing is counted here."""
        snapshot = self._snapshot()
        client = self._client_at(snapshot, address, port, snapshot.rules.server.proxy_reach.http_ports)
        if client is None:
            return None
        query = _request_query(client, "http", host, raw_path, self._now())
        decision = decide(query, snapshot, self._state())
        if decision.action is Action.ALLOW and host in snapshot.safe_search:
            return None  # `_rewrite` may redirect it to the portal
        if decision.action not in (Action.BLOCK, Action.REFUSE, Action.ALLOW):
            return None
        PROXY_REQUESTS.labels(*self._counted(decision).labels).inc()
        return decision, query, snapshot


def _request_query(client: Client, scheme: str, host: str, raw_path: str, at: datetime) -> Query:
    """What the engine is asked for a request. URL rules see the path as a server reads it: `/%61dult`, `//adult`
    and `/x/../adult` are `/adult`."""
    path = normalize_path(raw_path)
    return Query(client, host, at, path, f"{scheme}://{host}{path}")


def _transparent(flow: http.HTTPFlow) -> bool:
    return flow.client_conn.proxy_mode.type_name == "transparent"


def _failed(hook: str, exc: Exception, outcome: str = "the flow is blocked") -> None:
    PROXY_ERRORS.labels(hook).inc()
    log.error("proxy %s failed, %s: %s: %s", hook, outcome, type(exc).__name__, exc)


def _engine_error_page() -> http.Response:
    return http.Response.make(403, "<!DOCTYPE html><html lang=\"fr\"><meta charset=\"utf-8\"><title>Site bloqué"
                              "</title><p>Le filtre n'a pas pu vérifier ce site : il reste bloqué par prudence.</p>"
                              "<p>The filter could not check this site, so it stays blocked.</p></html>".encode(),
                              {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"})


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
