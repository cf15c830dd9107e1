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
from dataclasses import dataclass, field
from typing import cast

from dnslib import DNSRecord

from policy.metrics import UPSTREAM_FAILURES, UPSTREAM_LATENCY, UPSTREAM_UP

log = logging.getLogger(__name__)


class UpstreamFailure(Exception):
    """No upstream gave a usable answer."""


def split_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


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

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self.down_until

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


class _SharedSocket(asyncio.DatagramProtocol):
    """One connected UDP socket (one random source port) carrying several queries, told apart by ID; an answer
    counts only when its ID is pending and its question is the one asked."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, tuple[bytes, asyncio.Future[bytes]]] = {}
        self.sent = 0
        self.retired = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) < 12:
            return
        entry = self.pending.get(data[0] << 8 | data[1])
        if entry is None or data[12:12 + len(entry[0])].lower() != entry[0]:
            return  # not an answer to a question in flight here: ignore it and keep waiting
        if not entry[1].done():
            entry[1].set_result(data)

    def error_received(self, exc: Exception) -> None:
        self._fail_all(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(exc or ConnectionError("socket closed"))

    def _fail_all(self, exc: Exception) -> None:
        for _, future in self.pending.values():
            if not future.done():
                future.set_exception(exc)

    def done_with(self, query_id: int) -> None:
        self.pending.pop(query_id, None)
        if self.retired and not self.pending and self.transport is not None:
            self.transport.close()


class _SocketPool:
    """SOCKETS_PER_UPSTREAM sockets, each replaced by a fresh one (a new random port) after QUERIES_PER_SOCKET
    queries: opening a socket per query costs more than the rest of a forwarded answer, and a spoofer must still
    guess the port among many and the ID among 65,536, for a port that soon changes."""

    def __init__(self, address: str, port: int) -> None:
        self.address, self.port = address, port
        self.slots: list[_SharedSocket | None] = [None] * SOCKETS_PER_UPSTREAM

    async def query(self, wire: bytes, question: bytes, timeout: float) -> bytes:
        loop = asyncio.get_running_loop()
        index = RANDOM.below(SOCKETS_PER_UPSTREAM)
        shared = self.slots[index]
        if shared is None or shared.sent >= QUERIES_PER_SOCKET or shared.transport is None \
                or shared.transport.is_closing():
            if shared is not None:
                shared.retired = True
                if not shared.pending and shared.transport is not None:
                    shared.transport.close()
            _, shared = await loop.create_datagram_endpoint(_SharedSocket, sock=self._connected_socket())
            self.slots[index] = shared
        query_id = RANDOM.below(65536)
        while query_id in shared.pending:
            query_id = RANDOM.below(65536)
        future: asyncio.Future[bytes] = loop.create_future()
        shared.pending[query_id] = (question.lower(), future)
        shared.sent += 1
        expiry = loop.call_later(timeout, _expire, future)
        try:
            assert shared.transport is not None
            shared.transport.sendto(struct.pack("!H", query_id) + wire[2:])
            return await future
        finally:
            expiry.cancel()
            shared.done_with(query_id)

    def _connected_socket(self) -> socket.socket:
        """A UDP socket on a new random port, connected to the upstream (made here: given an address instead, the
        event loop would resolve it in a thread pool for every new socket)."""
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect((self.address, self.port))
        except OSError:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        for shared in self.slots:
            if shared is not None and shared.transport is not None:
                shared.transport.close()


def _expire(future: asyncio.Future[bytes]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("no answer in time"))


class UpstreamPool:
    def __init__(self, upstreams: tuple[str, ...], timeout: float = 1.5) -> None:
        self.upstreams = [Upstream(*split_host_port(u)) for u in upstreams]
        self.timeout = timeout
        self._sockets = {u.label: _SocketPool(u.address, u.port) for u in self.upstreams}

    def close(self) -> None:
        for sockets in self._sockets.values():
            sockets.close()

    def _order(self) -> list[Upstream]:
        healthy = [u for u in self.upstreams if u.healthy]
        return healthy or list(self.upstreams)

    async def resolve(self, request: DNSRecord) -> DNSRecord:
        """Forward `request` (its ID is replaced) and return the parsed answer. Raises UpstreamFailure."""
        query = bytes(request.pack())
        question = query[12:]
        return DNSRecord.parse(await self.resolve_wire(query, question[: _question_length(question)]))

    async def resolve_wire(self, query: bytes, question: bytes) -> bytes:
        """Send `query` (any ID: each try gets a random one) to the healthy upstreams in turn; the first answer
        whose ID and question match and whose code is not SERVFAIL or REFUSED wins. Raises UpstreamFailure."""
        for upstream in self._order():
            started = time.perf_counter()
            try:
                answer = await self._sockets[upstream.label].query(query, question, self.timeout)
                if answer[2] & 0x02:  # TC: the full answer needs TCP
                    wire = struct.pack("!H", RANDOM.below(65536)) + query[2:]
                    answer = await self._tcp(upstream, wire)
                    if answer[:2] != wire[:2] or answer[12:12 + len(question)].lower() != question.lower():
                        raise UpstreamFailure("TCP answer for another question")
                if answer[3] & 0x0F in (2, 5):  # SERVFAIL, REFUSED: this upstream cannot help now
                    raise UpstreamFailure(f"rcode {answer[3] & 0x0F}")
            except Exception as exc:  # the I/O boundary: any failure of this upstream means "try the next"
                upstream.failed()
                UPSTREAM_FAILURES.labels(upstream.label).inc()
                log.debug("upstream %s failed: %r", upstream.label, exc)
                continue
            upstream.succeeded()
            UPSTREAM_LATENCY.observe(time.perf_counter() - started)
            return answer
        raise UpstreamFailure("no upstream answered")

    async def _tcp(self, upstream: Upstream, wire: bytes) -> bytes:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(upstream.address, upstream.port),
                                                self.timeout)
        try:
            writer.write(struct.pack("!H", len(wire)) + wire)
            await writer.drain()
            length = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), self.timeout))[0]
            return await asyncio.wait_for(reader.readexactly(length), self.timeout)
        finally:
            writer.close()


def _question_length(section: bytes) -> int:
    """Length of the first question (name + type + class) at the start of `section`."""
    index = 0
    while index < len(section) and section[index] != 0:
        index += section[index] + 1
    return index + 5
