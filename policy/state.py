"""What the engine reads of shared state: active overrides and today's screen-time use, as an immutable view.

Stores (SQLite, Redis) produce these views in the background; the hot paths only ever read the latest view.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
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

    def applies_to(self, group: str, device: str | None, at: datetime) -> bool:
        return (self.group == group and (self.device is None or self.device == device)
                and at < self.expires_at)


_EMPTY: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True)
class StateView:
    overrides: tuple[Override, ...] = ()
    minutes_used_today: Mapping[str, int] = field(default_factory=lambda: _EMPTY)

    def minutes_used(self, device: str | None) -> int:
        return self.minutes_used_today.get(device, 0) if device else 0


EMPTY_STATE = StateView()
