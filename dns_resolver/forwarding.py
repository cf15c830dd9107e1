"""Upstream answers by question, as bytes: a cache that honours TTLs (clamped) and negative answers (the DNS
front's one `BoundedCache`), one upstream query for many identical questions in flight, and serve-stale (RFC 8767)
when no upstream answers.

Questions go upstream lower-cased with Vigie's own EDNS record and nothing else: a client's EDNS client-subnet,
cookies or padding never leave the server (privacy), and the answer does not depend on who asked first. Answers are
kept without the upstream's OPT record: a client gets Vigie's own, and only if it sent one.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

from dns_resolver.bounded import BoundedCache
from dns_resolver.fastpath import Records
from dns_resolver.upstream import UpstreamFailure, UpstreamPool
from policy.metrics import DNS_ERRORS, DNS_STALE_ANSWERS

log = logging.getLogger(__name__)

# ID 0, RD set, one question, one additional record (the OPT below).
_QUERY_HEADER = b"\x00\x00\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01"
# Root name, type OPT, UDP size 1232 (the DNS flag day 2020 value), no extended flags, no options.
OUR_OPT = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
STALE_TTL = 30  # RFC 8767's recommendation for an answer served stale
ENTRY_COST = 400  # bytes an entry takes besides the answer itself (a process's RSS growth per entry)
_TTL = struct.Struct("!I")


@dataclass(slots=True)
class _Entry:
    wire: bytes  # without OPT record
    offsets: tuple[int, ...]  # TTL offsets from the end of the question
    question_end: int
    stored_at: float
    lifetime: float
    recently_used: bool = False  # answered from the cache (fresh or stale) since an eviction last passed it over
    targets: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return len(self.wire)


class UpstreamAnswer(NamedTuple):
    """An upstream answer (without OPT record) with its TTLs aged to now; `lifetime` is how long it stays valid (0
    when stale); `fetched`: it has just come from an upstream, not from the cache."""

    wire: bytes
    question_end: int
    offsets: tuple[int, ...]
    lifetime: float
    fetched: bool = False
    targets: tuple[str, ...] = ()  # the names its answer section points at (CNAME, DNAME, HTTPS/SVCB targets)
    addresses: tuple[str, ...] = ()  # the addresses it gives

    @property
    def leads_elsewhere(self) -> bool:
        """Whether the answer has names or addresses to judge besides the question's name."""
        return bool(self.targets or self.addresses)


def age_ttls(wire: bytes, start: int, offsets: tuple[int, ...], elapsed: int, floor: int = 0) -> bytes:
    """`wire` with every TTL lowered by `elapsed` seconds (never under `floor`)."""
    if not elapsed and not floor:
        return wire
    aged = bytearray(wire)
    for offset in offsets:
        ttl = _TTL.unpack_from(aged, start + offset)[0]
        _TTL.pack_into(aged, start + offset, max(floor, ttl - elapsed))
    return bytes(aged)


AnswerCallback = Callable[["UpstreamAnswer | UpstreamFailure"], None]


