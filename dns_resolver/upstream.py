"""Forwarding to upstream resolvers: UDP with a timeout and failover, TCP when the answer is truncated.

Each query goes out with a random ID from one of many sockets (random source ports, renewed every hundred
queries), and an answer is accepted only when its ID and question match what was asked: the usual defence against
cache poisoning.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from dns_resolver.fastpath import Records, read_records
from policy.metrics import UPSTREAM_FAILURES, UPSTREAM_LATENCY, UPSTREAM_UP
from policy.model import SocketAddress

log = logging.getLogger(__name__)


class UpstreamFailure(Exception):
    """No upstream gave a usable answer."""


@dataclass
class Upstream:
    address: str
    port: int
    failures: int = 0
    down_until: float = 0.0
    label: str = field(init=False)

    def __post_init__(self) -> None:
        self.label = f"{self.address}:{self.port}"
        UPSTREAM_UP.labels(self.label).set(1)

    def failed(self) -> None:
        self.failures += 1
        if self.failures == 3:
            UPSTREAM_UP.labels(self.label).set(0)
            log.warning("upstream %s gave no usable answer 3 times in a row: the others carry the queries until it "
                        "answers again", self.label)
        if self.failures >= 3:
            # Back off for a while; the other upstreams carry the load meanwhile.
            self.down_until = time.monotonic() + min(30.0, 2.0 * self.failures)

    def succeeded(self) -> None:
        if self.failures >= 3:
            UPSTREAM_UP.labels(self.label).set(1)
            log.warning("upstream %s answers again", self.label)
        self.failures, self.down_until = 0, 0.0


SOCKETS_PER_UPSTREAM = 64
QUERIES_PER_SOCKET = 100
SWEEP_EVERY = 0.05  # seconds between looks for unanswered tries: a timeout ends at most this late


class _RandomBytes:
    """Unpredictable query IDs and socket choices from the kernel's generator, read 4 KiB at a time (a system call
    per number cost more than the rest of choosing)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._next = 0

    def below(self, limit: int) -> int:
        """A uniform number in [0, limit) for limit ≤ 65,536 (rejection sampling: no modulo bias)."""
        ceiling = 65536 - 65536 % limit
        while True:
            if self._next + 2 > len(self._buffer):
                self._buffer, self._next = os.urandom(4096), 0
            value = self._buffer[self._next] << 8 | self._buffer[self._next + 1]
            self._next += 2
            if value < ceiling:
                return value % limit


RANDOM = _RandomBytes()


AnswerHandler = Callable[[bytes], None]
Outcome = Callable[["Records | UpstreamFailure"], None]


