"""What the engine reads of shared state: active overrides and today's screen-time use, as an immutable view.

The state keeper (`policy.state_keeper`) builds these views in the background from the store (SQLite, Redis); the
hot paths only ever read the latest view.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from types import MappingProxyType


class OverrideKind(enum.Enum):
    ALLOW = "allow"
    BLOCK = "block"
    LOCK = "lock"


@dataclass(frozen=True)
class Override:
    """A teacher's lever: allow or block a domain, or lock (allowlist only), for a group or one device, for a while."""

    id: str
    kind: OverrideKind
    group: str
    device: str | None
    domain: str | None
    expires_at: datetime
    author: str
    note: str = ""
    created_at: datetime | None = None

    def applies_to(self, group: str, device: str | None, at: datetime) -> bool:
        return (self.group == group and (self.device is None or self.device == device)
                and at < self.expires_at)

    def describe(self) -> str:
        target = f"{self.kind.value} {self.domain}" if self.domain else self.kind.value
        scope = f"device {self.device} (group {self.group})" if self.device else f"group {self.group}"
        return f"{target} for {scope}"


_EMPTY: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True)
class StateView:
    """Overrides in force and minutes used on `day` (the rules' local day) per device.

    `version` changes whenever the overrides change: fronts key cached decisions with it. Minutes need no key:
    a decision taken with `used` of `budget` minutes holds at least `budget - used` minutes (see the engine).
    """

    overrides: tuple[Override, ...] = ()
    minutes_used_today: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    day: date | None = None
    version: int = 0
    override_groups: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "override_groups", frozenset(o.group for o in self.overrides))

    def minutes_used(self, device: str | None, day: date) -> int:
        """Minutes `device` used on `day`; 0 for a day the view does not hold (just after midnight, before the
        keeper's next refresh, yesterday's count must not block)."""
        if device is None or (self.day is not None and day != self.day):
            return 0
        return self.minutes_used_today.get(device, 0)


EMPTY_STATE = StateView()
