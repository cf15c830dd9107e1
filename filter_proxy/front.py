"""The proxy's front door: CONNECT tunnels that are passed through undecrypted are opened and relayed here, plain
HTTP GETs decided here (the block page, or forwarded unchanged), without mitmproxy; everything else is handed to
mitmproxy as it arrived.

Most HTTPS a proxy sees is passed through (see addon.py): an allowed host with nothing to inspect. mitmproxy would
accept it, parse it into events, run the hooks and relay each chunk through its layers; here it costs one decision,
one judged connection and two protocols that copy bytes between sockets (`relays.Relay`). The decision is the
addon's own, in the order mitmproxy's hooks take it:

    CONNECT head → client by address, port, decision on the CONNECT host (addon.tunnel_passes_through)
    → mitmproxy's server hooks: the addon resolves the host, judges every address and pins a judged one
    → "200 Connection established" → the ClientHello (client_hello.py): no TLS name, or the CONNECT host
    → connected to the judged address → relayed.

A plain HTTP GET or HEAD (`http1.plain_get`: absolute form, no body, a strict head) is decided as
`requestheaders` would (`addon.plain_request`): blocked, it gets the block page; allowed with nothing to rewrite,
it is sent to the judged address and its response relayed to its end (`relays.ResponseRelay`); then the next
request on the connection is read the same way. Anything else goes to mitmproxy with every byte from that request
on (`hand_over`), before any answer, so that mitmproxy answers it as it would have: another method, a safe-search
host, a PAC, proxy credentials, a host blocked or to inspect over TLS. A destination the hooks refuse, or that does
not answer, gets 502 with the reason, and nothing is connected. After the 200, a ClientHello that is not TLS or
names another host goes to mitmproxy with the CONNECT replayed in front and mitmproxy's own 200 not sent twice
(`_AlreadyAnswered`): it intercepts and refuses, as when it had the connection from the start.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import inspect
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import NamedTuple, cast

from mitmproxy import connection
from mitmproxy.exceptions import AddonHalt
from mitmproxy.hooks import Hook
from mitmproxy.master import Master
from mitmproxy.proxy.server_hooks import (
    ServerConnectedHook,
    ServerConnectErrorHook,
    ServerConnectHook,
    ServerConnectionHookData,
    ServerDisconnectedHook,
)

from filter_proxy.addon import VigieAddon, normalize_host
from filter_proxy.client_hello import REFUSED, Hello, State, read_client_hello
from filter_proxy.http1 import PlainGet, authority_parts, connect_target, error_response, plain_get
from filter_proxy.relays import Relay, ResponseRelay
from policy.decision import Action, Decision, Query
from policy.metrics import PROXY_ERRORS, PROXY_TLS
from policy.snapshot import Snapshot

log = logging.getLogger(__name__)

MAX_HEAD = 16_384  # a request head longer than this is mitmproxy's to refuse
MAX_CLIENT_HELLO = 65_536  # records of a ClientHello with post-quantum key shares fit well within
MAX_BUFFERED = 65_536  # a client's bytes held while the front has not taken them: reading pauses beyond
READ_TIMEOUT = 30.0  # for a request head and the ClientHello
CONNECT_TIMEOUT = 10.0
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
# mitmproxy's options that change or record plain HTTP flows, and the hooks a script would do that with
_REQUEST_OPTIONS = ("anticache", "anticomp", "block_list", "hardump", "map_local", "map_remote", "modify_body",
                    "modify_headers", "proxyauth", "save_stream_file", "server_replay", "stickyauth", "stickycookie")
_REQUEST_HOOKS = ("requestheaders", "request", "responseheaders", "response", "error")

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Inbox(asyncio.Protocol):
    """A connection's bytes, kept until the front knows where they go; `wait` until there are more. Reading
    pauses while more than MAX_BUFFERED bytes wait (a client sending ahead of a forwarded response)."""

    def __init__(self, connected: Callable[[Inbox, asyncio.Transport], None]) -> None:
        self.data = bytearray()
        self.closed = False
        self._waiter: asyncio.Future[bool] | None = None  # `wait`'s, while it waits
        self._connected = connected
        self._transport: asyncio.Transport | None = None
        self._reading = True
        self.lost: Callable[[], None] = lambda: None
        self.writes_paused: Callable[[bool], None] = lambda paused: None  # the client cannot take more (or can)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self._connected(self, self._transport)

    def data_received(self, data: bytes) -> None:
        self.data += data
        self._wake()
        if len(self.data) > MAX_BUFFERED and self._reading and self._transport is not None:
            self._reading = False
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return True  # half-open: a hand-over may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        self.lost()

    def _wake(self, more: bool = True) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(more)

    def pause_writing(self) -> None:
        self.writes_paused(True)

    def resume_writing(self) -> None:
        self.writes_paused(False)

    def read_on(self) -> None:
        """Read again (the buffered bytes are being taken)."""
        if not self._reading and self._transport is not None:
            self._reading = True
            self._transport.resume_reading()

    async def wait(self) -> bool:
        """Wait for more bytes; False when the client has closed or READ_TIMEOUT passed. A future and a timer
        (asyncio.wait_for would make a task of each wait: a tenth of a new tunnel's cost)."""
        if self.closed:
            return False
        self.read_on()
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_later(READ_TIMEOUT, self._wake, False)
        try:
            more = await self._waiter
        finally:
            timer.cancel()
            self._waiter = None
        return more and (not self.closed or bool(self.data))


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
    """Accepts the proxy's connections (regular mode): tunnels passed through and plain GETs blocked or forwarded
    unchanged here, the rest to `mitmproxy`."""

    def __init__(self, addon: VigieAddon, master: Master, mitmproxy: StreamHandler) -> None:
        self.addon = addon
        self.master = master
        self.mitmproxy = mitmproxy
        self._tasks: set[asyncio.Task[None]] = set()
        self._transports: set[asyncio.Transport] = set()  # open, clients' and origins', while this front has them
        self._options_change_requests = False
        self._hooks: dict[str, tuple[Callable[..., object], ...]] = {}  # see `_hook_methods`
        self._ids = itertools.count(1)
        self._hooks_for: tuple[int, ...] = ()
        self._scripts_change_requests = False
        self._options_changed(set())
        master.options.changed.connect(self._options_changed)

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
        """Answer the plain requests, open the tunnel and relay it; anything else to mitmproxy. A failure before
        the current request has an answer hands the connection to mitmproxy with that request, which decides again
        (and fails closed, counted, if it fails too); one while relaying a tunnel closes it, counted."""
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
        """Read request heads: answer the plain HTTP ones the addon blocks or lets through unchanged (keep-alive),
        and for a CONNECT to pass through, judge its destination. The tunnel to open; else how it ended (`_Done`)."""
        peer, sockname = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        origin = _Origin()  # the connection the plain requests of this client go to, while they name one host
        inbox.lost = functools.partial(_both_end, inbox.lost, origin.close)  # a response no one waits for
        try:
            while True:
                head = await _next_head(inbox, transport)
                if isinstance(head, _Done) or peer is None:
                    return head if isinstance(head, _Done) else _Done.HAND_OVER
                target = connect_target(head)
                if target is not None:
                    return await self._judge_tunnel(inbox, transport, head, target, peer, sockname)
                request = plain_get(head)
                if request is None or request.upgrade or self._mitmproxy_changes_requests():
                    return _Done.HAND_OVER
                judged = self.addon.plain_request(peer[0], request.host, request.port, request.path)
                if judged is None:
                    return _Done.HAND_OVER
                if judged[0].action is Action.ALLOW:
                    goes_on = await self._forward(request, inbox, transport, _Peers(peer, sockname), origin)
                else:
                    goes_on = self._answer_blocked(request, judged, transport)
                del inbox.data[:len(head)]  # answered: a fault before this hands mitmproxy the request again
                if not goes_on:
                    transport.close()
                    return _Done.ANSWERED
        finally:
            origin.close()

    def _answer_blocked(self, request: PlainGet, blocked: tuple[Decision, Query, Snapshot],
                        transport: asyncio.Transport) -> bool:
        """Answer a plain HTTP GET with the block page, as `requestheaders` would; whether the connection goes on."""
        decision, query, snapshot = blocked
        body, headers = self.addon.block_page(request.host, decision, snapshot, query.at, request.accept_language,
                                              query)
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        closing = "" if request.keep_alive else "Connection: close\r\n"
        transport.write(f"HTTP/1.1 403 Forbidden\r\n{head}Content-Length: {len(body)}\r\n{closing}\r\n".encode()
                        + (b"" if request.head_only else body))
        return request.keep_alive

    async def _forward(self, request: PlainGet, inbox: Inbox, transport: asyncio.Transport, peers: _Peers,
                       origin: _Origin) -> bool:
        """Send an allowed plain request to its origin, over the connection of the previous one when it named the
        same host and port, else over a new one to the address `server_connect` judged; the response is relayed
        as it comes (`ResponseRelay`). Whether the client's connection goes on."""
        if not origin.serves(request.host, request.port):
            origin.close()
            hooks = await self._judged_destination(request.host, request.port, peers)
            connected = None if isinstance(hooks, str) else await self._connect(hooks, ResponseRelay, transport)
            if connected is None:
                reason = hooks if isinstance(hooks, str) else hooks.server.error or "the server cannot be reached"
                transport.write(error_response("502 Bad Gateway", reason))
                return False
            origin.opened(request.host, request.port, *connected)
            inbox.writes_paused = origin.pause_reading
        assert origin.relay is not None and origin.transport is not None
        response = origin.relay.expect(request.head_only)
        origin.transport.write(request.origin_form)
        reusable = await response
        if not reusable:
            origin.close()
        return reusable and request.keep_alive and not transport.is_closing()

    def _options_changed(self, updated: set[str]) -> None:
        self._hooks.clear()
        options = self.master.options
        self._options_change_requests = any(
            name in options and getattr(options, name) != options.default(name) for name in _REQUEST_OPTIONS)

    def _mitmproxy_changes_requests(self) -> bool:
        """Whether a mitmproxy option or an admin's script would change or record plain requests (`--set
        modify_headers=…`, `--set scripts=` with request hooks): mitmproxy then answers them all."""
        self._follow_addons()
        return self._options_change_requests or self._scripts_change_requests

    async def _judged_destination(self, host: str, port: int, peers: _Peers) -> ServerConnectionHookData | str:
        """The server connection to `host:port`, its address resolved, judged and pinned by mitmproxy's
        `server_connect` hooks (the addon's; a test's origin map before it) as mitmproxy would; or why not."""
        # Ids from a counter: uuid4's getrandom call for two connections was a twentieth of a new tunnel; the ids
        # are only keys for the hooks (the addon's pins and known clients), unique in this process either way.
        number = next(self._ids)
        hooks = ServerConnectionHookData(
            connection.Server(address=(host, port), id=f"front-server-{number}"),
            connection.Client(peername=peers.client[:2], sockname=peers.listener[:2], timestamp_start=time.time(),
                              id=f"front-client-{number}"))
        await self._hook(ServerConnectHook(hooks))
        if hooks.server.error is not None or hooks.server.address is None:
            return hooks.server.error or "no address to connect to"
        return hooks

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
        # Nothing is connected before the ClientHello, as in mitmproxy's lazy mode: clients open connections they
        # never use.
        hooks = await self._judged_destination(host, target[1], _Peers(peer, sockname))
        if isinstance(hooks, str):
            transport.write(error_response("502 Bad Gateway", hooks))
            transport.close()
            return _Done.ANSWERED
        return _Opened(head, host, target[1], hooks)

    async def _relay(self, inbox: Inbox, transport: asyncio.Transport, opened: _Opened) -> None:
        """Answer the CONNECT, read the ClientHello, and when it names the CONNECT host (or none), connect to the
        judged address and relay."""
        transport.write(ESTABLISHED)
        del inbox.data[:len(opened.head)]
        hello = await _tls_name(inbox)
        if not _same_host(hello, opened.host, opened.port):
            opened.hooks.server.error = "not passed through: no TLS ClientHello for the CONNECT host"
            await self._hook(ServerConnectErrorHook(opened.hooks))  # pins released
            server = None
        else:
            connected = await self._connect(opened.hooks, Relay, transport)
            server = connected[0] if connected else None
        if server is None:
            if inbox.closed and not inbox.data:
                transport.close()  # the client left without a byte: browsers open connections they never use
            elif not transport.is_closing():  # mitmproxy intercepts, decides and answers, or tells what failed
                self.hand_over(inbox, transport, replayed_connect=opened.head)
            return
        PROXY_TLS.labels("passthrough").inc()
        inbox.read_on()
        back = Relay(server)
        back.ended = lambda: self._transports.discard(transport)
        transport.set_protocol(back)
        server.write(bytes(inbox.data))
        if inbox.closed and server.can_write_eof():
            server.write_eof()

    async def _connect(self, hooks: ServerConnectionHookData, relay: Callable[[asyncio.Transport], _Relays],
                       client: asyncio.Transport) -> tuple[asyncio.Transport, _Relays] | None:
        """Connect to the address `server_connect` judged and pinned, with `relay(client)` as the protocol, then
        `server_connected`, and `server_disconnected` when the connection ends; None (and `server_connect_error`)
        when it fails."""
        server = hooks.server
        assert server.address is not None

        def ended(transport: asyncio.Transport) -> None:
            self._transports.discard(transport)
            self._hook_after(ServerDisconnectedHook(hooks))

        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                transport, protocol = await asyncio.get_running_loop().create_connection(
                    lambda: relay(client), *server.address)
        except (OSError, TimeoutError) as exc:
            server.error = f"cannot connect to {server.address[0]}:{server.address[1]} ({exc})"
            await self._hook(ServerConnectErrorHook(hooks))
            return None
        self._transports.add(transport)
        protocol.ended = functools.partial(ended, transport)
        await self._hook(ServerConnectedHook(hooks))
        return transport, protocol

    async def _hook(self, hook: Hook) -> None:
        """Run a server hook on every addon that has it, in mitmproxy's order (the chain, each addon's children
        after it; an AddonHalt ends it), as `handle_lifecycle` would but without its context manager per addon
        and event, which cost a third of a new tunnel. An exception ends the tunnel (fail closed)."""
        try:
            for run in self._hook_methods(hook.name):
                result = run(*hook.args())
                if inspect.isawaitable(result):
                    await result
        except AddonHalt:
            return

    def _hook_after(self, hook: Hook) -> None:
        """A hook after the fact (`server_disconnected`), run at once rather than as a task of its own: an
        addon's coroutine is scheduled; a failure is logged and counted, there being nothing left to block."""
        try:
            for run in self._hook_methods(hook.name):
                result = run(*hook.args())
                if inspect.isawaitable(result):
                    self._run(_logged(result, hook.name))
        except AddonHalt:
            return
        except Exception as exc:
            _failed(exc, f"in the {hook.name} hook")

    def _hook_methods(self, name: str) -> tuple[Callable[..., object], ...]:
        """The addons' methods for hook `name`, in mitmproxy's order; found again when the addons change
        (`_follow_addons`) or an option does (scripts reordered)."""
        self._follow_addons()
        methods = self._hooks.get(name)
        if methods is None:
            methods = self._hooks[name] = tuple(
                run for addon in _addons(self.master.addons.chain)
                if callable(run := getattr(addon, name, None)))
        return methods

    def _follow_addons(self) -> None:
        """What depends on mitmproxy's addons (the hooks' methods, whether a script changes requests), worked out
        again when one is added or removed: a script loaded or reloaded (mitmproxy registers every addon, children
        included, in `lookup`). The cache holds the addons, so their ids are not reused meanwhile."""
        registered = tuple(map(id, self.master.addons.lookup.values()))
        if registered == self._hooks_for:
            return
        self._hooks.clear()
        self._hooks_for = registered
        self._scripts_change_requests = any(
            not type(addon).__module__.startswith("mitmproxy.") and not isinstance(addon, VigieAddon)
            and any(callable(getattr(addon, hook, None)) for hook in _REQUEST_HOOKS)
            for addon in _addons(self.master.addons.chain))

    def hand_over(self, inbox: Inbox, transport: asyncio.Transport, replayed_connect: bytes = b"") -> None:
        """mitmproxy takes the connection: its reader gets every byte read so far (after `replayed_connect`, a
        CONNECT already answered, whose answer mitmproxy then does not send again)."""
        loop = asyncio.get_running_loop()
        inbox.read_on()
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


_Relays = Relay | ResponseRelay


class _Peers(NamedTuple):
    client: tuple[str, int]  # the client's address and port (a 4-tuple on IPv6)
    listener: tuple[str, int]  # the proxy's own


class _Origin:
    """The connection to an origin that a client's plain requests go to, while they name its host and port."""

    host: str | None = None
    port = 0
    transport: asyncio.Transport | None = None
    relay: ResponseRelay | None = None

    def serves(self, host: str, port: int) -> bool:
        return self.transport is not None and not self.transport.is_closing() and (host, port) == (self.host,
                                                                                                  self.port)

    def opened(self, host: str, port: int, transport: asyncio.Transport, relay: _Relays) -> None:
        assert isinstance(relay, ResponseRelay)
        self.host, self.port, self.transport, self.relay = host, port, transport, relay

    def pause_reading(self, paused: bool) -> None:
        """The client cannot take more of the response (or can again)."""
        if self.transport is not None and not self.transport.is_closing():
            (self.transport.pause_reading if paused else self.transport.resume_reading)()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.host, self.transport, self.relay = None, None, None


class _Opened(NamedTuple):
    head: bytes  # the CONNECT request, as received
    host: str  # its host, normalised
    port: int
    hooks: ServerConnectionHookData  # the server connection, its address judged and pinned


class _Done(enum.Enum):
    """How `_open` ended when there is no tunnel to relay."""

    HAND_OVER = "mitmproxy takes the connection, with the bytes from its current request on"
    ANSWERED = "the client has its answer, or is gone"


async def _logged(work: Awaitable[object], hook: str) -> None:
    try:
        await work
    except Exception as exc:
        _failed(exc, f"in the {hook} hook")


def _failed(exc: Exception, outcome: str) -> None:
    PROXY_ERRORS.labels("tunnel").inc()
    log.error("proxy tunnel failed, %s: %s: %s", outcome, type(exc).__name__, exc)


def _both_end(first: Callable[[], None], second: Callable[[], None]) -> None:
    first()
    second()


async def _next_head(inbox: Inbox, transport: asyncio.Transport) -> bytes | _Done:
    """The next request head the client sent; or how the connection ended (closed, or bytes that are no head
    of a size the front reads: mitmproxy's)."""
    while b"\r\n\r\n" not in inbox.data:
        if len(inbox.data) > MAX_HEAD:
            return _Done.HAND_OVER
        if not await inbox.wait():
            if inbox.data:
                return _Done.HAND_OVER
            transport.close()
            return _Done.ANSWERED
    return bytes(inbox.data[:inbox.data.index(b"\r\n\r\n") + 4])


def _addons(chain: Iterable[object]) -> Iterator[object]:
    """mitmproxy's addons in the order it runs their hooks: each addon, then its children (a script's addons)."""
    for addon in chain:
        yield addon
        yield from _addons(getattr(addon, "addons", ()))


async def _tls_name(inbox: Inbox) -> Hello:
    """The client's TLS ClientHello, read (`client_hello.read_client_hello`) once it has all arrived."""
    while True:
        hello = read_client_hello(bytes(inbox.data))
        if hello.state is not State.MORE:
            return hello
        if len(inbox.data) > MAX_CLIENT_HELLO or not await inbox.wait():
            return REFUSED


def _same_host(hello: Hello, host: str, port: int) -> bool:
    """Whether the ClientHello names the CONNECT host, or none (as `tls_clienthello` requires). A name with a
    port (some HTTP clients send `host:port`) must name the CONNECT port too."""
    if hello.state is not State.READ:
        return False
    if hello.server_name is None:
        return True
    named = authority_parts(hello.server_name)
    return named is not None and normalize_host(named[0]) == host and named[1] in (None, port)
