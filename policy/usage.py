"""Screen time as active minutes: which minutes of the local day each device was in use.

A minute is the number of minutes elapsed since local midnight in the rules' time zone, so a day has 1,380 to
1,500 of them (daylight-saving days included) and the repeated hour of an October night never collides. A device's
minutes of one day are one integer used as a bit set: marking, merging and counting are integer operations, and
the same minute marked by the DNS resolver and by the proxy (or by two servers) is one minute.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

Minutes = dict[str, int]  # device → bit set of the minutes of one day


@dataclass(frozen=True)
class LocalDay:
    """A day of the rules' calendar, as epoch seconds [start, end)."""

    day: date
    start: float
    end: float

    def minute(self, timestamp: float) -> int:
        return int((timestamp - self.start) // 60)


def local_day(timestamp: float, zone: ZoneInfo) -> LocalDay:
    day = datetime.fromtimestamp(timestamp, zone).date()
    start = datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()
    following = day + timedelta(days=1)
    end = datetime(following.year, following.month, following.day, tzinfo=zone).timestamp()
    return LocalDay(day, start, end)


def minutes_in(bits: int) -> Iterator[int]:
    while bits:
        low = bits & -bits
        yield low.bit_length() - 1
        bits ^= low


class UsageRecorder:
    """What the fronts call on every metered request: one dict probe when the device's minute is already marked.

    New minutes are also kept as pending until the state keeper has written them to the store; a failed write
    gives them back, so an outage loses nothing. Today's minutes stay in memory (a few hundred bytes per device)
    so that a store which lost its data (a Redis restarted without persistence) can be told again.
    """

    def __init__(self, zone: Callable[[], ZoneInfo], clock: Callable[[], float] = time.time) -> None:
        self._zone = zone
        self._clock = clock
        self._lock = threading.Lock()  # the fronts mark from the event loop, the keeper takes from its thread
        self._day = local_day(clock(), zone())
        self._today: Minutes = {}
        self._pending: dict[date, Minutes] = {}

    def record(self, device: str, timestamp: float | None = None) -> None:
        now = self._clock() if timestamp is None else timestamp
        day = self._day
        if not day.start <= now < day.end:
            day = self._roll_to(now)
        bit = 1 << day.minute(now)
        marked = self._today.get(device, 0)
        if marked & bit:
            return
        with self._lock:
            self._today[device] = marked | bit
            pending = self._pending.setdefault(day.day, {})
            pending[device] = pending.get(device, 0) | bit

    def _roll_to(self, now: float) -> LocalDay:
        with self._lock:
            day = local_day(now, self._zone())
            if day.day != self._day.day:
                self._today = {}
            self._day = day
            return day

    @property
    def day(self) -> date:
        return self._day.day

    def take_pending(self) -> dict[date, Minutes]:
        """The minutes not yet written to the store; the caller writes them or gives them back."""
        with self._lock:
            pending, self._pending = self._pending, {}
            return pending

    def give_back(self, pending: dict[date, Minutes]) -> None:
        with self._lock:
            for day, devices in pending.items():
                mine = self._pending.setdefault(day, {})
                for device, bits in devices.items():
                    mine[device] = mine.get(device, 0) | bits

    def pending_count(self, day: date) -> Minutes:
        """Per device, minutes of `day` not yet in the store (added to the store's counts while it is away)."""
        with self._lock:
            return {device: bits.bit_count() for device, bits in self._pending.get(day, {}).items()}

    def today(self) -> tuple[date, Minutes]:
        """Every minute marked today by this process, to tell a store that lost them."""
        with self._lock:
            return self._day.day, dict(self._today)
