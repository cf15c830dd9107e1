"""The proxy's front door (`filter_proxy/front.py`): tunnels passed through are relayed by Vigie itself, byte for
byte, blocked plain HTTP gets its block page from it, and everything else reaches mitmproxy as the client sent it.

A real proxy (Vigie's `start_proxy`, in this process), a raw TCP "server" on loopback that records what reaches it
and answers with its digest and a large body, and hand-made clients: the front relays whatever follows a valid
ClientHello, so the bytes after it need not be TLS. `vm` is a name of this machine's /etc/hosts (127.0.0.1), so
that the addon resolves and pins a name as it would on the Internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mitmproxy import options
from mitmproxy.tools.dump import DumpMaster

from filter_proxy.addon import VigieAddon
from filter_proxy.ca import ensure_ca
from filter_proxy.front import ProxyFront
from filter_proxy.server import start_proxy
from policy.metrics import BLOCK_PAGES
from policy.model import SocketAddress
from policy.snapshot import ListCache
from policy.state import EMPTY_STATE
from tests.conftest import free_port, write_tree
from tests.proxy_servers import LoopbackServer, client_hello, proxy_in_this_process
from vigie.loading import load_snapshot

# mitmproxy 11's TLS interception calls a pyOpenSSL API it deprecated; in this process, -W error would make it fail.
pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL .* objects is deprecated:DeprecationWarning")
HOST_NAME = "vm"
REPLY_SIZE = 4 * 1024 * 1024


@dataclass
class Sink(LoopbackServer):
    """Reads each connection to its end, records it, answers `digest\\n` and REPLY_SIZE bytes, closes."""

    received: list[bytes] = field(default_factory=list)

    def answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            with contextlib.suppress(OSError):
                while chunk := conn.recv(65536):
                    data += chunk
            self.received.append(data)
            with contextlib.suppress(OSError):
                conn.sendall(hashlib.sha256(data).hexdigest().encode() + b"\n" + reply_body())


def reply_body() -> bytes:
    return bytes(range(256)) * (REPLY_SIZE // 256)


@pytest.fixture
def front(tmp_path: Path) -> Iterator[tuple[int, Sink, socket.socket]]:
    """(proxy port, the sink, a loopback listener that no rule lets the proxy reach)."""
    sink, forbidden = Sink(), socket.create_server(("127.0.0.1", 0))
    with socket.create_server(("127.0.0.1", 0)) as listener, forbidden:
        sink.port = listener.getsockname()[1]
        threading.Thread(target=sink.serve, args=(listener,), daemon=True).start()
        rules = write_tree(tmp_path, {"games.txt": "roblox.com\nwpad.example\n", "rules.yaml": f"""
            lists:
              games: {{source: games.txt, format: domains}}
            categories:
              games: [games]
            server:
              proxy:
                internal_hosts: ["127.0.0.1:{sink.port}"]
                connect_ports: [443, 1025-65535]
            groups:
              class: {{networks: [127.0.0.0/8], profile: class}}
            profiles:
              class: {{block: [games], block_ip_literals: false}}
            """})
        snapshot = load_snapshot(rules, ListCache()).snapshot
        port = free_port()
        with proxy_in_this_process(VigieAddon(lambda: snapshot, lambda: EMPTY_STATE), port,
                                   ensure_ca(tmp_path / "var").confdir):
            yield port, sink, forbidden


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """(response head, what came after it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(1 << 20):
        data += chunk
    return data


def connect(port: int, target: str) -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


def test_a_passed_through_tunnel_carries_everything_both_ways(front: tuple[int, Sink, socket.socket]) -> None:
    """CONNECT, ClientHello and 4 MB sent at once without waiting for the 200; the client's half-close reaches
    the server, whose 4 MB answer and close come back."""
    port, sink, _ = front
    upload = bytes(reversed(range(256))) * (REPLY_SIZE // 256)
    hello = client_hello(HOST_NAME)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(connect(port, f"{HOST_NAME}:{sink.port}") + hello + upload)
        sock.shutdown(socket.SHUT_WR)
        head, rest = read_head(sock)
        answer = rest + read_all(sock)
    assert head == b"HTTP/1.1 200 Connection established"
    digest, _, body = answer.partition(b"\n")
    assert digest.decode() == hashlib.sha256(hello + upload).hexdigest()
    assert body == reply_body()
    assert sink.received == [hello + upload]


def test_the_connect_head_may_come_byte_by_byte(front: tuple[int, Sink, socket.socket]) -> None:
    port, sink, _ = front
    hello = client_hello(None)  # an address as the CONNECT target: no TLS name
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for byte in connect(port, f"127.0.0.1:{sink.port}"):
            sock.send(bytes([byte]))
            time.sleep(0.002)
        head, rest = read_head(sock)
        assert head == b"HTTP/1.1 200 Connection established" and rest == b""
        sock.sendall(hello[:10])
        time.sleep(0.05)
        sock.sendall(hello[10:] + b"after")
        sock.shutdown(socket.SHUT_WR)
        digest = read_all(sock).partition(b"\n")[0]
    assert digest.decode() == hashlib.sha256(hello + b"after").hexdigest()


def test_a_tunnel_that_does_not_speak_tls_is_decided_by_mitmproxy(front: tuple[int, Sink, socket.socket]) -> None:
    """After the 200, plain HTTP for a blocked host inside a tunnel to an allowed one: not relayed, but handed to
    mitmproxy, which decides the request and answers with the block page."""
    port, sink, _ = front
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(connect(port, f"{HOST_NAME}:{sink.port}"))
        assert read_head(sock)[0] == b"HTTP/1.1 200 Connection established"
        sock.sendall(b"GET /play HTTP/1.1\r\nHost: roblox.com\r\nConnection: close\r\n\r\n")
        head, body = read_head(sock)
        body += read_all(sock)
    assert head.startswith(b"HTTP/1.1 403") and b"roblox.com" in body
    assert sink.received in ([], [b""]), "nothing reached the server"


def test_a_tls_name_other_than_the_connect_host_is_decided_by_mitmproxy(front: tuple[int, Sink, socket.socket],
                                                                         tmp_path: Path) -> None:
    port, sink, _ = front
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(connect(port, f"{HOST_NAME}:{sink.port}"))
        assert read_head(raw)[0] == b"HTTP/1.1 200 Connection established"
        context = ssl.create_default_context(cafile=str(tmp_path / "var" / "ca" / "vigie-ca.pem"))
        with context.wrap_socket(raw, server_hostname="roblox.com") as tls:  # intercepted: Vigie's certificate
            tls.sendall(b"GET / HTTP/1.1\r\nHost: roblox.com\r\nConnection: close\r\n\r\n")
            head, body = read_head(tls)
            body += read_all(tls)
    assert head.startswith(b"HTTP/1.1 403") and b"roblox.com" in body
    assert sink.received in ([], [b""]), "nothing reached the server"


def test_a_tls_name_with_the_connect_port_is_passed_through(front: tuple[int, Sink, socket.socket]) -> None:
    """Some HTTP clients send `host:port` as the TLS name: the same host and port as the CONNECT names nothing
    else."""
    port, sink, _ = front
    hello = client_hello(f"{HOST_NAME}:{sink.port}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(connect(port, f"{HOST_NAME}:{sink.port}") + hello)
        assert read_head(sock)[0] == b"HTTP/1.1 200 Connection established"
        sock.shutdown(socket.SHUT_WR)
        answer = read_all(sock)
    assert answer.startswith(hashlib.sha256(hello).hexdigest().encode())


@pytest.mark.parametrize("tls_name", ["roblox.com:443", "roblox.com:{port}", "vm:1", "vm:{port}:{port}", "vm/"])
def test_a_tls_name_no_host_name_is_intercepted(front: tuple[int, Sink, socket.socket], tmp_path: Path,
                                                tls_name: str) -> None:
    """mitmproxy reads such a name as none, but a server might read the host in it: neither the front nor the
    addon passes it through; mitmproxy intercepts, with Vigie's certificate, and no byte of the client's
    ClientHello reaches the server."""
    port, sink, _ = front
    name = tls_name.format(port=sink.port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(connect(port, f"{HOST_NAME}:{sink.port}"))
        assert read_head(raw)[0] == b"HTTP/1.1 200 Connection established"
        context = ssl.create_default_context(cafile=str(tmp_path / "var" / "ca" / "vigie-ca.pem"))
        context.check_hostname = False  # the name is not one a certificate can be checked against
        with context.wrap_socket(raw, server_hostname=name) as tls:  # verified: Vigie's certificate
            assert tls.version() is not None
    assert not any(name.encode() in received for received in sink.received)


def test_a_destination_no_rule_lets_the_proxy_reach_is_never_connected(front: tuple[int, Sink, socket.socket]) -> None:
    """An allowed name that resolves to a loopback port not listed in internal_hosts: 502 with the reason."""
    port, _, forbidden = front
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(connect(port, f"{HOST_NAME}:{forbidden.getsockname()[1]}") + client_hello(HOST_NAME))
        head, body = read_head(sock)
        body += read_all(sock)
    assert head.startswith(b"HTTP/1.1 502") and b"deny_networks" in body, (head, body)
    forbidden.settimeout(0.5)
    with pytest.raises(TimeoutError):
        forbidden.accept()


def test_nothing_is_connected_for_a_client_that_leaves_before_its_client_hello(
        front: tuple[int, Sink, socket.socket]) -> None:
    """Browsers and HTTP libraries open connections they never use; the server is connected only once the
    ClientHello is there, as in mitmproxy's lazy mode."""
    port, sink, _ = front
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(connect(port, f"{HOST_NAME}:{sink.port}"))
        assert read_head(sock)[0] == b"HTTP/1.1 200 Connection established"
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(connect(port, f"{HOST_NAME}:{sink.port}"))
        sock.shutdown(socket.SHUT_WR)  # a CONNECT and nothing more
        # Closed at once when the FIN came with the head; answered then closed when it came after it.
        assert read_all(sock) in (b"", b"HTTP/1.1 200 Connection established\r\n\r\n")
    time.sleep(0.2)
    assert sink.connections == 0


def test_blocked_plain_http_is_answered_by_the_front_then_mitmproxy_takes_the_connection(
        front: tuple[int, Sink, socket.socket]) -> None:
    """Two blocked requests on one kept-alive connection get their block pages (the second a HEAD: no body); the
    third, a POST (not the front's), goes to mitmproxy with the connection, which decides and answers it (502:
    the name does not resolve)."""
    port, _, _ = front
    before = BLOCK_PAGES.labels("category")._value.get()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET http://RoBlOx.CoM/play HTTP/1.1\r\nHost: roblox.com\r\nAccept-Language: en\r\n\r\n")
        head, body = read_head(sock)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 403 Forbidden") and b"Content-Language: en" in head
        assert len(body) == length and b"roblox.com" in body and b"</html>" in body
        sock.sendall(b"HEAD http://www.roblox.com/ HTTP/1.1\r\nHost: www.roblox.com\r\n\r\n")
        head, rest = read_head(sock)
        assert head.startswith(b"HTTP/1.1 403 Forbidden") and rest == b""
        sock.sendall(b"POST http://nowhere.invalid/ HTTP/1.1\r\nHost: nowhere.invalid\r\nContent-Length: 2\r\n"
                     b"Connection: close\r\n\r\nhi")
        head, body = read_head(sock)
        body += read_all(sock)
    assert head.startswith(b"HTTP/1.1 502") and b"nowhere.invalid" in body, (head, body)
    assert BLOCK_PAGES.labels("category")._value.get() == before + 2


@pytest.mark.parametrize("request_head", [
    b"GET http://roblox.com/ HTTP/1.0\r\nHost: roblox.com\r\n\r\n",
    b"GET http://roblox.com/ HTTP/1.1\r\nHost: roblox.com\r\nConnection: close\r\n\r\n",
])
def test_a_block_page_ends_a_connection_that_asked_for_it(front: tuple[int, Sink, socket.socket],
                                                           request_head: bytes) -> None:
    answer = exchange(front[0], request_head)
    assert answer.startswith(b"HTTP/1.1 403 Forbidden") and b"Connection: close" in answer


@pytest.mark.parametrize("request_head", [
    # the request line and the Host header name different hosts: domain fronting, mitmproxy's to judge (block)
    b"GET http://allowed.example/ HTTP/1.1\r\nHost: roblox.com\r\nConnection: close\r\n\r\n",
    # a body, a repeated Host: not the front's
    b"GET http://roblox.com/ HTTP/1.1\r\nHost: roblox.com\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    b"GET http://roblox.com/ HTTP/1.1\r\nHost: roblox.com\r\nHost: allowed.example\r\nConnection: close\r\n\r\n",
])
def test_requests_the_front_does_not_judge_reach_mitmproxy(front: tuple[int, Sink, socket.socket],
                                                           request_head: bytes) -> None:
    """Answered by mitmproxy (its block page, or its refusal of a malformed request), never let through."""
    answer = exchange(front[0], request_head)
    assert answer.split(b" ")[1] in (b"403", b"400"), answer[:300]


def exchange(port: int, request: bytes) -> bytes:
    """Everything the proxy answers to `request` on a new connection, until it closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        return read_all(sock)


def test_a_pac_request_is_served_even_from_a_blocked_host(front: tuple[int, Sink, socket.socket]) -> None:
    """WPAD by DNS names a `wpad` host; were it blocked, a block page instead of the PAC would send browsers
    DIRECT. The front leaves every PAC path to mitmproxy, which serves the PAC first."""
    answer = exchange(front[0], b"GET http://wpad.example/wpad.dat HTTP/1.1\r\nHost: wpad.example\r\n"
                                b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and b"FindProxyForURL" in answer, answer[:300]


def test_who_may_use_the_proxy_is_the_rules_not_mitmproxys_guess_from_the_address(tmp_path: Path) -> None:
    """mitmproxy refuses clients with global addresses by default (block_global): tablets on IPv6 and schools
    with public addresses would get nothing from mitmproxy while the front served them."""
    rules = write_tree(tmp_path, {"rules.yaml": "groups:\n  class: {networks: ['2001:db8::/32'], profile: p}\n"
                                                "profiles:\n  p: {}\n"})
    snapshot = load_snapshot(rules, ListCache()).snapshot

    async def options_in_force() -> tuple[bool, bool]:
        handle = await start_proxy(VigieAddon(lambda: snapshot, lambda: EMPTY_STATE),
                                   SocketAddress("127.0.0.1", free_port()), "regular",
                                   ensure_ca(tmp_path / "var").confdir)
        try:
            return handle.master.options.block_global, handle.master.options.block_private
        finally:
            await handle.stop()

    assert asyncio.run(options_in_force()) == (False, False)


def test_the_server_hooks_follow_the_addons_mitmproxy_has_now() -> None:
    """The front runs mitmproxy's server hooks itself from a cached list: an addon added later (a script loaded)
    runs from the next tunnel on, one removed no longer does, and the order is mitmproxy's; a script with request
    hooks sends plain requests to mitmproxy while it is loaded."""

    class Recorder:
        def server_connect(self, data: object) -> None:
            pass

    class OtherRecorder(Recorder):  # mitmproxy names addons after their class: one name each
        pass

    class ChangesRequests:  # an admin's script that adds a header: mitmproxy must then see every plain request
        def request(self, flow: object) -> None:
            pass

    async def check() -> None:
        master = DumpMaster(options.Options(), with_termlog=False, with_dumper=False)
        addon = VigieAddon(lambda: load_snapshot(write_tree(Path(tempfile.mkdtemp()), {
            "rules.yaml": "groups:\n  class: {networks: [127.0.0.0/8], profile: p}\nprofiles:\n  p: {}\n"}),
            ListCache()).snapshot, lambda: EMPTY_STATE)
        master.addons.add(addon)
        front = ProxyFront(addon, master, lambda reader, writer: asyncio.sleep(0))

        def running() -> list[object]:
            return [run.__self__ for run in front._hook_methods("server_connect")]  # type: ignore[attr-defined]

        before = running()
        assert before[-1] is addon  # mitmproxy's own (its proxy server's check) first, then Vigie's
        first, second = Recorder(), OtherRecorder()
        master.addons.add(first, second)
        assert running() == [*before, first, second]
        master.addons.remove(first)
        assert running() == [*before, second]
        assert not front._mitmproxy_changes_requests()
        script = ChangesRequests()
        master.addons.add(script)
        assert front._mitmproxy_changes_requests()
        master.addons.remove(script)
        assert not front._mitmproxy_changes_requests()

    asyncio.run(check())
