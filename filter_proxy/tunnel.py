"""The proxy's front door: CONNECT tunnels that are passed through undecrypted are opened and relayed here, without
mitmproxy; every other connection is handed to mitmproxy as it arrived.

Most HTTPS a proxy sees is passed through (see addon.py): an allowed host with nothing to inspect. mitmproxy would
accept it, parse it into events, run the hooks and relay each chunk through its layers; here it costs one decision,
one judged connection and two protocols that copy bytes between sockets (`Relay`). The decision is the addon's own,
in the order mitmproxy's hooks take it:

    CONNECT head → client by address, port, decision on the CONNECT host (addon.tunnel_passes_through)
    → mitmproxy's server hooks: the addon resolves the host, judges every address and pins a judged one
    → connected there → "200 Connection established" → the ClientHello: no TLS name, or the CONNECT host → relayed.

Anything else goes to mitmproxy with every byte read so far (`hand_over`), before any answer, so that mitmproxy
answers it as it would have: a request that is not CONNECT, proxy credentials, a host blocked or to inspect. A
destination the hooks refuse, or that does not answer, gets 502 with the reason, and nothing is connected. After
the 200, a ClientHello that is not TLS or names another host goes to mitmproxy with the CONNECT replayed in front
and mitmproxy's own 200 not sent twice (`_AlreadyAnswered`): it intercepts and refuses, as when it had the
connection from the start.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple, cast

from mitmproxy import connection
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
from policy.metrics import PROXY_ERRORS, PROXY_TLS

log = logging.getLogger(__name__)

MAX_HEAD = 16_384  # a CONNECT head longer than this is mitmproxy's to refuse
MAX_CLIENT_HELLO = 65_536  # records of a ClientHello with post-quantum key shares fit well within
READ_TIMEOUT = 30.0  # for the CONNECT head and the ClientHello
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


class TunnelFront:
    """Accepts the proxy's connections (regular mode): passed-through tunnels here, the rest to `mitmproxy`."""

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
        hands the connection to mitmproxy, which decides again (and fails closed if it fails too); after, the
        connection is closed."""
        try:
            opened = await self._open(inbox, transport)
        except Exception as exc:
            _failed(exc, "mitmproxy takes the connection")
            opened = HAND_OVER
        if opened is HAND_OVER:
            return self.hand_over(inbox, transport)
        if opened is None:
            return
        try:
            await self._relay(inbox, transport, opened)
        except Exception as exc:  # a bug here must not leave the connection open and unfiltered
            _failed(exc, "the connection is closed")
            transport.abort()

    async def _open(self, inbox: Inbox, transport: asyncio.Transport) -> _Opened | None:
        """Read the CONNECT head, decide, and judge its destination: the tunnel to open, HAND_OVER when it is not
        one to pass through, None when the client has already been answered (or is gone)."""
        while b"\r\n\r\n" not in inbox.data:
            if len(inbox.data) > MAX_HEAD:
                return HAND_OVER
            if not await inbox.wait():
                if inbox.data:
                    return HAND_OVER
                transport.close()
                return None
        head = bytes(inbox.data[:inbox.data.index(b"\r\n\r\n") + 4])
        if inbox.closed and len(inbox.data) == len(head):
            transport.close()  # a CONNECT and nothing more: a client that gave up (or never meant) to use it
            return None
        target = _connect_target(head)
        peer, sockname = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        host = normalize_host(target[0]) if target is not None else None
        if target is None or host is None or peer is None or not self.addon.tunnel_passes_through(
                peer[0], host, target[1], self.addon.snapshot()):
            return HAND_OVER
        hooks = ServerConnectionHookData(
            connection.Server(address=(host, target[1])),
            connection.Client(peername=peer[:2], sockname=sockname[:2], timestamp_start=time.time()))
        # As mitmproxy would: `server_connect` resolves the host, judges every address and pins a judged one
        # (Vigie's addon; a test's origin map before it). Nothing is connected before the ClientHello, as in
        # mitmproxy's lazy mode: clients open connections they never use.
        await self.master.addons.handle_lifecycle(ServerConnectHook(hooks))
        if hooks.server.error is not None or hooks.server.address is None:
            transport.write(f"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
                            f"{hooks.server.error or 'no address to connect to'}\n".encode())
            transport.close()
            return None
        return _Opened(head, host, hooks)

    async def _relay(self, inbox: Inbox, transport: asyncio.Transport, opened: _Opened) -> None:
        """Answer the CONNECT, read the ClientHello, and when it names the CONNECT host (or none), connect to the
        judged address and relay."""
        transport.write(ESTABLISHED)
        del inbox.data[:len(opened.head)]
        hello = await _client_hello(inbox)
        if hello is None or not _same_host(hello, opened.host):
            opened.hooks.server.error = "not passed through: no TLS ClientHello for the CONNECT host"
            await self.master.addons.handle_lifecycle(ServerConnectErrorHook(opened.hooks))  # pins released
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
        addons, server = self.master.addons, hooks.server
        assert server.address is not None

        def ended(transport: asyncio.Transport) -> None:
            self._transports.discard(transport)
            self._run(addons.handle_lifecycle(ServerDisconnectedHook(hooks)))

        try:
            transport, relay = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                lambda: Relay(client), *server.address), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            server.error = f"cannot connect to {server.address[0]}:{server.address[1]} ({exc})"
            await addons.handle_lifecycle(ServerConnectErrorHook(hooks))
            return None
        self._transports.add(transport)
        relay.ended = functools.partial(ended, transport)
        await addons.handle_lifecycle(ServerConnectedHook(hooks))
        return transport

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


HAND_OVER = _Opened(b"", "", ServerConnectionHookData(connection.Server(address=None), connection.Client(
    peername=("", 0), sockname=("", 0), timestamp_start=0)))  # mitmproxy takes the connection


def _failed(exc: Exception, outcome: str) -> None:
    PROXY_ERRORS.labels("tunnel").inc()
    log.error("proxy tunnel failed, %s: %s: %s", outcome, type(exc).__name__, exc)


def _connect_target(head: bytes) -> tuple[str, int] | None:
    """(host, port) of a `CONNECT host:port HTTP/1.x` head without proxy credentials; None for anything else."""
    request_line, _, headers = head.partition(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or parts[0] != b"CONNECT" or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    if b"\nproxy-authorization:" in b"\n" + headers.lower():
        return None  # mitmproxy checks the credentials
    authority = parts[1].decode("ascii", "replace")
    host, colon, port = authority.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


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
