"""The proxy's front door: CONNECT tunnels that are passed through undecrypted are opened and relayed here, and
blocked plain HTTP requests answered with the block page, without mitmproxy; everything else is handed to
mitmproxy as it arrived.

Most HTTPS a proxy sees is passed through (see addon.py): an allowed host with nothing to inspect. mitmproxy would
accept it, parse it into events, run the hooks and relay each chunk through its layers; here it costs one decision,
one judged connection and two protocols that copy bytes between sockets (`Relay`). The decision is the addon's own,
in the order mitmproxy's hooks take it:

    CONNECT head → client by address, port, decision on the CONNECT host (addon.tunnel_passes_through)
    → mitmproxy's server hooks: the addon resolves the host, judges every address and pins a judged one
    → connected there → "200 Connection established" → the ClientHello: no TLS name, or the CONNECT host → relayed.

A plain HTTP GET whose decision is a block (`addon.blocked_plain_request`, what `requestheaders` decides) gets
the block page here, and the next request on the connection is read the same way. Anything else goes to mitmproxy
with every byte from that request on (`hand_over`), before any answer, so that mitmproxy answers it as it would
have: an allowed plain request, a PAC, proxy credentials, a host blocked or to inspect over TLS. A
destination the hooks refuse, or that does not answer, gets 502 with the reason, and nothing is connected. After
the 200, a ClientHello that is not TLS or names another host goes to mitmproxy with the CONNECT replayed in front
and mitmproxy's own 200 not sent twice (`_AlreadyAnswered`): it intercepts and refuses, as when it had the
connection from the start.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import NamedTuple, cast

from mitmproxy import connection
from mitmproxy.exceptions import AddonHalt
from mitmproxy.hooks import Hook
from mitmproxy.master import Master
from mitmproxy.proxy.layers.tls import parse_client_hello
from mitmproxy.proxy.server_hooks import (
    ServerConnectedHook,
    ServerConnectErrorHook,
    ServerConnectHook,
    ServerConnectionHookData,
    ServerDisconnectedHook,
)
from mitmproxy.tls import ClientHello

from filter_proxy.addon import VigieAddon, normalize_host
from filter_proxy.pac import PAC_PATHS
from policy.metrics import PROXY_ERRORS, PROXY_TLS

log = logging.getLogger(__name__)

MAX_HEAD = 16_384  # a request head longer than this is mitmproxy's to refuse
MAX_CLIENT_HELLO = 65_536  # records of a ClientHello with post-quantum key shares fit well within
READ_TIMEOUT = 30.0  # for a request head and the ClientHello
CONNECT_TIMEOUT = 10.0
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Inbox(asyncio.Protocol):
    """A connection's bytes, kept until the front knows where they go; `wait` until there are more."""

    def __init__(self, connected: Callable[[Inbox, asyncio.Transport], None]) -> None:
        self.data = bytearray()
        self.closed = False
        self._more = asyncio.Event()
        self._connected = connected
        self.lost: Callable[[], None] = lambda: None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._connected(self, cast(asyncio.Transport, transport))  # uvloop's are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        self.data += data
        self._more.set()

    def eof_received(self) -> bool:
        self.closed = True
        self._more.set()
        return True  # half-open: a hand-over may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._more.set()
        self.lost()

    async def wait(self) -> bool:
        """Wait for more bytes; False when the client has closed or READ_TIMEOUT passed."""
        if self.closed:
            return False
        self._more.clear()
        try:
            await asyncio.wait_for(self._more.wait(), READ_TIMEOUT)
        except TimeoutError:
            return False
        return not self.closed or bool(self.data)


class Relay(asyncio.Protocol):
    """One direction of a passed-through tunnel: what arrives on this protocol's transport is written to `peer`.
    Back-pressure: when this transport cannot take more, the peer stops reading. Half-closes are passed on;
    `ended` is called once the connection is gone."""

    def __init__(self, peer: asyncio.Transport, ended: Callable[[], None] = lambda: None) -> None:
        self.peer = peer
        self.ended = ended

    def data_received(self, data: bytes) -> None:
        self.peer.write(data)

    def eof_received(self) -> bool:
        if self.peer.can_write_eof():
            self.peer.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer.close()
        self.ended()

    def pause_writing(self) -> None:
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        self.peer.resume_reading()


