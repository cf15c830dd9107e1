"""Upstream answers by question, as bytes: a cache that honours TTLs (clamped) and negative answers, one upstream
query for many identical questions in flight, and serve-stale (RFC 8767) when no upstream answers.

Questions go upstream lower-cased with Vigie's own EDNS record and nothing else: a client's EDNS client-subnet,
cookies or padding never leave the server (privacy), and the answer does not depend on who asked first.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass

from dns_resolver.fastpath import ttl_offsets
from dns_resolver.upstream import UpstreamFailure, UpstreamPool
from policy.metrics import DNS_STALE_ANSWERS

# ID 0, RD set, one question, one additional record (the OPT below).
_QUERY_HEADER = b"\x00\x00\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01"
# Root name, type OPT, UDP size 1232 (the DNS flag day 2020 value), no extended flags, no options.
OUR_OPT = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
STALE_TTL = 30  # RFC 8767's recommendation for an answer served stale
MAX_ENTRIES = 20_000  # upstream answers by question (the reply cache in front of it answers the popular ones)
_TTL = struct.Struct("!I")


@dataclass(slots=True)
class _Entry:
    wire: bytes
    offsets: list[int]  # TTL offsets from the end of the question
    question_end: int
    stored_at: float
    lifetime: float


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    """An upstream answer with its TTLs aged to now; `lifetime` is how long it stays valid (0 when stale)."""

    wire: bytes
    question_end: int
    offsets: list[int]
    lifetime: float

    @property
    def rcode(self) -> int:
        return self.wire[3] & 0x0F


def question_end(wire: bytes) -> int:
    index = 12
    while wire[index] != 0:
        index += wire[index] + 1
    return index + 5


def age_ttls(wire: bytes, start: int, offsets: list[int], elapsed: int, floor: int = 0) -> bytes:
    """`wire` with every TTL lowered by `elapsed` seconds (never under `floor`)."""
    if not elapsed and not floor:
        return wire
    aged = bytearray(wire)
    for offset in offsets:
        ttl = _TTL.unpack_from(aged, start + offset)[0]
        _TTL.pack_into(aged, start + offset, max(floor, ttl - elapsed))
    return bytes(aged)


class Forwarder:
    def __init__(self, pool: UpstreamPool, *, max_ttl: int = 86_400, stale_seconds: int = 86_400,
                 max_entries: int = MAX_ENTRIES) -> None:
        self.pool = pool
        self.max_ttl = max_ttl
        self.stale_seconds = stale_seconds
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self._in_flight: dict[bytes, asyncio.Future[_Entry]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._max = max_entries

    def __len__(self) -> int:
        return len(self._cache)

    async def answer(self, question: bytes, *, refresh: bool = False) -> UpstreamAnswer:
        """The answer to `question` (lower-cased name, type, class); `refresh` asks upstream even if cached.
        Raises UpstreamFailure when no upstream answers and nothing, not even stale, is cached."""
        now = time.monotonic()
        entry = self._cache.get(question)
        if entry is not None and not refresh and now < entry.stored_at + entry.lifetime:
            return self._aged(entry, now)
        pending = self._in_flight.get(question)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._in_flight[question] = pending
            try:
                fresh = await self._fetch(question)
            except UpstreamFailure as exc:
                pending.set_exception(exc)
                pending.exception()  # the waiters get it; nobody else must retrieve it
                return self._stale_or_raise(question, exc)
            except BaseException as exc:
                pending.set_exception(UpstreamFailure(f"cancelled: {exc!r}"))
                pending.exception()
                raise
            else:
                pending.set_result(fresh)
            finally:
                del self._in_flight[question]
            return self._aged(fresh, fresh.stored_at)
        try:
            shared = await asyncio.shield(pending)
        except UpstreamFailure as exc:
            return self._stale_or_raise(question, exc)
        return self._aged(shared, time.monotonic())

    def prefetch(self, question: bytes) -> None:
        """Fetch `question` again in the background (unless already in flight); failures leave the entry as is."""
        if question in self._in_flight:
            return
        task = asyncio.get_running_loop().create_task(self._refresh(question))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh(self, question: bytes) -> None:
        with contextlib.suppress(UpstreamFailure):
            await self.answer(question, refresh=True)

    async def _fetch(self, question: bytes) -> _Entry:
        wire = await self.pool.resolve_wire(_QUERY_HEADER + question + OUR_OPT, question)
        end = question_end(wire)
        offsets = ttl_offsets(wire, end) or []
        entry = _Entry(wire, offsets, end, time.monotonic(), 0.0)
        rcode = wire[3] & 0x0F
        if rcode in (0, 3) and offsets:  # NOERROR or NXDOMAIN, with at least one TTL (the SOA for negatives)
            entry.lifetime = min(self.max_ttl, min(_TTL.unpack_from(wire, end + o)[0] for o in offsets))
            if entry.lifetime >= 1:
                self._cache[question] = entry
                self._cache.move_to_end(question)
                if len(self._cache) > self._max:
                    self._cache.popitem(last=False)
        return entry

    def _stale_or_raise(self, question: bytes, failure: UpstreamFailure) -> UpstreamAnswer:
        entry = self._cache.get(question)
        now = time.monotonic()
        if entry is None or now > entry.stored_at + entry.lifetime + self.stale_seconds:
            raise failure
        DNS_STALE_ANSWERS.inc()
        wire = age_ttls(entry.wire, entry.question_end, entry.offsets, 10**9, floor=STALE_TTL)
        return UpstreamAnswer(wire, entry.question_end, entry.offsets, 0.0)

    @staticmethod
    def _aged(entry: _Entry, now: float) -> UpstreamAnswer:
        elapsed = int(now - entry.stored_at)
        wire = age_ttls(entry.wire, entry.question_end, entry.offsets, elapsed)
        return UpstreamAnswer(wire, entry.question_end, entry.offsets, max(0.0, entry.lifetime - elapsed))
