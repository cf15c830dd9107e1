"""The DNS hot path: a plain query whose answer is cached is answered from bytes, without dnslib or the engine.

Two levels. `ReplyCache` keeps replies by (view, lower-cased question, EDNS). In front of it, `ExactReplies` keeps,
per view, the very bytes a client sent after the ID (flags, counts, question in its case, OPT record) with the
reply ready for the current second: a repeated query is then one dictionary lookup and a concatenation.

Reading a query here means: header checks, the one question's name, type and class, and an optional OPT record.
Anything unusual (another opcode, several questions, compression in the question, trailing bytes) returns None and
goes the slow way, which answers every case. The cached reply is kept as bytes split around the question, so a hit
is: the client's ID and question (its 0x20 case preserved), our header and answer sections, the TTLs lowered by the
time spent in the cache.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from typing import NamedTuple

from dns_resolver.bounded import BoundedCache

OPT_TYPE = 41
# The largest UDP answer, whatever size the client offers: no fragments (DNS flag day 2020), and a small query
# never draws a large answer at a spoofed address (amplification). Beyond it, TC: the client asks over TCP.
MAX_UDP_ANSWER = 1232
ENTRY_COST = 590  # bytes an entry takes besides the reply itself (a process's RSS growth per entry)
PREFETCH_AFTER = 0.9  # of an answer's lifetime
PREFETCH_MIN_HITS = 3
_TTL = struct.Struct("!I")


class PlainQuery(NamedTuple):
    """What the hot path needs of a query: the lower-cased question (the cache key) and where it ends. A
    NamedTuple: one is made per query not answered from the exact bytes, three times faster than a frozen
    dataclass."""

    question: bytes  # name in wire form, lower-cased, then type and class
    question_end: int
    udp_size: int  # 512 without EDNS
    edns: bool
    qtype: int


def read_plain_query(packet: bytes) -> PlainQuery | None:
    """The question of an ordinary query, or None when the slow path must look at it."""
    size = len(packet)
    if size < 17 or packet[2] & 0xF8 or packet[4:10] != b"\x00\x01\x00\x00\x00\x00":
        return None  # a response, another opcode, or not exactly one question and no answers
    additional = packet[10] << 8 | packet[11]
    index = 12
    while True:
        if index >= size:
            return None
        length = packet[index]
        if length == 0:
            break
        if length > 63:
            return None  # a compression pointer or a reserved label type: the slow path decides
        index += length + 1
    if index - 11 > 255:
        return None  # a name over 255 octets: the slow path answers FORMERR
    end = index + 5
    if end > size:
        return None
    # Only the name is lower-cased: type and class bytes may fall in the ASCII letter range.
    question = bytes(packet[12:index + 1].lower() + packet[index + 1:end])
    qtype = packet[index + 1] << 8 | packet[index + 2]
    if additional == 0:
        return PlainQuery(question, end, 512, False, qtype) if end == size else None
    if additional != 1 or end + 11 > size or packet[end] != 0 or packet[end + 1:end + 3] != b"\x00\x29":
        return None
    udp_size = max(512, min(packet[end + 3] << 8 | packet[end + 4], MAX_UDP_ANSWER))
    return PlainQuery(question, end, udp_size, True, qtype)


def ttl_offsets(reply: bytes, question_end: int) -> list[int] | None:
    """Offsets (from `question_end`) of every TTL in the answer, authority and additional sections, the OPT record
    aside; None when the reply cannot be walked (then it is not cached)."""
    read = read_records(reply, question_end)
    return None if read is None else list(read.ttl_offsets)


class Records(NamedTuple):
    """A message as `read_records` leaves it: without OPT record, its TTLs found, and what its answer section
    leads to — the names it points at and the addresses it gives — for the front to judge as it judged the
    question."""

    wire: bytes
    question_end: int
    ttl_offsets: tuple[int, ...]  # from `question_end`
    smallest_ttl: int | None  # None when there is no record
    targets: tuple[str, ...] = ()  # CNAME and DNAME targets, HTTPS and SVCB target names, lower-case, no dot
    addresses: tuple[str, ...] = ()  # A and AAAA addresses, as text


_CNAME, _DNAME, _SVCB, _HTTPS, _A, _AAAA = 5, 39, 64, 65, 1, 28


def read_records(wire: bytes, question_end: int) -> Records | None:
    """One walk over the records after the question: the message without its OPT records (the additional count
    lowered to match), the offsets of every TTL left, and the smallest TTL; None when the records cannot be walked.
    An upstream answer is read so once, on arrival: then cached and made a client's without reading it again."""
    try:
        answers, authority, additional = struct.unpack_from("!HHH", wire, 6)
        offsets: list[int] = []
        smallest: int | None = None
        removed: list[tuple[int, int]] = []  # (start, end) of the OPT records of the additional section
        targets: list[str] = []
        addresses: list[str] = []
        cut = 0  # bytes of OPT records before the current one
        index = question_end
        for number in range(answers + authority + additional):
            start = index
            while True:  # the owner name: labels, ending with a zero or a pointer
                length = wire[index]
                if length == 0:
                    index += 1
                    break
                if length >= 0xC0:
                    index += 2
                    break
                index += length + 1
            rtype, rdlength = wire[index] << 8 | wire[index + 1], wire[index + 8] << 8 | wire[index + 9]
            end = index + 10 + rdlength
            if rtype != OPT_TYPE:
                ttl = wire[index + 4] << 24 | wire[index + 5] << 16 | wire[index + 6] << 8 | wire[index + 7]
                offsets.append(index + 4 - question_end - cut)
                if smallest is None or ttl < smallest:
                    smallest = ttl
            elif number >= answers + authority:
                removed.append((start, end))
                cut += end - start
            if number < answers and rtype in _LEADS:
                _lead(wire, rtype, index + 10, end, targets, addresses)
            index = end
    except (IndexError, struct.error, ValueError):
        return None
    if index != len(wire):
        return None
    if removed:
        kept = [wire[:10], struct.pack("!H", additional - len(removed))]
        previous = 12
        for start, end in removed:
            kept.append(wire[previous:start])
            previous = end
        kept.append(wire[previous:])
        wire = b"".join(kept)
    return Records(wire, question_end, tuple(offsets), smallest, tuple(targets), tuple(addresses))