class _AlreadyAnswered(asyncio.StreamWriter):
    """mitmproxy's writer for a tunnel this front has already answered with 200: mitmproxy's own reply to the
    replayed CONNECT (its first response head) is not sent; everything after it is."""

    _head = b""
    _answered = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._answered:
            self._head += bytes(data)
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            self._answered = True
            data, self._head = self._head[end + 4:], b""
            if not data:
                return
        super().write(data)


class ProxyFront:
    """Accepts the proxy's connections (regular mode): tunnels passed through and blocked plain HTTP here, the
    rest to `mitmproxy`."""

    def __init__(self, addon: VigieAddon, master: Master, mitmproxy: StreamHandler) -> None:
        self.addon = addon
        self.master = master
        self.mitmproxy = mitmproxy
        self._tasks: set[asyncio.Task[None]] = set()
        self._transports: set[asyncio.Transport] = set()  # open, on either side of the tunnels of this front

    def close(self) -> None:
        """End every tunnel (the proxy stops); mitmproxy ends the connections it has."""
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    def protocol(self) -> Inbox:
        """The protocol factory for `loop.create_server`: every connection starts in an Inbox."""
        return Inbox(self._connected)

    def _connected(self, inbox: Inbox, transport: asyncio.Transport) -> None:
        self._transports.add(transport)
        inbox.lost = lambda: self._transports.discard(transport)
        self._run(self._serve(inbox, transport))

    def _run(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, inbox: Inbox, transport: asyncio.Transport) -> None:
        """Open the tunnel and relay it; anything else to mitmproxy. A failure before the client has an answer
        hands the connection to mitmproxy, which decides again (and fails closed, counted, if it fails too);
        after, the connection is closed and counted."""
        try:
            opened = await self._open(inbox, transport)
        except Exception as exc:  # mitmproxy's hooks meet the same fault and count it, or decide after all
            log.warning("proxy front failed, mitmproxy takes the connection: %s: %s", type(exc).__name__, exc)
            opened = _Done.HAND_OVER
        if isinstance(opened, _Done):
            if opened is _Done.HAND_OVER:
                self.hand_over(inbox, transport)
            return
        try:
            await self._relay(inbox, transport, opened)
        except Exception as exc:  # a bug here must not leave the connection open and unfiltered
            _failed(exc, "the connection is closed")
            transport.abort()

    async def _open(self, inbox: Inbox, transport: asyncio.Transport) -> _Opened | _Done:
        """Read request heads: answer the blocked plain HTTP ones (keep-alive), and for a CONNECT to pass through,
        judge its destination. The tunnel to open; else how it ended (`_Done`)."""
        peer, sockname = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        while True:
            while b"\r\n\r\n" not in inbox.data:
                if len(inbox.data) > MAX_HEAD:
                    return _Done.HAND_OVER
                if not await inbox.wait():
                    if inbox.data:
                        return _Done.HAND_OVER
                    transport.close()
                    return _Done.ANSWERED
            head = bytes(inbox.data[:inbox.data.index(b"\r\n\r\n") + 4])
            if peer is None:
                return _Done.HAND_OVER
            target = _connect_target(head)
            if target is not None:
                return await self._judge_tunnel(inbox, transport, head, target, peer, sockname)
            request = _plain_get(head)
            if request is None or not self._answer_blocked(request, transport, peer[0]):
                return _Done.HAND_OVER
            del inbox.data[:len(head)]
            if not request.keep_alive:
                transport.close()
                return _Done.ANSWERED

    def _answer_blocked(self, request: PlainGet, transport: asyncio.Transport, address: str) -> bool:
        """Answer a plain HTTP GET with the block page, as `requestheaders` would; False when it is not blocked
        (or not simply: mitmproxy then has it)."""
        blocked = self.addon.blocked_plain_request(address, request.host, request.port, request.path)
        if blocked is None:
            return False
        decision, query, snapshot = blocked
        body, headers = self.addon.block_page(request.host, decision, snapshot, query.at, request.accept_language,
                                              query)
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        closing = "" if request.keep_alive else "Connection: close\r\n"
        transport.write(f"HTTP/1.1 403 Forbidden\r\n{head}Content-Length: {len(body)}\r\n{closing}\r\n".encode()
                        + (b"" if request.head_only else body))
        return True

    async def _judge_tunnel(self, inbox: Inbox, transport: asyncio.Transport, head: bytes,
                            target: tuple[str, int], peer: tuple[str, int], sockname: tuple[str, int],
                            ) -> _Opened | _Done:
        """A CONNECT to pass through, its destination judged; else how it ended (see `_open`)."""
        if inbox.closed and len(inbox.data) == len(head):
            transport.close()  # a CONNECT and nothing more: a client that gave up (or never meant) to use it
            return _Done.ANSWERED
        host = normalize_host(target[0])
        if host is None or not self.addon.tunnel_passes_through(peer[0], host, target[1], self.addon.snapshot()):
            return _Done.HAND_OVER
        hooks = ServerConnectionHookData(
            connection.Server(address=(host, target[1])),
            connection.Client(peername=peer[:2], sockname=sockname[:2], timestamp_start=time.time()))
        # As mitmproxy would: `server_connect` resolves the host, judges every address and pins a judged one
        # (Vigie's addon; a test's origin map before it). Nothing is connected before the ClientHello, as in
        # mitmproxy's lazy mode: clients open connections they never use.
        await self._hook(ServerConnectHook(hooks))
        if hooks.server.error is not None or hooks.server.address is None:
            transport.write(f"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
                            f"{hooks.server.error or 'no address to connect to'}\n".encode())
            transport.close()
            return _Done.ANSWERED
        return _Opened(head, host, hooks)

    async def _relay(self, inbox: Inbox, transport: asyncio.Transport, opened: _Opened) -> None:
        """Answer the CONNECT, read the ClientHello, and when it names the CONNECT host (or none), connect to the
        judged address and relay."""
        transport.write(ESTABLISHED)
        del inbox.data[:len(opened.head)]
        hello = await _client_hello(inbox)
        if hello is None or not _same_host(hello, opened.host):
            opened.hooks.server.error = "not passed through: no TLS ClientHello for the CONNECT host"
            await self._hook(ServerConnectErrorHook(opened.hooks))  # pins released
            server = None
        else:
            server = await self._connect(opened.hooks, transport)
        if server is None:
            if inbox.closed and not inbox.data:
                transport.close()  # the client left without a byte: browsers open connections they never use
            elif not transport.is_closing():  # mitmproxy intercepts, decides and answers, or tells what failed
                self.hand_over(inbox, transport, replayed_connect=opened.head)
            return
        PROXY_TLS.labels("passthrough").inc()
        transport.set_protocol(Relay(server, lambda: self._transports.discard(transport)))
        server.write(bytes(inbox.data))
        if inbox.closed and server.can_write_eof():
            server.write_eof()

    async def _connect(self, hooks: ServerConnectionHookData,
                       client: asyncio.Transport) -> asyncio.Transport | None:
        """Connect to the address `server_connect` judged and pinned, then `server_connected`, and
        `server_disconnected` when the relay ends; None (and `server_connect_error`) when it fails."""
        server = hooks.server
        assert server.address is not None

        def ended(transport: asyncio.Transport) -> None:
            self._transports.discard(transport)
            self._run(self._hook(ServerDisconnectedHook(hooks), raises=False))

        try:
            transport, relay = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                lambda: Relay(client), *server.address), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            server.error = f"cannot connect to {server.address[0]}:{server.address[1]} ({exc})"
            await self._hook(ServerConnectErrorHook(hooks))
            return None
        self._transports.add(transport)
        relay.ended = functools.partial(ended, transport)
        await self._hook(ServerConnectedHook(hooks))
        return transport

    async def _hook(self, hook: Hook, *, raises: bool = True) -> None:
        """Run a server hook on every addon that has it, in mitmproxy's order (the chain, each addon's children
        after it; an AddonHalt ends it), as `handle_lifecycle` would but without its context manager per addon
        and event, which cost a third of a new tunnel. An exception ends the tunnel (fail closed) unless
        `raises` is False (a hook after the fact: logged)."""
        try:
            for addon in _addons(self.master.addons.chain):
                run = getattr(addon, hook.name, None)
                if callable(run):
                    result = run(*hook.args())
                    if inspect.isawaitable(result):
                        await result
        except AddonHalt:
            return
        except Exception as exc:
            if raises:
                raise
            _failed(exc, f"in the {hook.name} hook")

    def hand_over(self, inbox: Inbox, transport: asyncio.Transport, replayed_connect: bytes = b"") -> None:
        """mitmproxy takes the connection: its reader gets every byte read so far (after `replayed_connect`, a
        CONNECT already answered, whose answer mitmproxy then does not send again)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**16, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        reader.feed_data(replayed_connect + bytes(inbox.data))
        if inbox.closed:
            reader.feed_eof()
        self._transports.discard(transport)
        writer_type = _AlreadyAnswered if replayed_connect else asyncio.StreamWriter
        writer = writer_type(transport, protocol, reader, loop)
        self._run(self.mitmproxy(reader, writer))


class _Opened(NamedTuple):
    head: bytes  # the CONNECT request, as received
    host: str  # its host, normalised
    hooks: ServerConnectionHookData  # the server connection, its address judged and pinned


class _Done(enum.Enum):
    """How `_open` ended when there is no tunnel to relay."""

    HAND_OVER = "mitmproxy takes the connection, with the bytes from its current request on"
    ANSWERED = "the client has its answer, or is gone"



def _failed(exc: Exception, outcome: str) -> None:
    PROXY_ERRORS.labels("tunnel").inc()
    log.error("proxy tunnel failed, %s: %s: %s", outcome, type(exc).__name__, exc)


class PlainGet(NamedTuple):
    host: str  # normalised
    port: int
    path: str  # as sent
    head_only: bool  # HEAD: the same answer without its body
    keep_alive: bool
    accept_language: str | None


def _plain_get(head: bytes) -> PlainGet | None:
    """A plain HTTP GET or HEAD in absolute form whose Host header names the same host, without body or proxy
    credentials; None for anything else (mitmproxy reads and judges every other form)."""
    request_line, _, header_block = head[:-4].partition(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD") or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") \
            or not parts[1].startswith(b"http://"):
        return None
    authority, slash, rest = parts[1][7:].decode("ascii", "replace").partition("/")
    headers: dict[str, str] = {}
    for line in header_block.split(b"\r\n"):
        field, separator, value = line.partition(b":")
        key = field.decode("latin-1").lower()
        if not separator or key in headers or key != key.strip():
            return None  # no headers, a repeated one, or a malformed one: mitmproxy's to judge
        headers[key] = value.strip().decode("latin-1")
    if headers.get("host", "").lower() != authority.lower() or "proxy-authorization" in headers \
            or "transfer-encoding" in headers or headers.get("content-length", "0") != "0" or "@" in authority:
        return None
    split = _authority(authority)
    if split is None:
        return None
    literal, port = split[0], split[1] or 80
    host = normalize_host(literal)
    path = "/" + rest if slash else "/"
    if host is None or path.split("?", 1)[0] in PAC_PATHS:
        return None  # a PAC is served whatever the host's decision: one that fails to load means DIRECT
    keep_alive = parts[2] == b"HTTP/1.1" and headers.get("connection", "").lower() != "close"
    return PlainGet(host, port, path, parts[0] == b"HEAD", keep_alive,
                    headers.get("accept-language"))


def _addons(chain: Iterable[object]) -> Iterator[object]:
    """mitmproxy's addons in the order it runs their hooks: each addon, then its children (a script's addons)."""
    for addon in chain:
        yield addon
        yield from _addons(getattr(addon, "addons", ()))


def _connect_target(head: bytes) -> tuple[str, int] | None:
    """(host, port) of a `CONNECT host:port HTTP/1.x` head without proxy credentials; None for anything else."""
    request_line, _, headers = head.partition(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or parts[0] != b"CONNECT" or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    if b"\nproxy-authorization:" in b"\n" + headers.lower():
        return None  # mitmproxy checks the credentials
    split = _authority(parts[1].decode("ascii", "replace"))
    if split is None or split[1] is None:
        return None
    return split[0], split[1]


def _authority(text: str) -> tuple[str, int | None] | None:
    """`host`, `host:port`, `[v6]` or `[v6]:port` → (the host without brackets, the port or None); None when what
    follows the host is not a port."""
    if text.startswith("["):
        host, _, after = text[1:].partition("]")
        if after and not after.startswith(":"):
            return None
        port = after[1:]
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not port:
        return host, None
    return (host, int(port)) if port.isdigit() and 0 < int(port) < 65536 else None


async def _client_hello(inbox: Inbox) -> ClientHello | None:
    """The client's TLS ClientHello, parsed (mitmproxy's parser); None when what came is not one."""
    while True:
        if bytes(inbox.data[:1]) not in (b"", b"\x16"):
            return None  # not a TLS handshake
        try:
            hello = parse_client_hello(bytes(inbox.data)) if inbox.data else None
        except ValueError:
            return None
        if hello is not None:
            return hello
        if len(inbox.data) > MAX_CLIENT_HELLO or not await inbox.wait():
            return None


def _same_host(hello: ClientHello, host: str) -> bool:
    """Whether the ClientHello's TLS name, when it has one, is the CONNECT host (as `tls_clienthello` requires)."""
    return not hello.sni or normalize_host(hello.sni) == host
