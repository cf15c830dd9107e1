"""Allowed plain HTTP forwarded by the proxy's front (`filter_proxy/front.py`, `relays.ResponseRelay`): every
request judged before it is sent, the response relayed byte for byte whatever its framing, the origin's connection
reused while the client names the same host, and every response the front cannot frame refused or cut.

A real proxy (Vigie's `start_proxy`, in this process) and a scripted origin on loopback that answers each request
head it reads with the next scripted reply, sent in pieces so that framing is found across reads. `vm` is a name of
this machine's /etc/hosts (127.0.0.1), so that the addon resolves, judges and pins it as it would on the Internet.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from filter_proxy.addon import VigieAddon
from filter_proxy.ca import ensure_ca
from policy.snapshot import ListCache
from policy.state import EMPTY_STATE
from tests.conftest import free_port, write_tree
from tests.proxy_servers import LoopbackServer, proxy_in_this_process
from vigie.loading import load_snapshot

pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL .* objects is deprecated:DeprecationWarning")
HOST_NAME = "vm"


@dataclass
class Reply:
    pieces: tuple[bytes, ...]  # sent one by one, a little apart
    close: bool = False  # the origin closes its connection after it


def ok(body: bytes, *headers: str) -> Reply:
    extra = "".join(f"{header}\r\n" for header in headers)
    return Reply((f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body,))


@dataclass
class ScriptedOrigin(LoopbackServer):
    """Answers each request head it reads with the next reply of `replies`; records the heads."""

    replies: list[Reply] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)
    closed_by_proxy: int = 0

    def answer(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        self.closed_by_proxy += 1
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                self.requests.append(head + b"\r\n\r\n")
                reply = self.replies.pop(0)
                for piece in reply.pieces:
                    conn.sendall(piece)
                    time.sleep(0.01)
                if reply.close:
                    return


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[int, ScriptedOrigin]]:
    with vigie_proxy(tmp_path) as running:
        yield running


@contextlib.contextmanager
def vigie_proxy(tmp_path: Path, options: tuple[str, ...] = ()) -> Iterator[tuple[int, ScriptedOrigin]]:
    """(proxy port, the origin), the origin reachable as `vm:<its port>`; `roblox.com` and `vm/private/` blocked."""
    origin = ScriptedOrigin()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        origin.port = listener.getsockname()[1]
        threading.Thread(target=origin.serve, args=(listener,), daemon=True).start()
        rules = write_tree(tmp_path, {"games.txt": "roblox.com\n", "pages.txt": f"{HOST_NAME}/private/\n",
                                      "rules.yaml": f"""
            lists:
              games: {{source: games.txt, format: domains}}
              pages: {{source: pages.txt, format: urls}}
            categories:
              games: [games]
              pages: [pages]
            server:
              proxy:
                internal_hosts: ["127.0.0.1:{origin.port}"]
                http_ports: [80, 1025-65535]
            groups:
              class: {{networks: [127.0.0.0/8], profile: class}}
            profiles:
              class: {{block: [games, pages], block_ip_literals: false}}
            """})
        snapshot = load_snapshot(rules, ListCache()).snapshot
        port = free_port()
        with proxy_in_this_process(VigieAddon(lambda: snapshot, lambda: EMPTY_STATE), port,
                                   ensure_ca(tmp_path / "var").confdir, options):
            yield port, origin


def get(origin: ScriptedOrigin, path: str = "/", method: str = "GET", *headers: str) -> bytes:
    extra = "".join(f"{header}\r\n" for header in headers)
    return (f"{method} http://{HOST_NAME}:{origin.port}{path} HTTP/1.1\r\nHost: {HOST_NAME}:{origin.port}\r\n"
            f"{extra}\r\n").encode()


def receive(sock: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes (fewer only when the proxy closes first)."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def receive_through(sock: socket.socket, end: bytes) -> bytes:
    """What comes until `end` (or until the proxy closes)."""
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def closed(sock: socket.socket) -> bool:
    """Whether the proxy has closed the connection (nothing more comes)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_allowed_requests_reach_the_origin_as_judged_over_one_connection(proxy: tuple[int, ScriptedOrigin]) -> None:
    """The request line in origin form and the headers as sent, two requests over one origin connection, each
    response relayed whole."""
    port, origin = proxy
    origin.replies += [ok(b"first"), ok(b"second!", "X-Origin: yes")]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(get(origin, "/a?q=1", "GET", "User-Agent: tablet", "Accept: */*"))
        first = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
        assert receive(sock, len(first)) == first
        sock.sendall(get(origin, "/b"))
        second = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nX-Origin: yes\r\n\r\nsecond!"
        assert receive(sock, len(second)) == second
    assert origin.requests == [
        f"GET /a?q=1 HTTP/1.1\r\nHost: vm:{origin.port}\r\nUser-Agent: tablet\r\nAccept: */*\r\n\r\n".encode(),
        f"GET /b HTTP/1.1\r\nHost: vm:{origin.port}\r\n\r\n".encode()]
    assert origin.connections == 1