_LEADS = frozenset((_CNAME, _DNAME, _SVCB, _HTTPS, _A, _AAAA))


def _lead(wire: bytes, rtype: int, rdata: int, end: int, targets: list[str], addresses: list[str]) -> None:
    """Add what one answer record leads to: its address, or the name it points at (the root `.` of an HTTPS
    record means the owner itself, already judged). Raises ValueError on a record that cannot be read."""
    if rtype == _A and end - rdata == 4:
        addresses.append(socket.inet_ntop(socket.AF_INET, wire[rdata:end]))
    elif rtype == _AAAA and end - rdata == 16:
        addresses.append(socket.inet_ntop(socket.AF_INET6, wire[rdata:end]))
    elif rtype in (_CNAME, _DNAME):
        targets.append(read_name(wire, rdata))
    elif rtype in (_SVCB, _HTTPS):
        name = read_name(wire, rdata + 2)
        if name:
            targets.append(name)
    elif rtype in (_A, _AAAA):
        raise ValueError("an address record of the wrong length")


def read_name(wire: bytes, offset: int) -> str:
    """The lower-cased name at `offset`, compression pointers followed, without trailing dot; `""` for the root.
    Raises ValueError past 128 labels and pointers (a loop) or on a label past the end."""
    labels: list[str] = []
    for _ in range(128):
        length = wire[offset]
        if length == 0:
            return ".".join(labels)
        if length >= 0xC0:
            offset = (length & 0x3F) << 8 | wire[offset + 1]
            continue
        if length > 63 or offset + 1 + length > len(wire):
            raise ValueError("a label past the end of the message")
        labels.append(wire[offset + 1:offset + 1 + length].decode("latin-1").lower())
        offset += length + 1
    raise ValueError("a name that loops")