class Forwarder:
    """One upstream query per question in flight, whoever asks: callers waiting for the same question are called
    back together when its answer (or failure) arrives. The UDP front waits by callback (no task per query); the
    rest awaits `answer`."""

    def __init__(self, pool: UpstreamPool, *, max_bytes: int, max_ttl: int = 86_400, stale_seconds: int = 86_400,
                 max_entries: int | None = None) -> None:
        self.pool = pool
        self.max_ttl = max_ttl
        self.stale_seconds = stale_seconds
        self._cache: BoundedCache[bytes, _Entry] = BoundedCache(max_bytes=max_bytes, entry_cost=ENTRY_COST,
                                                                max_entries=max_entries)
        self._flights: dict[bytes, list[AnswerCallback]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def memory(self) -> int:
        """The bytes the cached answers take, estimated."""
        return self._cache.memory

    def cached(self, question: bytes) -> UpstreamAnswer | None:
        """The fresh cached answer to `question`, if any."""
        entry = self._cache.get(question)
        if entry is None:
            return None
        now = time.monotonic()
        if now >= entry.stored_at + entry.lifetime:
            return None
        entry.recently_used = True
        return self._aged(entry, now)

    def when_answered(self, question: bytes, callback: AnswerCallback, *, refresh: bool = False) -> None:
        """Call `callback` with the answer to `question` (lower-cased name, type, class), now when it is cached
        (unless `refresh`), else when the upstream query in flight for it ends; with an UpstreamFailure when no
        upstream answers and nothing, not even stale, is cached."""
        if not refresh:
            answer = self.cached(question)
            if answer is not None:
                callback(answer)
                return
        waiting = self._flights.get(question)
        if waiting is not None:
            waiting.append(callback)
            return
        self._flights[question] = [callback]
        try:
            self.pool.resolve_later(_QUERY_HEADER + question + OUR_OPT, question, partial(self._landed, question))
        except Exception as exc:  # a bug: the waiters must not wait forever
            log.exception("internal error forwarding a question")
            self._landed(question, UpstreamFailure(repr(exc)))

    async def answer(self, question: bytes, *, refresh: bool = False) -> UpstreamAnswer:
        """`when_answered`, awaited. Raises UpstreamFailure."""
        if not refresh:
            answer = self.cached(question)
            if answer is not None:
                return answer
        future: asyncio.Future[UpstreamAnswer] = asyncio.get_running_loop().create_future()

        def settle(result: UpstreamAnswer | UpstreamFailure) -> None:
            if future.done():
                return  # the awaiting caller was cancelled
            if isinstance(result, UpstreamFailure):
                future.set_exception(result)
            else:
                future.set_result(result)

        self.when_answered(question, settle, refresh=refresh)
        return await future

    def prefetch(self, question: bytes) -> None:
        """Fetch `question` again in the background (unless already in flight); failures leave the entry as is."""
        if question not in self._flights:
            self.when_answered(question, _ignore, refresh=True)

    def _landed(self, question: bytes, result: Records | UpstreamFailure) -> None:
        """The upstream query for `question` ended: cache the answer, call back everyone waiting for it."""
        answer: UpstreamAnswer | UpstreamFailure
        if isinstance(result, UpstreamFailure):
            answer = self._stale_or_failure(question, result)
        else:
            try:
                entry = self._store(question, result)
                answer = UpstreamAnswer(entry.wire, entry.question_end, entry.offsets, entry.lifetime, True,
                                        entry.targets, entry.addresses)
            except Exception as exc:  # a bug: the waiters must not wait forever
                log.exception("internal error reading an upstream answer")
                answer = UpstreamFailure(repr(exc))
        for callback in self._flights.pop(question, []):
            try:
                callback(answer)
            except Exception:  # one waiter's bug must not cost the others their answer
                DNS_ERRORS.labels("internal").inc()
                log.exception("internal error delivering a forwarded answer")

    def _store(self, question: bytes, records: Records) -> _Entry:
        """The answer as an entry, cached when it may be: NOERROR or NXDOMAIN, with a TTL of a second or more."""
        wire = records.wire
        entry = _Entry(wire, records.ttl_offsets, records.question_end, time.monotonic(), 0.0,
                       targets=records.targets, addresses=records.addresses)
        smallest_ttl = records.smallest_ttl
        if wire[3] & 0x0F in (0, 3) and smallest_ttl is not None:  # the SOA's TTL for negatives
            entry.lifetime = min(self.max_ttl, smallest_ttl)
            if entry.lifetime >= 1:
                self._cache.put(question, entry)
        return entry

    def _stale_or_failure(self, question: bytes, failure: UpstreamFailure) -> UpstreamAnswer | UpstreamFailure:
        entry = self._cache.get(question)
        now = time.monotonic()
        if entry is None or now > entry.stored_at + entry.lifetime + self.stale_seconds:
            return failure
        DNS_STALE_ANSWERS.inc()
        entry.recently_used = True
        wire = age_ttls(entry.wire, entry.question_end, entry.offsets, 10**9, floor=STALE_TTL)
        return UpstreamAnswer(wire, entry.question_end, entry.offsets, 0.0, False, entry.targets, entry.addresses)

    @staticmethod
    def _aged(entry: _Entry, now: float) -> UpstreamAnswer:
        elapsed = int(now - entry.stored_at)
        wire = age_ttls(entry.wire, entry.question_end, entry.offsets, elapsed)
        return UpstreamAnswer(wire, entry.question_end, entry.offsets, max(0.0, entry.lifetime - elapsed), False,
                              entry.targets, entry.addresses)


def _ignore(result: UpstreamAnswer | UpstreamFailure) -> None:
    """A prefetch's waiter: the cache keeps what came back; a failure leaves the entry as it was."""
