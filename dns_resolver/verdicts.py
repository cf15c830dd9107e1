"""What the DNS front keeps of the engine's decisions: a `Verdict` per decision, cached per client and name — or per
client and list bits, for the many names that only their list bits decide (`policy.engine.bits_deciding`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from policy.clients import Client
from policy.decision import Action, Decision, Query
from policy.engine import bits_deciding, decide
from policy.snapshot import Snapshot
from policy.state import StateView

EDE_BLOCKED, EDE_FILTERED = 15, 17  # RFC 8914 info codes


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the DNS front needs of a Decision. A Decision carries its explanation (~1 KB); equal verdicts are one
    object here, so the decision cache costs a key per name: thousands of names allowed by default share one."""

    action: Action
    labels: tuple[str, str, str, str]
    until: datetime | None
    counts_screen_time: bool
    rewrite_to: str | None
    extended_error: int  # RFC 8914 info code of a block
    extended_text: str  # the categories, or the reason

    @classmethod
    def of(cls, decision: Decision) -> Verdict:
        code = EDE_BLOCKED if decision.categories or decision.reason.value in ("deny_list", "bypass") \
            else EDE_FILTERED
        return cls(decision.action, decision.labels, decision.until, decision.counts_screen_time,
                   decision.rewrite_to, code, ", ".join(decision.categories) or decision.reason.value)

    def ttl_cap(self, snapshot: Snapshot, now: datetime) -> int:
        """An answer never outlives the decision behind it (the next schedule change, an override's end)."""
        max_ttl = snapshot.rules.server.dns.max_ttl_seconds
        if self.until is None:
            return max_ttl
        return max(0, min(max_ttl, int((self.until - now).total_seconds())))


class Verdicts:
    """Verdicts by (rules generation, overrides version, group, device, name) until they expire (a decision under a
    screen-time budget expires when the budget could run out) — or by list bits instead of name for the names that
    only their bits decide: a name never seen before then costs a list look-up, not a decision. At most
    `max_entries` keys, the oldest dropped first."""

    def __init__(self, current_state: Callable[[], StateView], max_entries: int) -> None:
        self.current_state = current_state
        self.max_entries = max_entries
        self._by_key: OrderedDict[tuple[int, int, str, str | None, str | int], Verdict] = OrderedDict()
        self._interned: dict[tuple[object, ...], Verdict] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def of(self, snapshot: Snapshot, client: Client, name: str, now: datetime) -> Verdict:
        state = self.current_state()
        bits = bits_deciding(name, client, snapshot, state)
        key = (snapshot.generation, state.version, client.group, client.device, name if bits is None else bits)
        verdict = self._by_key.get(key)
        if verdict is None or (verdict.until is not None and now >= verdict.until):
            verdict = self._intern(decide(Query(client, name, now), snapshot, state))
            self._by_key[key] = verdict
            if len(self._by_key) > self.max_entries:
                self._by_key.popitem(last=False)
        return verdict

    def _intern(self, decision: Decision) -> Verdict:
        """The one Verdict object for `decision`. What a Verdict is made of, as a plain tuple, is hashed and
        compared in C (the dataclass's own hash and equality are Python calls, and an enum's hash too, hence the
        members' `_value_`)."""
        made_of = (decision.action._value_, decision.reason._value_, decision.group, decision.categories,
                   decision.until, decision.counts_screen_time, decision.rewrite_to)
        verdict = self._interned.get(made_of)
        if verdict is None:
            if len(self._interned) > self.max_entries:
                self._interned.clear()  # verdicts of past schedules or rules; those in use stay cached
            verdict = self._interned[made_of] = Verdict.of(decision)
        return verdict
