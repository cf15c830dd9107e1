"""The one cache type of the DNS front: entries by key, bounded in count and in bytes, evicted with a "second
chance". The reply cache (finished replies per view) and the forwarder (upstream answers per question) each keep
their own entries in one; what differs between them is what an entry holds, not how it is kept or dropped."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Protocol, TypeVar

SECOND_CHANCES = 8  # how many used entries an eviction may move back to the end before dropping one


class Evictable(Protocol):
    @property
    def size(self) -> int: ...  # the bytes it holds (the reply or answer)
    recently_used: bool  # set by a hit, cleared when an eviction passes the entry over once


Key = TypeVar("Key")
Entry = TypeVar("Entry", bound=Evictable)


class BoundedCache(Generic[Key, Entry]):
    """At most `max_entries` entries and `max_bytes` bytes, counting `entry_cost` bytes per entry besides its own
    `size` (what a process's RSS grows by per entry, measured by benchmarks/dns_cache_memory.py).

    Eviction takes the oldest entry not used since it last came up: up to SECOND_CHANCES used ones go back to the
    end, their flag cleared, before the oldest goes anyway. A stream of names asked once then passes through without
    pushing out the answers in use (which serve-stale needs most when every upstream is down), and a hit costs a
    flag, not a reordering. An OrderedDict, because taking the oldest of a plain dict walks past every slot deleted
    before it."""

    def __init__(self, *, max_bytes: int, entry_cost: int, max_entries: int | None = None) -> None:
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._entry_cost = entry_cost
        self._max_entries = max_entries if max_entries is not None else max_bytes // entry_cost  # as many as fit
        self._max_bytes = max_bytes
        self._bytes = 0
        self.get = self._entries.get  # the hot path's look-up, without a method call of ours in between

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def memory(self) -> int:
        """The bytes the entries take, estimated."""
        return self._bytes

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def remove(self, key: Key) -> Entry | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= self._entry_cost + entry.size
        return entry

    def put(self, key: Key, entry: Entry) -> None:
        """Store `entry` as the newest, replacing what `key` held, then evict down to the bounds."""
        self.remove(key)
        self._entries[key] = entry
        self._bytes += self._entry_cost + entry.size
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            self._bytes -= self._entry_cost + self._evict_one().size

    def _evict_one(self) -> Entry:
        entries = self._entries
        for _ in range(SECOND_CHANCES):
            key, entry = entries.popitem(last=False)
            if not entry.recently_used:
                return entry
            entry.recently_used = False
            entries[key] = entry
        return entries.popitem(last=False)[1]