def test_a_chunked_response_is_relayed_as_the_origin_sent_it(proxy: tuple[int, ScriptedOrigin]) -> None:
    """Chunk extensions and trailers kept (mitmproxy would decode and re-encode them), the chunk lines cut across
    reads; the connection then carries the next request."""
    port, origin = proxy
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5;ext=1\r", b"\nhello\r\n1",
               b"0\r\n0123456789abcdef\r", b"\n0\r\nTrailer-One: x\r\n", b"\r\n")
    origin.replies += [Reply(chunked), ok(b"after")]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(get(origin))
        assert receive(sock, len(b"".join(chunked))) == b"".join(chunked)
        sock.sendall(get(origin, "/next"))
        after = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nafter"
        assert receive(sock, len(after)) == after
    assert origin.connections == 1


@pytest.mark.parametrize("reply, method", [
    (Reply((b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",)), "HEAD"),
    (Reply((b"HTTP/1.1 204 No Content\r\n\r\n",)), "GET"),
    (Reply((b"HTTP/1.1 304 Not Modified\r\nContent-Length: 20\r\n\r\n",)), "GET"),
    (Reply((b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
            b"ok")), "GET"),
], ids=["HEAD", "204", "304", "103 then 200"])
def test_responses_without_a_body_or_with_interim_heads_end_where_they_end(proxy: tuple[int, ScriptedOrigin],
                                                                         reply: Reply, method: str) -> None:
    port, origin = proxy
    origin.replies += [reply, ok(b"next")]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(get(origin, "/", method))
        assert receive(sock, len(b"".join(reply.pieces))) == b"".join(reply.pieces)
        sock.sendall(get(origin, "/next"))
        assert receive_through(sock, b"next") == b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"
    assert origin.connections == 1


def test_a_response_without_length_ends_with_the_connection(proxy: tuple[int, ScriptedOrigin]) -> None:
    port, origin = proxy
    body = b"x" * 300_000
    origin.replies.append(Reply((b"HTTP/1.0 200 OK\r\n\r\n", body), close=True))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(get(origin))
        assert receive(sock, 10**6) == b"HTTP/1.0 200 OK\r\n\r\n" + body
        assert closed(sock)


def test_a_large_body_arrives_whole_to_a_slow_client(proxy: tuple[int, ScriptedOrigin]) -> None:
    """8 MB read slowly: the origin is paused rather than the proxy holding it all."""
    port, origin = proxy
    body = bytes(range(256)) * (8 * 1024 * 1024 // 256)
    origin.replies.append(ok(body))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(get(origin))
        time.sleep(0.5)
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 8388608\r\n\r\n"
        assert receive(sock, len(head) + len(body)) == head + body


@pytest.mark.parametrize("reply", [
    Reply((b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",)),
    Reply((b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked, chunked\r\n\r\n0\r\n\r\n",)),
    Reply((b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",)),
    Reply((b"HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: 0\r\n\r\n",)),
    Reply((b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",)),
    Reply((b"SSH-2.0-OpenSSH_9.2\r\n\r\n",)),
    Reply((b"HTTP/1.1 200 OK\r\nContent-",), close=True),
], ids=["two lengths", "repeated chunked", "negative length", "malformed header", "101", "not HTTP", "cut head"])
def test_a_response_the_front_cannot_frame_is_a_502(proxy: tuple[int, ScriptedOrigin], reply: Reply) -> None:
    port, origin = proxy
    origin.replies.append(reply)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(get(origin))
        answer = receive(sock, 10**6)
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and answer.endswith(b"no valid response\n"), answer


@pytest.mark.parametrize("reply", [
    Reply((b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"only part"), close=True),
    Reply((b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n"), close=True),
    Reply((b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello!!\r\n0\r\n\r\n")),
], ids=["short length", "chunks cut", "chunk longer than its size"])
def test_a_body_cut_or_malformed_cuts_the_client_connection(proxy: tuple[int, ScriptedOrigin], reply: Reply) -> None:
    """The client must see the response cut, never take it for whole; nothing more is read from that origin."""
    port, origin = proxy
    origin.replies.append(reply)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(get(origin))
        with contextlib.suppress(ConnectionResetError):
            answer = receive(sock, 10**6)
            assert answer.startswith(b"HTTP/1.1 200 OK") and b"".join(reply.pieces).startswith(answer)
        assert closed(sock)


def test_more_than_the_response_is_not_taken_for_the_next_one(proxy: tuple[int, ScriptedOrigin]) -> None:
    """An origin that sends past its response (a smuggled second response) loses its connection; the client's
    next request goes over a new one and gets its own answer."""
    port, origin = proxy
    origin.replies += [Reply((b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                              b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged",)), ok(b"real")]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(get(origin))
        assert receive_through(sock, b"ok") == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        sock.sendall(get(origin, "/second"))
        assert receive_through(sock, b"real") == b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal"
    assert origin.connections == 2


def test_each_pipelined_request_is_judged_before_it_is_sent(proxy: tuple[int, ScriptedOrigin]) -> None:
    """Three requests in one packet: an allowed one, one for a blocked URL of the same host, one for a blocked
    host. Each gets its answer in order; only the first reaches the origin."""
    port, origin = proxy
    origin.replies.append(ok(b"open"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(get(origin, "/open") + get(origin, "/private/diary", "HEAD")
                     + b"HEAD http://roblox.com/ HTTP/1.1\r\nHost: roblox.com\r\nConnection: close\r\n\r\n")
        answers = receive(sock, 10**6)
    assert answers.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nopenHTTP/1.1 403 Forbidden\r\n")
    assert answers.count(b"HTTP/1.1 403 Forbidden\r\n") == 2
    assert [request.split(b" ")[1] for request in origin.requests] == [b"/open"]


def test_a_request_for_another_host_gets_its_own_judged_connection(proxy: tuple[int, ScriptedOrigin]) -> None:
    """The same origin as `vm` then as `127.0.0.1`: two names, two connections, each destination judged."""
    port, origin = proxy
    origin.replies += [ok(b"by name"), ok(b"by address")]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(get(origin))
        assert receive_through(sock, b"by name").endswith(b"\r\n\r\nby name")
        sock.sendall(f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
                     .encode())
        assert receive_through(sock, b"by address").endswith(b"\r\n\r\nby address")
    assert origin.connections == 2


@pytest.mark.parametrize("target", ["127.0.0.1:{forbidden}", "2130706433:{forbidden}", "localhost:{forbidden}",
                                    "0x7f.1:{forbidden}", "[::ffff:127.0.0.1]:{forbidden}"])
def test_an_address_no_rule_lets_the_proxy_reach_is_never_connected(proxy: tuple[int, ScriptedOrigin],
                                                                    target: str) -> None:
    """Loopback in any spelling, on a port `internal_hosts` does not list: 502 with the reason, nothing connected."""
    port, _ = proxy
    with socket.create_server(("127.0.0.1", 0)) as forbidden:
        forbidden.settimeout(0.5)
        authority = target.format(forbidden=forbidden.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            answer = receive(sock, 10**6)
        assert answer.startswith((b"HTTP/1.1 502", b"HTTP/1.1 403")), answer
        with pytest.raises(TimeoutError):
            forbidden.accept()


@pytest.mark.parametrize("request_head", [
    b"GET http://vm:{port}/ HTTP/1.1\r\nHost: vm:{port}\r\nX: a\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET http://vm:{port}/ HTTP/1.1\r\nHost: vm:{port}\r\nX: a\rTransfer-Encoding: chunked\r\n\r\n",
    b"GET http://vm:{port}/ HTTP/1.1\r\nHost: vm:{port}\r\n Transfer-Encoding: chunked\r\n\r\n",
    b"GET http://vm:{port}/ HTTP/1.1\r\nHost: vm:{port}\r\nX\x00: a\r\n\r\n",
    b"GET http://vm:{port}/ HTTP/1.1\r\nHost: vm:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
], ids=["bare LF", "bare CR", "folded line", "NUL in a name", "upgrade"])
def test_a_head_the_front_does_not_read_strictly_is_left_to_mitmproxy(proxy: tuple[int, ScriptedOrigin],
                                                                     request_head: bytes) -> None:
    """Line endings and header forms an origin could read differently from the front never reach it from the
    front: mitmproxy reads them, and refuses, forwards what it parsed, or waits for the chunked body it read."""
    port, origin = proxy
    origin.replies.append(ok(b"mitmproxy's"))
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(request_head.replace(b"{port}", str(origin.port).encode()))
        with contextlib.suppress(TimeoutError):
            answer = receive_through(sock, b"mitmproxy's")
            assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 200 OK")), answer
    for request in origin.requests:
        assert b"\r\n\r\n" not in request[:-4] and b"\x00" not in request
        assert all(line.endswith(b"\r") or not line for line in request.split(b"\n")[:-1])


def test_a_client_that_half_closes_after_its_request_gets_the_response(proxy: tuple[int, ScriptedOrigin]) -> None:
    """As `printf 'GET …' | nc` does; then both connections end."""
    port, origin = proxy
    origin.replies.append(ok(b"answered"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(get(origin))
        sock.shutdown(socket.SHUT_WR)
        assert receive(sock, 10**6).endswith(b"\r\n\r\nanswered")
    deadline = time.monotonic() + 5
    while not origin.closed_by_proxy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert origin.closed_by_proxy == 1


def test_requests_an_admin_has_mitmproxy_change_are_left_to_it(tmp_path: Path) -> None:
    """`--set modify_headers=…` (or a script with request hooks): mitmproxy forwards the allowed requests, so
    that its options hold for them too."""
    with vigie_proxy(tmp_path, ("modify_headers=/~q/X-Added/by-mitmproxy",)) as (port, origin):
        origin.replies.append(ok(b"seen"))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(get(origin, "/", "GET", "Connection: close"))
            assert receive_through(sock, b"seen").endswith(b"seen")
    assert b"X-Added: by-mitmproxy" in origin.requests[0]
