"""The bypass matrix: what an inventive child might try, one line per attempt, against a running `vigie dns` (with
`dig`) and a running `vigie proxy` (with `curl` and raw sockets), each line stating the expected outcome.

docs/reliability.md lists the same lines."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dnslib import EDNS0, DNSRecord

from tests.conftest import REPO, free_port, write_tree
from tests.dns_servers import UpstreamServer, VigieProcess, dig
from tests.proxy_servers import Origin, ProxyProcess, curl

FILES = {
    "rules.yaml": """
        timezone: Europe/Paris
        lists:
          games: {source: games.txt, format: domains}
          pages: {source: pages.txt, format: urls}
          vpn: {source: vpn.txt, format: domains}
        categories:
          games: [games]
          pages: [pages]
          bypass: [vigie/dns-bypass, vpn]
        always_block: [bypass]
        server:
          proxy:
            # Every high port open to CONNECT, so that the address check, not the port rule, is what stops a
            # tunnel to the server's own services below.
            connect_ports: [443, 1025-65535]
        devices:
          unknown: refuse
        groups:
          school: {networks: [127.0.0.0/8], profile: class}
        profiles:
          class:
            block: [games, pages]
            safe_search: strict
            block_ip_literals: true
        """,
    # The IDN as an admin would type it, in Unicode; tablets ask in punycode.
    "games.txt": "roblox.com\nbücher-spiele.de\n",
    "pages.txt": "pages.example/adult-section\n",
    "vpn.txt": "hidemyname.example\n",
}
LONG_NAME = ".".join(["a" * 60] * 3) + ".roblox.com"  # 194 characters under a blocked parent


@dataclass(frozen=True)
class Attempt:
    attempt: str
    args: tuple[str, ...]
    expected: str  # what the answer shows

    def __str__(self) -> str:
        return f"{self.attempt} -> {self.expected}"


DNS_ATTEMPTS = [
    Attempt("mixed case", ("RoBlOx.CoM",), "NXDOMAIN"),
    Attempt("a trailing dot", ("roblox.com.",), "NXDOMAIN"),
    Attempt("a subdomain of a blocked name", ("www.roblox.com",), "NXDOMAIN"),
    Attempt("a very long name under a blocked parent", (LONG_NAME,), "NXDOMAIN"),
    Attempt("an IDN listed in Unicode, asked in punycode", ("xn--bcher-spiele-dlb.de",), "NXDOMAIN"),
    Attempt("a look-alike that is not listed", ("notroblox.com",), "NOERROR"),
    Attempt("a DoH resolver by name", ("dns.google",), "NXDOMAIN"),
    Attempt("another DoH resolver by name", ("mozilla.cloudflare-dns.com",), "NXDOMAIN"),
    Attempt("a VPN service", ("hidemyname.example",), "NXDOMAIN"),
    Attempt("the Firefox canary", ("use-application-dns.net",), "NXDOMAIN"),
    Attempt("iCloud Private Relay", ("mask.icloud.com",), "NXDOMAIN"),
    Attempt("iCloud Private Relay over HTTP/2", ("mask-h2.icloud.com",), "NXDOMAIN"),
    Attempt("the HTTPS record of a blocked name", ("roblox.com", "TYPE65"), "NXDOMAIN"),
    Attempt("the SVCB record of a blocked name", ("roblox.com", "TYPE64"), "NXDOMAIN"),
    Attempt("ANY for a blocked name", ("roblox.com", "ANY"), "NXDOMAIN"),
    Attempt("DNS over TCP", ("+tcp", "roblox.com"), "NXDOMAIN"),
    Attempt("a query carrying a client subnet", ("+subnet=203.0.113.0/24", "roblox.com"), "NXDOMAIN"),
    Attempt("Google without safe search", ("www.google.com",), "forcesafesearch.google.com."),
    Attempt("Google's Norwegian domain (`no` is a boolean to YAML 1.1)", ("www.google.no",),
            "forcesafesearch.google.com."),
    Attempt("YouTube without restriction", ("www.youtube.com",), "restrict.youtube.com."),
    Attempt("an unlisted name that is an alias (CNAME) of a blocked game", ("play.pupil.example",), "NXDOMAIN"),
    Attempt("a chain of aliases ending at a blocked name", ("deep.pupil.example",), "NXDOMAIN"),
    Attempt("an alias of a DoH resolver", ("doh.pupil.example",), "NXDOMAIN"),
    Attempt("an alias of a VPN service, over TCP", ("+tcp", "vpn.pupil.example"), "NXDOMAIN"),
    Attempt("an unlisted name resolving to a listed DoH resolver's address", ("resolver.pupil.example",), "NXDOMAIN"),
    Attempt("an HTTPS record pointing at a blocked name", ("svc.pupil.example", "TYPE65"), "NXDOMAIN"),
    Attempt("an alias of an allowed name", ("fine.pupil.example",), "NOERROR"),
]
# How the loopback upstream answers the names above, as a pupil's own domain would be set up.
PUPIL_DOMAIN = {
    "aliases": {"play.pupil.example": "roblox.com", "deep.pupil.example": "hop.pupil.example",
                "hop.pupil.example": "www.roblox.com", "doh.pupil.example": "dns.google",
                "vpn.pupil.example": "hidemyname.example", "fine.pupil.example": "cdn.allowed.example"},
    "address_of": {"resolver.pupil.example": "1.1.1.1"},
    "https_targets": {"svc.pupil.example": "roblox.com"},
}


@pytest.fixture(scope="module")
def fronts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VigieProcess, UpstreamServer, ProxyProcess]]:
    directory = tmp_path_factory.mktemp("bypass")
    rules = write_tree(directory, FILES)
    with UpstreamServer(tcp=True) as upstream, Origin(directory) as origin, \
            VigieProcess(rules, free_port(), upstream.port) as dns, ProxyProcess(rules, free_port(), origin) as proxy:
        for setting, names in PUPIL_DOMAIN.items():
            getattr(upstream, setting).update(names)
        yield dns, upstream, proxy


@pytest.mark.parametrize("attempt", DNS_ATTEMPTS, ids=str)
def test_dns(fronts: tuple[VigieProcess, UpstreamServer, ProxyProcess], attempt: Attempt) -> None:
    dns, _, _ = fronts
    answer = dig(dns.dns_port, *attempt.args)
    assert attempt.expected in answer, answer


def test_dns_the_case_a_client_chose_comes_back_as_asked(
        fronts: tuple[VigieProcess, UpstreamServer, ProxyProcess]) -> None:
    dns, _, _ = fronts
    answer = dig(dns.dns_port, "ExAmPlE.oRg")
    assert ";ExAmPlE.oRg." in answer and "ExAmPlE.oRg.\t" in answer, answer  # 0x20: question and answer


def test_dns_a_blocked_alias_names_the_chained_name_and_its_category(
        fronts: tuple[VigieProcess, UpstreamServer, ProxyProcess]) -> None:
    dns, _, _ = fronts
    for _ in range(2):  # the second answer comes from the reply cache: it keeps the chain's verdict
        answer = dig(dns.dns_port, "play.pupil.example")
        assert "NXDOMAIN" in answer and "games (via roblox.com)" in answer, answer


def test_dns_a_client_subnet_never_reaches_the_upstream(
        fronts: tuple[VigieProcess, UpstreamServer, ProxyProcess]) -> None:
    dns, upstream, _ = fronts
    dig(dns.dns_port, "+subnet=203.0.113.0/24", "ecs-check.example")
    sent = [DNSRecord.parse(p) for p in upstream.packets if b"ecs-check" in p.lower()]
    assert sent, "the name was forwarded"
    options = [option for packet in sent for rr in packet.ar if isinstance(rr.rdata, list)
               for option in rr.rdata if isinstance(option, EDNS0)]
    assert all(getattr(option, "code", None) != 8 for option in options), "EDNS client subnet (option 8) removed"
    assert b"\xcb\x00\x71" not in b"".join(p for p in upstream.packets if b"ecs-check" in p.lower())


def test_dns_a_name_longer_than_dns_allows_gets_formerr_and_the_server_goes_on(
        fronts: tuple[VigieProcess, UpstreamServer, ProxyProcess]) -> None:
    dns, _, _ = fronts
    # Five 63-byte labels: 320 bytes of name, over the 255 the protocol allows (dig refuses to send it).
    name = b"".join(bytes([63]) + b"a" * 63 for _ in range(5)) + b"\x06roblox\x03com\x00"
    packet = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + name + b"\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(2)
        client.sendto(packet, ("127.0.0.1", dns.dns_port))
        reply = client.recv(4096)
    assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F == 1, "FORMERR, never silence nor an address"
    assert "NOERROR" in dig(dns.dns_port, "example.org"), "still serving"


PROXY_ATTEMPTS = [
    Attempt("mixed case", ("http://RoBlOx.CoM/",), "403"),
    Attempt("a trailing dot", ("http://roblox.com./",), "403"),
    Attempt("a subdomain of a blocked name", ("http://www.roblox.com/",), "403"),
    Attempt("an IDN in punycode", ("http://xn--bcher-spiele-dlb.de/",), "403"),
    Attempt("an IDN in Unicode", ("http://bücher-spiele.de/",), "403"),
    Attempt("another port", ("http://roblox.com:8080/",), "403"),
    Attempt("user info that looks like an allowed host", ("http://allowed.example@roblox.com/",), "403"),
    Attempt("an IP-literal URL", ("http://192.0.2.10/",), "403"),
    Attempt("an IPv6-literal URL", ("http://[2001:db8::10]/",), "403"),
    Attempt("a listed URL", ("http://pages.example/adult-section/1",), "403"),
    Attempt("a listed URL with an escaped letter", ("--path-as-is", "http://pages.example/%61dult-section/1"),
            "403"),
    Attempt("a listed URL with an escaped dot segment", ("--path-as-is", "http://pages.example/%2e/adult-section"),
            "403"),
    Attempt("a listed URL with doubled slashes", ("--path-as-is", "http://pages.example//adult-section//1"), "403"),
    Attempt("a listed URL with a dot segment", ("--path-as-is", "http://pages.example/./adult-section/1"), "403"),
    Attempt("a listed URL climbing back", ("--path-as-is", "http://pages.example/x/../adult-section/1"), "403"),
    Attempt("a listed URL in capitals", ("http://pages.example/ADULT-SECTION/1",), "403"),
    Attempt("the same host outside the listed path", ("http://pages.example/recipes",), "200"),
    Attempt("a DoH resolver by name", ("https://dns.google/dns-query",), "403"),
    Attempt("a DoH resolver by address", ("https://1.1.1.1/dns-query",), "403"),
    Attempt("HTTPS to an IP address", ("https://192.0.2.10/",), "403"),
    Attempt("a VPN service", ("https://hidemyname.example/",), "403"),
    Attempt("the Firefox canary", ("http://use-application-dns.net/",), "403"),
    Attempt("iCloud Private Relay", ("https://mask.icloud.com/",), "403"),
    Attempt("a blocked Host header inside an intercepted allowed TLS name (domain fronting)",
            ("-H", "Host: www.roblox.com", "https://www.google.com/"), "403"),
    Attempt("an allowed Host header that differs from the TLS name (domain fronting)",
            ("-H", "Host: allowed.example", "https://www.google.com/"), "421"),
    Attempt("a harmless CONNECT carrying a blocked TLS name",
            ("--connect-to", "www.roblox.com:443:allowed.example:443", "https://www.roblox.com/"), "403"),
    Attempt("an IPv4-mapped IPv6 address", ("http://[::ffff:192.0.2.10]/",), "403"),
    Attempt("the Google search host ipv4.google.com without safe search",
            ("https://ipv4.google.com/search?q=x&safe=off",), "200 safe=active"),
    Attempt("a search on a Google country domain without safe search",
            ("https://www.google.fr/search?q=x&safe=off",), "200 safe=active"),
    Attempt("DuckDuckGo's HTML endpoint with safe search off", ("https://html.duckduckgo.com/html/?q=x&kp=-2",),
            "200 kp=1"),
    Attempt("Bing's China host with adult results", ("https://cn.bing.com/search?q=x&adlt=off",),
            "200 adlt=strict"),
    Attempt("an allowed site", ("http://allowed.example/",), "200"),
]


@pytest.mark.parametrize("attempt", PROXY_ATTEMPTS, ids=str)
def test_proxy(fronts: tuple[VigieProcess, UpstreamServer, ProxyProcess], attempt: Attempt) -> None:
    _, _, proxy = fronts
    *options, url = attempt.args
    code, status, body = curl(proxy.port, url, "--cacert", str(proxy.ca_file), *options)
    expected_status, _, forwarded = attempt.expected.partition(" ")
    assert status == expected_status, (code, status, body[:300])
    assert forwarded in body, body[:300]  # what the origin received (it echoes the request)


def raw_request(port: int, request: bytes) -> bytes:
    """Send `request` as is to the proxy; its whole answer (the proxy closes or answers within 5 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(request)
        received = b""
        try:
            while chunk := connection.recv(65536):
                received += chunk
                if b"\r\n\r\n" in received:
                    break
        except TimeoutError:
            pass
    return received


RAW_ATTEMPTS = [
    Attempt("HTTP/1.0 absolute-form without Host", ("GET http://roblox.com/ HTTP/1.0\r\n\r\n",), "403"),
    Attempt("HTTP/1.0 origin-form without Host (no destination)", ("GET /play HTTP/1.0\r\n\r\n",), "400"),
    Attempt("origin-form with a blocked Host, sent to the proxy as to a server",
            ("GET /play HTTP/1.1\r\nHost: roblox.com\r\n\r\n",), "403"),
    Attempt("absolute-form to a blocked host with an allowed Host header",
            ("GET http://roblox.com/ HTTP/1.1\r\nHost: allowed.example\r\n\r\n",), "403"),
    Attempt("absolute-form to an allowed host with a blocked Host header",
            ("GET http://allowed.example/ HTTP/1.1\r\nHost: roblox.com\r\n\r\n",), "403"),
    Attempt("CONNECT to DNS over TLS at a resolver's address",
            ("CONNECT 1.1.1.1:853 HTTP/1.1\r\nHost: 1.1.1.1:853\r\n\r\n",), "403"),
    Attempt("CONNECT to DNS over TLS by name", ("CONNECT dns.google:853 HTTP/1.1\r\nHost: dns.google:853\r\n\r\n",),
            "403"),
    Attempt("CONNECT to a port outside connect_ports (SSH)",
            ("CONNECT allowed.example:22 HTTP/1.1\r\nHost: allowed.example:22\r\n\r\n",), "403"),
    Attempt("an address as one decimal number", ("GET http://3221225994/ HTTP/1.1\r\nHost: 3221225994\r\n\r\n",),
            "403"),
    Attempt("an address in hexadecimal", ("GET http://0xc000020a/ HTTP/1.1\r\nHost: 0xc000020a\r\n\r\n",), "403"),
    Attempt("an address in octal", ("GET http://0300.0.02.012/ HTTP/1.1\r\nHost: 0300.0.02.012\r\n\r\n",), "403"),
    Attempt("an address in short form", ("GET http://192.522/ HTTP/1.1\r\nHost: 192.522\r\n\r\n",), "403"),
    Attempt("a name a browser reads as a broken address",
            ("GET http://1.2.3.256/ HTTP/1.1\r\nHost: 1.2.3.256\r\n\r\n",), "400"),
]


@pytest.mark.parametrize("attempt", RAW_ATTEMPTS, ids=str)
def test_proxy_raw(fronts: tuple[VigieProcess, UpstreamServer, ProxyProcess], attempt: Attempt) -> None:
    _, _, proxy = fronts
    answer = raw_request(proxy.port, attempt.args[0].encode())
    status_line = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    assert status_line.split(" ")[1:2] == [attempt.expected], answer[:300]


def tls_through_connect(port: int, target: str, sni: str, host: str, cafile: Path) -> str:
    """CONNECT `target`, a TLS handshake naming `sni`, then `GET /` with `Host: host`, as a hand-made client would;
    the status of what answered: the CONNECT's when it was refused, "passthrough" when the handshake reached a
    server other than Vigie's interception (whose certificate only the Vigie CA signs), else the request's."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head and (chunk := raw.recv(4096)):
            head += chunk
        status = head.split(b" ", 2)[1].decode() if head else "closed"
        if status != "200":
            return status
        context = ssl.create_default_context(cafile=str(cafile))
        context.check_hostname = False
        try:
            with context.wrap_socket(raw, server_hostname=sni) as tls:
                tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                answer = tls.recv(4096)
        except ssl.SSLCertVerificationError:
            return "passthrough"
        except (ssl.SSLError, ConnectionError):
            return "closed"
        return answer.split(b" ", 2)[1].decode() if answer else "closed"


TLS_ATTEMPTS = [
    Attempt("a DoH resolver's address as a decimal CONNECT target, allowed TLS name",
            ("16843009:443", "allowed.example", "allowed.example"), "403"),
    Attempt("a DoH resolver's address in hexadecimal as the CONNECT target",
            ("0x1010101:443", "0x1010101", "0x1010101"), "403"),
    Attempt("a blocked CONNECT target carrying the TLS name and Host of an allowed site",
            ("roblox.com:443", "allowed.example", "allowed.example"), "403"),
    Attempt("an allowed CONNECT target carrying a blocked TLS name",
            ("allowed.example:443", "roblox.com", "roblox.com"), "403"),
    Attempt("a TLS name that is not a host name", ("allowed.example:443", "x-.roblox.com", "allowed.example"), "421"),
    Attempt("the same allowed name everywhere", ("allowed.example:443", "allowed.example", "allowed.example"),
            "passthrough"),
]


@pytest.mark.parametrize("attempt", TLS_ATTEMPTS, ids=str)
def test_proxy_tls(fronts: tuple[VigieProcess, UpstreamServer, ProxyProcess], attempt: Attempt) -> None:
    _, _, proxy = fronts
    target, sni, host = attempt.args
    assert tls_through_connect(proxy.port, target, sni, host, proxy.ca_file) == attempt.expected


class LoopbackService:
    """A TCP service on the server's loopback, standing for its metrics, admin API or Redis: it counts the
    connections that reach it."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.reached = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.reached += 1
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nsecret\n")
            connection.close()


SERVER_ATTEMPTS = [
    Attempt("the server's own service by name", ("GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost:{port}"
                                                 "\r\n\r\n",), "not reached"),
    Attempt("the server's own service by name in capitals with a trailing dot",
            ("GET http://LOCALHOST.:{port}/ HTTP/1.1\r\nHost: LOCALHOST.:{port}\r\n\r\n",), "not reached"),
    Attempt("the server's own service as a decimal address",
            ("GET http://2130706433:{port}/ HTTP/1.1\r\nHost: 2130706433:{port}\r\n\r\n",), "not reached"),
    Attempt("a tunnel to the server's own service by name (a Redis command inside)",
            ("CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\nPING\r\n",), "not reached"),
    Attempt("a tunnel to the server's own service by a short address",
            ("CONNECT 127.1:{port} HTTP/1.1\r\nHost: 127.1:{port}\r\n\r\nPING\r\n",), "not reached"),
    Attempt("a tunnel to the server's own service by an IPv4-mapped address",
            ("CONNECT [::ffff:127.0.0.1]:{port} HTTP/1.1\r\nHost: [::ffff:127.0.0.1]:{port}\r\n\r\nPING\r\n",),
            "not reached"),
]


@pytest.fixture(scope="module")
def loopback_service() -> Iterator[LoopbackService]:
    service = LoopbackService()
    yield service
    service.listener.close()


@pytest.mark.parametrize("attempt", SERVER_ATTEMPTS, ids=str)
def test_proxy_never_reaches_the_server_itself(fronts: tuple[VigieProcess, UpstreamServer, ProxyProcess],
                                               loopback_service: LoopbackService, attempt: Attempt) -> None:
    _, _, proxy = fronts
    answer = raw_request(proxy.port, attempt.args[0].format(port=loopback_service.port).encode())
    time.sleep(0.3)  # a connection the proxy would open arrives after its answer
    assert loopback_service.reached == 0, answer[:300]
    assert b"secret" not in answer


def test_the_reliability_page_lists_every_attempt() -> None:
    readme = (REPO / "docs" / "reliability.md").read_text().split("## Bypass attempts", 1)[1].split("\n## ", 1)[0]
    missing = [a.attempt for a in DNS_ATTEMPTS + PROXY_ATTEMPTS + RAW_ATTEMPTS + TLS_ATTEMPTS + SERVER_ATTEMPTS
               if f"| {a.attempt}: `" not in readme]
    assert not missing, f"docs/reliability.md lacks: {missing}"