@dataclass(slots=True)
class CachedReply:
    header: bytes  # reply bytes 2..12: flags and counts
    tail: bytes  # everything after the question
    ttl_offsets: tuple[int, ...]
    stored_at: float
    expires_at: float
    size: int
    labels: tuple[str, ...]  # group, action, reason, category: what the metrics count for a hit
    prefetch_at: float  # past this, a popular answer from upstream is fetched again before it expires
    count_device: str | None = None  # a hit marks this device's minute as screen time
    hits: int = 0
    recently_used: bool = False
    aged_tail: bytes = b""
    aged_seconds: int = 0

    def take_prefetch(self, now: float) -> bool:
        """Whether to fetch this answer again now: from upstream, popular, near its end; once."""
        if now < self.prefetch_at or self.hits < PREFETCH_MIN_HITS:
            return False
        self.prefetch_at = float("inf")
        return True

    def aged(self, age: int) -> bytes:
        """The records after the question with every TTL lowered by `age` seconds (kept for that second)."""
        if not age or not self.ttl_offsets:
            return self.tail
        if self.aged_seconds != age:
            aged = bytearray(self.tail)
            for offset in self.ttl_offsets:
                ttl = _TTL.unpack_from(aged, offset)[0]
                _TTL.pack_into(aged, offset, max(0, ttl - age))
            self.aged_tail, self.aged_seconds = bytes(aged), age
        return self.aged_tail