class _SharedSocket:
    """One connected UDP socket (one random source port) carrying several queries, told apart by ID; an answer
    counts only when its ID is pending and its question is the one asked. Read straight from the event loop's
    readiness callback: no transport, no future per query."""

    def __init__(self, address: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            self.sock.connect((address, port))
        except OSError:
            self.sock.close()
            raise
        self.pending: dict[int, tuple[bytes, AnswerHandler, Callable[[Exception], None]]] = {}
        self.sent = 0
        self.retired = False
        self.closed = False
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def expect(self, query: bytes, question: bytes, on_answer: AnswerHandler,
               on_error: Callable[[Exception], None]) -> tuple[int, bytes]:
        """`query` under a fresh random ID, waited for from now on: returns the ID and the bytes to send."""
        query_id = RANDOM.below(65536)
        while query_id in self.pending:
            query_id = RANDOM.below(65536)
        self.pending[query_id] = (question.lower(), on_answer, on_error)
        self.sent += 1
        return query_id, struct.pack("!H", query_id) + query[2:]

    def forget(self, query_id: int) -> None:
        self.pending.pop(query_id, None)
        if self.retired and not self.pending:
            self.close()

    def _readable(self) -> None:
        """One datagram per call: this socket rarely holds more, and the loop calls again while it does (reading
        on to an empty socket would cost an exception per answer)."""
        try:
            data = self.sock.recv(65535)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. ECONNREFUSED after an ICMP "port unreachable": nobody listens there
            for _, _, on_error in list(self.pending.values()):
                on_error(exc)
            return
        if len(data) < 12:
            return
        query_id = data[0] << 8 | data[1]
        waiting = self.pending.get(query_id)
        if waiting is None or data[12:12 + len(waiting[0])].lower() != waiting[0]:
            return  # not an answer to a question in flight here: ignore it and keep waiting
        self.forget(query_id)
        waiting[1](data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()


class _SocketPool:
    """SOCKETS_PER_UPSTREAM sockets, each replaced by a fresh one (a new random port) after QUERIES_PER_SOCKET
    queries: opening a socket per query costs more than the rest of a forwarded answer, and a spoofer must still
    guess the port among many and the ID among 65,536, for a port that soon changes."""

    def __init__(self, address: str, port: int) -> None:
        self.address, self.port = address, port
        self.slots: list[_SharedSocket | None] = [None] * SOCKETS_PER_UPSTREAM

    def socket(self) -> _SharedSocket:
        """One of the sockets, at random; a used-up one is retired (closed once its last answer is in)."""
        index = RANDOM.below(SOCKETS_PER_UPSTREAM)
        shared = self.slots[index]
        if shared is None or shared.sent >= QUERIES_PER_SOCKET or shared.closed:
            if shared is not None:
                shared.retired = True
                if not shared.pending:
                    shared.close()
            shared = self.slots[index] = _SharedSocket(self.address, self.port)
        return shared

    def close(self) -> None:
        for shared in self.slots:
            if shared is not None:
                shared.close()


class _Resolution:
    """One question sent to the healthy upstreams in turn until one gives a usable answer: its ID and question
    match, its code is not SERVFAIL or REFUSED, its records can be read, and a truncated answer is fetched again
    over TCP. The answer is handed over read (`Records`): without OPT record, its TTLs found. A question gets two
    tries at least: with a single upstream to ask, a query or answer lost on the way is sent again once (a second
    timeout still ends within a client's usual 5 s)."""

    __slots__ = ("attempt", "outcome", "pool", "query", "question", "remaining", "spare_try", "started", "tries",
                 "upstream")

    def __init__(self, pool: UpstreamPool, query: bytes, question: bytes, outcome: Outcome) -> None:
        self.pool, self.query, self.question, self.outcome = pool, query, question, outcome
        self.remaining = pool.order()
        self.spare_try = len(self.remaining) < 2
        self.upstream: Upstream | None = None
        self.attempt: tuple[_SharedSocket, int] | None = None
        self.started = 0.0
        self.tries = 0  # tells a send of this try, still posted, from one of an earlier try

    def try_next(self) -> None:
        while self.remaining:
            upstream = self.upstream = self.remaining.pop(0)
            self.started = time.perf_counter()
            try:
                shared = self.pool.sockets[upstream.label].socket()
            except OSError as exc:
                self._upstream_failed(exc)
                continue
            query_id, wire = shared.expect(self.query, self.question, self._answered, self._failed)
            self.attempt = (shared, query_id)
            self.tries += 1
            self.pool.expect_by(self)
            self.pool.post(shared, wire, self, self.tries)
            return
        self.outcome(UpstreamFailure("no upstream answered"))

    def _answered(self, answer: bytes) -> None:
        self._stop_waiting()
        if answer[2] & 0x02:  # TC: the full answer needs TCP
            task = asyncio.get_running_loop().create_task(self._over_tcp())
            self.pool.background.add(task)
            task.add_done_callback(self.pool.background.discard)
            return
        self._judge(answer)

    async def _over_tcp(self) -> None:
        assert self.upstream is not None
        wire = struct.pack("!H", RANDOM.below(65536)) + self.query[2:]
        try:
            answer = await self.pool.tcp(self.upstream, wire)
            if answer[:2] != wire[:2] or answer[12:12 + len(self.question)].lower() != self.question.lower():
                raise UpstreamFailure("TCP answer for another question")
        except Exception as exc:  # the I/O boundary: any failure of this upstream means "try the next"
            self._upstream_failed(exc)
            self.try_next()
            return
        self._judge(answer)

    def _judge(self, answer: bytes) -> None:
        assert self.upstream is not None
        if answer[3] & 0x0F in (2, 5):  # SERVFAIL, REFUSED: this upstream cannot help now
            self._upstream_failed(UpstreamFailure(f"rcode {answer[3] & 0x0F}"))
            self.try_next()
            return
        records = read_records(answer, 12 + len(self.question))  # the question was checked: it ends there
        if records is None:
            self._upstream_failed(UpstreamFailure("records that cannot be read"))
            self.try_next()
            return
        self.upstream.succeeded()
        UPSTREAM_LATENCY.observe(time.perf_counter() - self.started)
        self.outcome(records)

    def _failed(self, exc: Exception) -> None:
        """No answer in time, or the socket reported an error."""
        self._stop_waiting()
        self._upstream_failed(exc)
        if not self.remaining and self.spare_try and self.upstream is not None:
            self.spare_try = False
            self.remaining = [self.upstream]
        self.try_next()

    def timed_out(self) -> None:
        if self.attempt is not None:
            self._failed(TimeoutError("no answer in time"))

    def not_sent(self, tries: int, exc: OSError) -> None:
        if tries == self.tries and self.attempt is not None:
            self._failed(exc)

    def _stop_waiting(self) -> None:
        if self.attempt is not None:
            shared, query_id = self.attempt
            self.attempt = None
            shared.forget(query_id)
            self.pool.deadlines.pop(self, None)

    def _upstream_failed(self, exc: Exception) -> None:
        assert self.upstream is not None
        self.upstream.failed()
        UPSTREAM_FAILURES.labels(self.upstream.label).inc()
        log.debug("upstream %s failed: %r", self.upstream.label, exc)


class UpstreamPool:
    def __init__(self, upstreams: tuple[SocketAddress, ...], timeout: float = 1.5) -> None:
        self.upstreams = [Upstream(u.host, u.port) for u in upstreams]
        self.timeout = timeout
        self.sockets = {u.label: _SocketPool(u.address, u.port) for u in self.upstreams}
        self.background: set[asyncio.Task[None]] = set()
        # Resolutions waiting for an answer → when their try times out. One timeout for all: the order of sending
        # is the order of expiry, so one timer sweeps from the front (a timer per query costs more). An answered
        # try leaves at once: only the queries in flight are held, not every query of the last timeout.
        self.deadlines: OrderedDict[_Resolution, float] = OrderedDict()
        self._sweeper: asyncio.TimerHandle | None = None
        # Queries to send once the loop is done with its current callbacks: the misses of one batch of client
        # queries go out together, so the upstream (asleep, on a quiet server) is woken once for them, not once
        # each: a send that wakes a sleeping receiver costs tens of microseconds.
        self._outbox: list[tuple[_SharedSocket, bytes, _Resolution, int]] = []

    def post(self, shared: _SharedSocket, wire: bytes, resolution: _Resolution, tries: int) -> None:
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._send_posted)
        self._outbox.append((shared, wire, resolution, tries))

    def _send_posted(self) -> None:
        outbox, self._outbox = self._outbox, []
        for shared, wire, resolution, tries in outbox:
            if shared.closed:
                resolution.not_sent(tries, OSError("socket closed"))
                continue
            try:
                shared.sock.send(wire)
            except OSError as exc:
                resolution.not_sent(tries, exc)

    def expect_by(self, resolution: _Resolution) -> None:
        """`resolution`'s current try fails unless answered within the timeout."""
        self.deadlines[resolution] = time.monotonic() + self.timeout
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_EVERY, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        deadlines = self.deadlines
        while deadlines:
            resolution, deadline = next(iter(deadlines.items()))
            if deadline > now:
                break
            del deadlines[resolution]
            resolution.timed_out()  # may send a next try: appended, with a later deadline
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_EVERY, self._sweep) if deadlines else None

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for sockets in self.sockets.values():
            sockets.close()

    def order(self) -> list[Upstream]:
        now = time.monotonic()
        healthy = [u for u in self.upstreams if now >= u.down_until]  # not set aside: one clock read for all
        return healthy or list(self.upstreams)

    def resolve_later(self, query: bytes, question: bytes, outcome: Outcome) -> None:
        """Send `query` (any ID: each try gets a random one) to the healthy upstreams in turn; `outcome` gets the
        first usable answer, or an UpstreamFailure when none came."""
        _Resolution(self, query, question, outcome).try_next()

    async def tcp(self, upstream: Upstream, wire: bytes) -> bytes:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(upstream.address, upstream.port),
                                                self.timeout)
        try:
            writer.write(struct.pack("!H", len(wire)) + wire)
            await writer.drain()
            length = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), self.timeout))[0]
            return await asyncio.wait_for(reader.readexactly(length), self.timeout)
        finally:
            writer.close()
