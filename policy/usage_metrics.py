"""Screen time per group for Prometheus, computed at scrape time from the state view: how many devices were active
today, how their minutes are spread, how many spent their budget. Per group only: never a device name.

One process exports it (the main one): every process holds the same view of the store, and the same series from
several workers would be counted several times.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from policy.snapshot import Snapshot
from policy.state import StateView

BUCKET_MINUTES = (15, 30, 60, 90, 120, 180, 240)


class ScreenTimeCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot], view: Callable[[], StateView]) -> None:
        self._snapshot = snapshot
        self._view = view

    def collect(self) -> Iterable[Metric]:
        snapshot, view = self._snapshot(), self._view()
        now = datetime.now(UTC)
        today = now.astimezone(snapshot.clock.zone).date()
        active = GaugeMetricFamily("vigie_screen_time_devices_active", "Devices of the inventory with at least one "
                                   "minute of screen time today, per group", labels=["group"])
        spent = GaugeMetricFamily("vigie_screen_time_devices_spent", "Devices at or over the budget of their "
                                  "group's profile in force now, per group", labels=["group"])
        spread = GaugeHistogramMetricFamily("vigie_screen_time_seconds", "Today's screen time of the active "
                                            "devices, per group (whole minutes)", labels=["group"])
        members: dict[str, list[str]] = {}
        for device in snapshot.rules.devices:
            members.setdefault(device.group, []).append(device.name)
        for group, devices in sorted(members.items()):
            minutes = [view.minutes_used(device, today) for device in devices]
            used = [m for m in minutes if m]
            budget = snapshot.profiles[snapshot.profile_in_force(group, now).profile].profile.screen_time_minutes
            active.add_metric([group], len(used))
            spent.add_metric([group], sum(1 for m in used if budget is not None and m >= budget))
            buckets = [(str(bound * 60), sum(1 for m in used if m <= bound)) for bound in BUCKET_MINUTES]
            spread.add_metric([group], [*buckets, ("+Inf", len(used))], gsum_value=60 * sum(used))
        yield active
        yield spent
        yield spread

    def describe(self) -> Iterable[Metric]:
        return []


def register_screen_time_metrics(snapshot: Callable[[], Snapshot], view: Callable[[], StateView]) -> None:
    REGISTRY.register(ScreenTimeCollector(snapshot, view))