class ReplyCache:
    """Finished replies by (view, question, EDNS), where the view is what the decision depended on (rules
    generation and client group, and the device when a screen-time budget makes answers per device). Entries
    expire with their shortest TTL and the decision's validity; the bounds and eviction are `BoundedCache`'s."""

    def __init__(self, max_bytes: int, max_entries: int | None = None) -> None:
        self._entries: BoundedCache[tuple[object, bytes, bool], CachedReply] = BoundedCache(
            max_bytes=max_bytes, entry_cost=ENTRY_COST, max_entries=max_entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def memory(self) -> int:
        """The bytes the entries take, estimated."""
        return self._entries.memory

    def clear(self) -> None:
        self._entries.clear()

    def store(self, view: object, query: PlainQuery, reply: bytes, lifetime: float,
              labels: tuple[str, ...], *, from_upstream: bool = False,
              count_device: str | None = None, offsets: tuple[int, ...] | None = None) -> CachedReply | None:
        """Cache `reply` to `query` for `lifetime` seconds. `offsets`: its TTLs' offsets from the end of the
        question, when the caller knows them (a forwarded answer: read once, on arrival)."""
        if lifetime < 1 or len(reply) < query.question_end:
            return None
        reply = bytes(reply)
        if offsets is None:
            found = ttl_offsets(reply, query.question_end)
            if found is None:
                return None
            offsets = tuple(found)
        now = time.monotonic()
        key = (view, query.question, query.edns)
        prefetch_at = now + PREFETCH_AFTER * lifetime if from_upstream and lifetime >= 10 else float("inf")
        entry = CachedReply(reply[2:12], reply[query.question_end:], offsets, now, now + lifetime, len(reply),
                            labels, prefetch_at, count_device)
        self._entries.put(key, entry)
        return entry

    def reply(self, view: object, query: PlainQuery, packet: bytes) -> tuple[bytes, CachedReply, bool] | None:
        """The cached reply for this query (ID, RD bit and question case from `packet`), its entry, and whether
        to fetch its upstream answer again now (a popular answer near its end, once); None when not cached."""
        entry = self._entries.get((view, query.question, query.edns))
        if entry is None:
            return None
        now = time.monotonic()
        if now >= entry.expires_at:
            self._entries.remove((view, query.question, query.edns))
            return None
        if entry.size > query.udp_size:
            return None  # the slow path truncates
        tail = entry.aged(int(now - entry.stored_at))
        entry.hits += 1
        entry.recently_used = True
        prefetch = entry.take_prefetch(now)
        header = entry.header
        if (header[0] ^ packet[2]) & 0x01:  # echo the client's RD bit
            header = bytes((header[0] ^ 0x01,)) + header[1:]
        return packet[:2] + header + packet[12:query.question_end] + tail, entry, prefetch


@dataclass(slots=True)
class ExactReply:
    """A cached reply ready for one exact query: `body` is everything after the ID, TTLs aged to the second
    that ends at `fresh_until` (or the entry's expiry, if sooner); past it, `ExactReplies.refresh` makes the next."""

    entry: CachedReply
    flags: bytes  # our flags, with the client's RD bit
    question: bytes  # the client's question as sent (0x20 case kept)
    counter: list[float]  # the cell of the query counter for the entry's labels
    count_device: str | None  # the entry's, here to save a look-up per answer
    body: bytes = b""
    fresh_until: float = 0.0
    hits: int = 0


class ExactReplies:
    """Source address → its view's exact replies: query bytes (after the ID) → `ExactReply`. Bounded by clearing:
    every entry is one hit away from being rebuilt from the `ReplyCache` behind it."""

    def __init__(self, max_entries: int) -> None:
        self.by_address: dict[str, dict[bytes, ExactReply]] = {}
        self._view_of_address: dict[str, object] = {}
        self._by_view: dict[object, dict[bytes, ExactReply]] = {}
        self._count = 0
        self._max = max_entries

    def __len__(self) -> int:
        return self._count

    def clear(self) -> None:
        """Forget every address and reply (the dictionaries stay the same objects)."""
        self.by_address.clear()
        self._view_of_address.clear()
        self._by_view.clear()
        self._count = 0

    def map_address(self, address: str, view: object) -> dict[bytes, ExactReply]:
        replies = self._by_view.get(view)
        if replies is None:
            replies = self._by_view[view] = {}
        self.by_address[address] = replies
        self._view_of_address[address] = view
        return replies

    def add(self, address: str, packet: bytes, query: PlainQuery, entry: CachedReply, counter: list[float],
            now: float) -> ExactReply | None:
        """Index `packet`'s bytes for `entry` in the view `address` is mapped to; None when the reply would not
        fit the client's UDP size (or the address is not mapped)."""
        view = self._view_of_address.get(address)
        if view is None or entry.size > query.udp_size:
            return None
        header = entry.header
        flags = bytes((header[0] & 0xFE | packet[2] & 0x01, header[1]))
        exact = ExactReply(entry, flags, packet[12:query.question_end], counter, entry.count_device)
        if not self.refresh(exact, now):
            return None
        if self._count >= self._max:
            self.clear()
            self.map_address(address, view)
        self._by_view[view][packet[2:]] = exact
        self._count += 1
        return exact

    @staticmethod
    def refresh(exact: ExactReply, now: float) -> bool:
        """Age `exact` to now, pass its hits to the entry; False once the entry has expired."""
        entry = exact.entry
        if now >= entry.expires_at:
            return False
        age = int(now - entry.stored_at)
        exact.body = exact.flags + entry.header[2:] + exact.question + entry.aged(age)
        exact.fresh_until = min(entry.expires_at, entry.stored_at + age + 1)
        if exact.hits:
            entry.hits += exact.hits
            entry.recently_used = True
            exact.hits = 0
        return True


class RateLimiter:
    """A token bucket per client address: `per_second` queries, bursts up to twice that. A client over its rate
    gets no answer (like unbound's ip-ratelimit): answering would still cost, and help reflection attacks."""

    def __init__(self, per_second: int, max_clients: int = 100_000) -> None:
        self.rate = float(per_second)
        self.burst = 2.0 * per_second
        self._buckets: dict[str, list[float]] = {}
        self._max_clients = max_clients

    def allow(self, address: str, now: float) -> bool:
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= self._max_clients:
                self._buckets.clear()  # a flood of spoofed sources: forget, rather than grow without bound
            self._buckets[address] = [self.burst - 1, now]
            return True
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1
        return True
