"""The DNS transports: UDP sockets read in batches, with the exact-bytes and reply caches in front of the
DnsFront; TCP connections, several queries each, under per-client and total caps. They move bytes; what to answer
is the DnsFront's (server.py)."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import struct
import time
from functools import partial
from typing import Protocol

from dns_resolver.fastpath import ExactReplies, ExactReply, PlainQuery, read_plain_query
from dns_resolver.forwarding import UpstreamAnswer
from dns_resolver.server import UNKNOWN_CLIENT, Answered, DnsFront, PlainPlan
from dns_resolver.upstream import UpstreamFailure
from dns_resolver.wire import client_udp_size, truncated
from policy.metrics import DNS_ERRORS, DNS_LATENCY, DNS_RATE_LIMITED, QUERIES, REPLY_CACHE
from policy.model import SocketAddress

log = logging.getLogger(__name__)


class Closable(Protocol):
    def close(self) -> None: ...


# Datagrams read per wake-up before TCP, upstream answers and timers get their turn (~1 ms of cached answers): the
# larger the batch, the larger the burst of answers (see `_UdpListener._send_queued`) and the fewer wake-ups.
RECEIVE_BATCH = 256
RECEIVE_SIZE = 4096  # a query is at most 512 bytes plus EDNS options; anything longer is malformed anyway


class _UdpListener:
    """One UDP socket, read in batches straight from the event loop's readiness callback (a datagram protocol
    costs a Python call and a tuple per packet more). A repeated query is answered from `ExactReplies` by its
    bytes; other cached plain queries from the `ReplyCache`; allowed names are forwarded, the reply sent when the
    upstream calls back; anything else (blocks, rewrites, unusual packets) goes the dnslib way, as a task.

    Which exact replies a source address may get depends on its client's view (rules generation, group, device,
    the profile in force): the address → view map is emptied whenever any of those may have changed."""

    def __init__(self, front: DnsFront, sock: socket.socket, exact_replies: int) -> None:
        self.front = front
        self.sock = sock
        self.tasks: set[asyncio.Task[None]] = set()
        self.exact = ExactReplies(exact_replies)
        self._addresses_valid: tuple[object, int] = (None, -1)  # (snapshot, state version) of the address map
        self._addresses_until = float("inf")  # wall clock: the first change of profile among the mapped groups
        self._hits = REPLY_CACHE.cell("hit")
        self._misses = REPLY_CACHE.cell("miss")
        self._closed = False
        self._outbox: list[tuple[bytes, tuple[str, int]]] = []  # answers to send (see `send`)
        self._send_scheduled = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()

    def send(self, answer: bytes, addr: tuple[str, int]) -> None:
        """Queue `answer`: queued answers leave together once the loop is done with the callbacks of this turn."""
        self._outbox.append((answer, addr))
        self._schedule_send()

    def _schedule_send(self) -> None:
        if not self._send_scheduled:
            self._send_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_queued)

    def _send_queued(self) -> None:
        """Send the queued answers back to back. A send to a client asleep waiting for its answer wakes it, and
        on a virtual machine the wake-up costs the sender more than the send: answers sent one by one between
        reads paid it for most of them, answers sent in a burst find the client awake after the first."""
        outbox, self._outbox, self._send_scheduled = self._outbox, [], False
        if self._closed:
            return
        sendto = self.sock.sendto
        for answer, addr in outbox:
            try:
                sendto(answer, addr)
            except OSError as exc:
                self._not_sent(exc, addr)

    def _not_sent(self, exc: OSError, addr: tuple[str, int]) -> None:
        if isinstance(exc, (BlockingIOError, InterruptedError)):
            DNS_ERRORS.labels("send").inc()  # the socket's send buffer is full: like a lost packet, the client retries
        elif not self._closed:
            DNS_ERRORS.labels("send").inc()
            log.warning("cannot send a DNS answer to %s: %s", addr[0], exc)

    def readable(self) -> None:
        front = self.front
        snapshot, state = front.current_snapshot(), front.current_state()
        if (snapshot, state.version) != self._addresses_valid or front.clock() >= self._addresses_until:
            self.exact.clear()
            self._addresses_valid, self._addresses_until = (snapshot, state.version), float("inf")
        receive, outbox, by_address, limiter = self.sock.recvfrom, self._outbox, self.exact.by_address, \
            front.rate_limiter
        started = time.perf_counter()
        now = time.monotonic()
        hits = 0
        for _ in range(RECEIVE_BATCH):
            try:
                data, addr = receive(RECEIVE_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                if self._closed:
                    return
                continue
            if limiter is not None and not limiter.allow(addr[0], now):
                DNS_RATE_LIMITED.inc()
                continue
            replies = by_address.get(addr[0])
            if replies is not None:
                exact = replies.get(data[2:])
                if exact is not None and now < exact.fresh_until:
                    outbox.append((data[:2] + exact.body, addr))  # `send`, inlined: this is most answers
                    exact.hits += 1
                    exact.counter[0] += 1
                    if exact.count_device is not None:
                        front.count_minute(exact.count_device)
                    hits += 1
                    continue
            try:
                self._answer_other(data, addr, now)
            except Exception:  # a bug: counted and logged; the dnslib path still answers (SERVFAIL at worst)
                DNS_ERRORS.labels("internal").inc()
                log.exception("internal error on the bytes path; answering through dnslib")
                self._answer_later(data, addr, None)
        if outbox:
            self._schedule_send()
        if hits:
            self._hits[0] += hits
            DNS_LATENCY.observe((time.perf_counter() - started) / hits, hits)  # the batch's mean, per answer

    def _answer_other(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        started = time.perf_counter()
        query = read_plain_query(data)
        if query is not None:
            front = self.front
            snapshot = front.current_snapshot()
            client = snapshot.identify(addr[0])  # remembered by the rules' client directory
            if client is None:
                self._answer_later(data, addr, query)  # REFUSED, counted there
                return
            view = front.reply_view(client, snapshot, front.current_state(), front.clock())
            if view is not None:
                replies = self.exact.by_address.get(addr[0])
                if replies is None:
                    replies = self.exact.map_address(addr[0], view)
                    self._addresses_until = min(self._addresses_until, front.view_until(client))
                exact = replies.get(data[2:])
                if exact is not None:  # indexed, but its second is over: age it, or drop it when expired
                    if self.exact.refresh(exact, now):
                        self._answer_exact(exact, query, data, addr)
                        return
                    del replies[data[2:]]
                hit = front.replies.reply(view, query, data)
                if hit is not None:
                    self.send(hit[0], addr)
                    if hit[2]:
                        front.forwarder.prefetch(query.question)
                    entry = hit[1]
                    counter = QUERIES.cell(*entry.labels)
                    counter[0] += 1
                    self._hits[0] += 1
                    self.exact.add(addr[0], data, query, entry, counter, now)
                    if entry.count_device is not None:
                        front.count_minute(entry.count_device)
                    DNS_LATENCY.observe(time.perf_counter() - started)
                    return
            self._misses[0] += 1
            try:
                plan = front.plan_plain(query, client, snapshot, view, started)
            except Exception:  # a bug: counted and logged; the dnslib path below still answers
                DNS_ERRORS.labels("internal").inc()
                log.exception("internal error on the bytes path; answering through dnslib")
                plan = None
            if plan is not None:
                front.forwarder.when_answered(query.question, partial(self._forwarded, data, addr, query, plan))
                return
        self._answer_later(data, addr, query)

    def _answer_exact(self, exact: ExactReply, query: PlainQuery, data: bytes, addr: tuple[str, int]) -> None:
        self.send(data[:2] + exact.body, addr)
        if exact.entry.take_prefetch(time.monotonic()):
            self.front.forwarder.prefetch(query.question)
        exact.counter[0] += 1
        self._hits[0] += 1
        if exact.count_device is not None:
            self.front.count_minute(exact.count_device)

    def _forwarded(self, data: bytes, addr: tuple[str, int], query: PlainQuery, plan: PlainPlan,
                   result: UpstreamAnswer | UpstreamFailure) -> None:
        """The upstream answered (or failed) a plain query: reply, cache, index."""
        try:
            answered = self.front.finish_plain(data, query, plan, result)
        except Exception:
            DNS_ERRORS.labels("internal").inc()
            log.exception("internal error on the bytes path; answering through dnslib")
            answered = None
        if answered is None:
            self._answer_later(data, addr, query)  # blocked by what the answer leads to, or a bug: dnslib answers
            return
        self._deliver(answered, data, addr, query)

    def _answer_later(self, data: bytes, addr: tuple[str, int], query: PlainQuery | None) -> None:
        """The dnslib path, which answers every case (blocks, rewrites, malformed input), as a task."""
        task = asyncio.ensure_future(self._reply(data, addr, query))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reply(self, data: bytes, addr: tuple[str, int], query: PlainQuery | None) -> None:
        answered = await self.front.handle(data, addr[0])
        if answered is not None:
            self._deliver(answered, data, addr, query)

    def _deliver(self, answered: Answered, data: bytes, addr: tuple[str, int], query: PlainQuery | None) -> None:
        if self._closed:
            return
        answer = answered.wire
        if query is not None and answered.lifetime and answered.view is not None:
            # Into the reply cache only: the exact bytes are indexed at the entry's first hit, so that a name
            # asked twice costs one entry there, not two.
            self.front.replies.store(answered.view, query, answer, answered.lifetime, answered.labels,
                                     from_upstream=answered.from_upstream, count_device=answered.count_device,
                                     offsets=answered.ttl_offsets)
        limit = query.udp_size if query is not None else client_udp_size(data)
        if len(answer) > limit:
            answer = truncated(answer)
        self.send(answer, addr)


TCP_CONNECTIONS_PER_CLIENT = 32  # a resolver or a browser keeps a few; thousands would be an attack on our files
TCP_CONNECTIONS_TOTAL = 2000  # per worker, whoever opens them
TCP_IDLE_SECONDS = 10


def tcp_connection_cap() -> int:
    """Open TCP connections a worker accepts: TCP_CONNECTIONS_TOTAL, and never more than half the files the
    process may open, so that upstream sockets, the state store and reloads always find one."""
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY:
        return TCP_CONNECTIONS_TOTAL
    return max(16, min(TCP_CONNECTIONS_TOTAL, soft_limit // 2))


class TcpConnections:
    """The open TCP connections of a worker: per client address, and in all (up to `cap`)."""

    def __init__(self) -> None:
        self.by_address: dict[str, int] = {}
        self.open = 0
        self.cap = tcp_connection_cap()
        self.full = False  # the total cap was reached and said in the log; said again once it frees up

    def admit(self, address: str) -> bool:
        if self.by_address.get(address, 0) >= TCP_CONNECTIONS_PER_CLIENT or self.open >= self.cap:
            if self.open >= self.cap and not self.full:
                self.full = True
                log.warning("%d DNS-over-TCP connections open: new ones are closed until some end", self.open)
            return False
        self.by_address[address] = self.by_address.get(address, 0) + 1
        self.open += 1
        return True

    def release(self, address: str) -> None:
        self.open -= 1
        if self.open < self.cap:
            self.full = False
        remaining = self.by_address.get(address, 1) - 1
        if remaining:
            self.by_address[address] = remaining
        else:
            self.by_address.pop(address, None)


async def _serve_tcp_client(front: DnsFront, connections: TcpConnections, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
    address = writer.get_extra_info("peername")[0]
    if not connections.admit(address):
        DNS_RATE_LIMITED.inc()
        writer.close()
        return
    limiter = front.rate_limiter
    try:
        while True:  # several queries per connection, under the same per-client rate as UDP
            header = await asyncio.wait_for(reader.readexactly(2), timeout=TCP_IDLE_SECONDS)
            packet = await asyncio.wait_for(reader.readexactly(struct.unpack("!H", header)[0]),
                                            timeout=TCP_IDLE_SECONDS)
            if limiter is not None and not limiter.allow(address, time.monotonic()):
                DNS_RATE_LIMITED.inc()
                break
            answered = await front.handle(packet, address)
            if answered is None:
                break
            writer.write(struct.pack("!H", len(answered.wire)) + answered.wire)
            await writer.drain()
            if answered.labels == UNKNOWN_CLIENT:
                break  # REFUSED: a stranger does not keep a connection open
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
        connections.release(address)


RECEIVE_BUFFER_BYTES = 8 * 1024 * 1024


def _enlarge_receive_buffer(sock: socket.socket | None) -> None:
    """Room for ~80,000 queries: a pause of the process (a garbage collection, a reload) must not drop them.
    SO_RCVBUFFORCE may pass net.core.rmem_max (with CAP_NET_ADMIN); otherwise as much as allowed."""
    if sock is None:
        return
    for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if option is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, RECEIVE_BUFFER_BYTES)
            return
        except OSError:
            continue


class ListenError(Exception):
    """A DNS address cannot be listened on (taken by another server, or a privileged port)."""


def bind_udp(listen: tuple[SocketAddress, ...]) -> list[socket.socket]:
    """A non-blocking UDP socket bound on every `host:port` of `listen`, its receive buffer enlarged. Raises
    ListenError."""
    sockets: list[socket.socket] = []
    for entry in listen:
        family = socket.AF_INET6 if entry.is_ipv6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((entry.host, entry.port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            for opened in sockets:
                opened.close()
            raise ListenError(f"cannot listen for DNS on {entry} (UDP): {exc.strerror}") from None
        _enlarge_receive_buffer(sock)
        sockets.append(sock)
    return sockets


async def start_dns_servers(front: DnsFront, listen: tuple[SocketAddress, ...],
                            udp: list[socket.socket] | None = None) -> list[Closable]:
    """Serve UDP and TCP on every `host:port` of `listen`; returns what to close on shutdown. `udp`: sockets
    bound before the workers were forked, one per address, shared by every worker: each takes the next query
    when it is free. TCP listeners are per worker (SO_REUSEPORT) when there are several. Raises ListenError."""
    loop = asyncio.get_running_loop()
    servers: list[Closable] = []
    udp_sockets = udp if udp is not None else bind_udp(listen)
    connections = TcpConnections()  # one count for all the worker's TCP listeners
    for entry, sock in zip(listen, udp_sockets, strict=True):
        listener = _UdpListener(front, sock, max(1, front.cache.exact_replies // len(listen)))
        front.exact_indexes.append(listener.exact)
        loop.add_reader(sock.fileno(), listener.readable)
        servers.append(listener)
        try:
            server = await asyncio.start_server(partial(_serve_tcp_client, front, connections), entry.host,
                                                entry.port, reuse_port=udp is not None or None)
        except OSError as exc:
            for opened in servers:
                opened.close()
            raise ListenError(f"cannot listen for DNS on {entry} (TCP): {exc.strerror}") from None
        servers.append(server)
    return servers
