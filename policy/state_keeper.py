"""The bridge between the state store and the hot paths, in one background thread per process.

Every second (at once when Redis announces an override change) it writes the minutes the fronts marked and reads
the overrides and today's totals into a new `StateView`, which it swaps in: the fronts read `keeper.view` and call
`keeper.usage.record(device)`, and never wait on the store.

When the store is away, the last view keeps serving, used minutes accumulate in memory and count in the view, and
one line is logged when the outage starts and one when it ends. On stop, minutes that could not be written are
spooled to a file that the next start (of any Vigie process on this data directory) writes to the store. A store
that lost its data (a Redis restarted without persistence) is told again today's minutes and the overrides this
process knows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from types import MappingProxyType
from zoneinfo import ZoneInfo

from policy.metrics import OVERRIDES_ACTIVE, STATE_AGE, STATE_STORE_ERRORS, STATE_STORE_UP, USAGE_MARKS_PENDING
from policy.state import EMPTY_STATE, Override, StateView
from policy.state_store import StateStore, StoreUnavailable
from policy.usage import Minutes, UsageRecorder

log = logging.getLogger(__name__)

REFRESH_SECONDS = 1.0
FLUSH_SECONDS = 2.0
SPOOL_PREFIX = "usage-spool-"


class StateKeeper:
    def __init__(self, open_store: Callable[[], StateStore], zone: Callable[[], ZoneInfo], spool_dir: Path, *,
                 refresh_seconds: float = REFRESH_SECONDS, flush_seconds: float = FLUSH_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self._open_store = open_store
        self._zone = zone
        self._clock = clock
        self.spool_dir = spool_dir
        self.refresh_seconds = refresh_seconds
        self.flush_seconds = flush_seconds
        self.usage = UsageRecorder(zone, clock)
        self.view: StateView = EMPTY_STATE
        self.refreshed_at = 0.0
        self._store: StateStore | None = None
        self._down_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._flushed_at = 0.0
        self._writes_failing = False
        self._store_minutes: dict[str, int] = {}
        self._store_day: date | None = None
        STATE_AGE.set_function(lambda: self._clock() - self.refreshed_at if self.refreshed_at else 0.0)

    # -- life cycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Read spooled minutes and a first view (without waiting if the store is away), then run the thread."""
        self._claim_spools()
        self.step()
        self._thread = threading.Thread(target=self._run, name="vigie-state", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is pending (or spool it), then close the store."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._flush()
        self._spool(self.usage.take_pending())
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            store = self._store
            try:
                if store is None:
                    self._stop.wait(self.refresh_seconds)
                else:
                    store.wait_for_change(self.refresh_seconds)
            except StoreUnavailable as exc:
                self._went_down("wait", exc)
                self._stop.wait(self.refresh_seconds)
            if not self._stop.is_set():
                self.step()

    # -- one round --------------------------------------------------------------------------------------------

    def step(self) -> None:
        """One round: connect if needed, write pending minutes when due, read a new view. Never raises."""
        try:
            store = self._connected()
            if store.lost_data():
                self._tell_again(store)
            if self._clock() - self._flushed_at >= self.flush_seconds:
                self._flush()
            self._read(store)
            if not self._writes_failing:  # a store that reads but refuses writes (locked, full) is not back
                self._came_back()
        except StoreUnavailable as exc:
            self._went_down("read", exc)
            self._publish(self.view.overrides, self.view.version)
        except Exception:  # a bug must not stop the thread: the fronts would decide on an ever older view
            log.exception("state keeper: unexpected error; retrying in %.0f s", self.refresh_seconds)
            STATE_STORE_ERRORS.labels("internal").inc()

    def _connected(self) -> StateStore:
        if self._store is None:
            self._store = self._open_store()
        return self._store

    def _flush(self) -> None:
        pending = self.usage.take_pending()
        if not pending:
            self._flushed_at = self._clock()
            self._writes_failing = False
            return
        try:
            self._connected().add_usage(pending)
            self._flushed_at = self._clock()
            self._writes_failing = False
        except StoreUnavailable as exc:
            self.usage.give_back(pending)
            self._writes_failing = True
            self._went_down("write", exc)
        finally:
            USAGE_MARKS_PENDING.set(sum(self.usage.pending_count(self.usage.day).values()))

    def _read(self, store: StateStore) -> None:
        now = self._clock()
        today = datetime.fromtimestamp(now, self._zone()).date()
        overrides = store.overrides(datetime.fromtimestamp(now, UTC))
        self._store_minutes = store.usage(today)
        self._store_day = today
        self.refreshed_at = now
        version = self.view.version if overrides == self.view.overrides else self.view.version + 1
        self._publish(overrides, version)

    def _publish(self, overrides: tuple[Override, ...], version: int) -> None:
        """Swap in a view of the store's minutes plus the ones not yet written (while the store is away)."""
        today = datetime.fromtimestamp(self._clock(), self._zone()).date()
        minutes = dict(self._store_minutes) if self._store_day == today else {}
        for device, extra in self.usage.pending_count(today).items():
            minutes[device] = minutes.get(device, 0) + extra
        self.view = StateView(overrides=overrides, minutes_used_today=MappingProxyType(minutes), day=today,
                              version=version)
        OVERRIDES_ACTIVE.set(len(overrides))

    def _tell_again(self, store: StateStore) -> None:
        day, minutes = self.usage.today()
        now = datetime.fromtimestamp(self._clock(), UTC)
        known = [o for o in self.view.overrides if o.expires_at > now]
        if minutes:
            store.add_usage({day: minutes})
        for override in known:
            store.add_override(override)
        log.warning("state store lost its data (restarted without persistence?): wrote again today's minutes of "
                    "%d device(s) and %d override(s) known to this process", len(minutes), len(known))

    # -- outages ----------------------------------------------------------------------------------------------

    def _went_down(self, operation: str, exc: StoreUnavailable) -> None:
        STATE_STORE_ERRORS.labels(operation).inc()
        STATE_STORE_UP.set(0)
        if self._down_since is None:
            self._down_since = self._clock()
            log.error("%s; deciding with the state read %s, counting screen time in memory until it is back", exc,
                      "at " + time.strftime("%H:%M:%S", time.localtime(self.refreshed_at)) if self.refreshed_at
                      else "never (no override, no minutes)")

    def _came_back(self) -> None:
        STATE_STORE_UP.set(1)
        if self._down_since is not None:
            log.warning("state store back after %.0f s", self._clock() - self._down_since)
            self._down_since = None

    @property
    def store_up(self) -> bool:
        return self._down_since is None and self._store is not None

    # -- spool ------------------------------------------------------------------------------------------------

    def _spool(self, pending: dict[date, Minutes]) -> None:
        if not pending:
            return
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        path = self.spool_dir / f"{SPOOL_PREFIX}{os.getpid()}-{time.time_ns()}.json"
        data = {day.isoformat(): devices for day, devices in pending.items()}
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(data))
        temporary.replace(path)
        log.warning("state store away at stop: %d used minute(s) kept in %s, written at the next start",
                    sum(bits.bit_count() for devices in pending.values() for bits in devices.values()), path)

    def _claim_spools(self) -> None:
        if not self.spool_dir.is_dir():
            return
        for path in sorted(self.spool_dir.glob(f"{SPOOL_PREFIX}*.json")):
            claimed = path.with_name(f"claimed-{os.getpid()}-{path.name}")
            try:
                path.rename(claimed)  # one process only gets each file
            except OSError:
                continue
            try:
                data = json.loads(claimed.read_text())
                self.usage.give_back({date.fromisoformat(day): {str(d): int(b) for d, b in devices.items()}
                                      for day, devices in data.items()})
            except (ValueError, AttributeError, OSError) as exc:
                log.error("unreadable usage spool %s kept aside: %s", claimed, exc)
                continue
            claimed.unlink()
            log.info("usage spool %s read: its minutes are written with the next flush", path.name)
