"""How much memory each cache of a DNS worker may take. `dns.cache_size` is for every worker together, like
unbound's cache sizes, which its threads share: each worker gets its share, divided among its four caches.

The costs per entry are what a process's RSS grows by per entry; `benchmarks/dns_cache_memory.py` checks, on the
real server, that the caches filled to their limits stay within `dns.cache_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

DECISION_COST = 280  # bytes a cached verdict takes: its key and slot (verdicts themselves are shared)
EXACT_COST = 510  # bytes an exact-bytes entry takes: the query bytes, the entry, the reply body
MIN_WORKER_SHARE = 1_000_000  # below this the popular names would not stay cached


@dataclass(frozen=True)
class CacheBudget:
    """One worker's limits: bytes for the reply and upstream-answer caches, entries for the other two."""

    replies_bytes: int
    upstream_bytes: int
    decisions: int
    exact_replies: int

    @classmethod
    def share(cls, total_bytes: int, workers: int) -> CacheBudget:
        """One of `workers` workers' share of `total_bytes`: 35 % for upstream answers (every forwarded name starts
        there, shared by every group, and serve-stale falls back on them), 35 % for finished replies (the names asked
        again: the hot path), the rest for verdicts and the exact-bytes index. A name asked again after the upstream
        answers have turned over is fetched again, so they get as much room as the replies."""
        share = max(MIN_WORKER_SHARE, total_bytes // max(1, workers))
        return cls(replies_bytes=share * 35 // 100, upstream_bytes=share * 35 // 100,
                   decisions=share * 15 // 100 // DECISION_COST, exact_replies=share * 15 // 100 // EXACT_COST)
