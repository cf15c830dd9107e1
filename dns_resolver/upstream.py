"""Forwarding to upstream resolvers: UDP with a timeout and failover, TCP when the answer is truncated.

Each query goes out from a fresh socket (random source port) with a random ID, and an answer is accepted only when
its ID and question match what was asked: the usual defence against cache poisoning.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
from dataclasses import dataclass, field

from dnslib import DNSRecord

from policy.metrics import UPSTREAM_FAILURES

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

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self.down_until

    def failed(self) -> None:
        self.failures += 1
        if self.failures >= 3:
            # Back off for a while; the other upstreams carry the load meanwhile.
            self.down_until = time.monotonic() + min(30.0, 2.0 * self.failures)

    def succeeded(self) -> None:
        self.failures, self.down_until = 0, 0.0


class _OneAnswer(asyncio.DatagramProtocol):
    def __init__(self, query_id: int, question: bytes) -> None:
        self.query_id = query_id
        self.question = question
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) < 12 or self.answer.done():
            return
        if struct.unpack("!H", data[:2])[0] != self.query_id or data[12:12 + len(self.question)].lower() \
                != self.question.lower():
            return  # not our answer: ignore it and keep waiting
        self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


class UpstreamPool:
    def __init__(self, upstreams: tuple[str, ...], timeout: float = 1.5) -> None:
        self.upstreams = [Upstream(*split_host_port(u)) for u in upstreams]
        self.timeout = timeout

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
            query_id = secrets.randbelow(65536)
            wire = struct.pack("!H", query_id) + query[2:]
            try:
                answer = await self._udp(upstream, wire, query_id, question)
                if answer[2] & 0x02:  # TC: the full answer needs TCP
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
            return answer
        raise UpstreamFailure("no upstream answered")

    async def _udp(self, upstream: Upstream, wire: bytes, query_id: int, question: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _OneAnswer(query_id, question), remote_addr=(upstream.address, upstream.port))
        try:
            transport.sendto(wire)
            return await asyncio.wait_for(protocol.answer, self.timeout)
        finally:
            transport.close()

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
