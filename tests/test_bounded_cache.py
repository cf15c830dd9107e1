"""The DNS front's one cache type: bounds in entries and bytes, byte counts through replace and remove, and the
second chance an eviction gives to entries in use."""

from __future__ import annotations

from dataclasses import dataclass

from dns_resolver.bounded import SECOND_CHANCES, BoundedCache


@dataclass
class Blob:
    size: int
    recently_used: bool = False


def test_bytes_are_counted_through_replace_and_remove() -> None:
    cache: BoundedCache[str, Blob] = BoundedCache(max_bytes=10_000, entry_cost=100)
    cache.put("a", Blob(50))
    cache.put("b", Blob(20))
    assert cache.memory == 270
    cache.put("a", Blob(10))  # replaced, not added
    assert (len(cache), cache.memory) == (2, 230)
    assert cache.remove("b") is not None and cache.remove("b") is None
    assert (len(cache), cache.memory) == (1, 110)
    cache.clear()
    assert (len(cache), cache.memory, cache.get("a")) == (0, 0, None)


def test_the_byte_bound_evicts_the_oldest_unused() -> None:
    cache: BoundedCache[int, Blob] = BoundedCache(max_bytes=1_000, entry_cost=100)
    assert cache._max_entries == 10
    for key in range(5):
        cache.put(key, Blob(100))  # 200 bytes each: five fit
    cache.get(0).recently_used = True  # type: ignore[union-attr]
    cache.put(5, Blob(300))  # 400 bytes: two go, 0 is passed over once
    assert sorted(cache._entries) == [0, 3, 4, 5] and cache.memory == 1_000
    assert cache.get(0).recently_used is False  # type: ignore[union-attr]


def test_a_cache_where_everything_is_in_use_still_evicts() -> None:
    """The second chance is bounded: past SECOND_CHANCES used entries the oldest goes anyway, so one eviction
    never walks the whole cache."""
    count = SECOND_CHANCES + 4
    cache: BoundedCache[int, Blob] = BoundedCache(max_bytes=10**9, entry_cost=1, max_entries=count)
    for key in range(count):
        cache.put(key, Blob(1, recently_used=True))
    cache.put(count, Blob(1))
    assert len(cache) == count
    assert SECOND_CHANCES not in cache._entries  # the first not moved back
    assert count in cache._entries
    moved_back = list(cache._entries)[-SECOND_CHANCES:]
    assert moved_back == list(range(SECOND_CHANCES))
    assert not any(cache._entries[key].recently_used for key in moved_back)
