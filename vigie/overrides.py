"""Teacher overrides and screen-time reports, as the command line and the admin API both offer them.

Everything a person types is checked against the rules in force (the group exists, the device belongs to it, the
domain is a domain, the duration is sensible) before anything reaches the store.
"""

from __future__ import annotations

import difflib
import secrets
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from blocklists.errors import NameRejected, VigieError
from blocklists.names import normalize_domain
from policy.loader import parse_duration_minutes
from policy.model import Rules
from policy.schedule import ScheduleClock
from policy.state import Override, OverrideKind

MAX_OVERRIDE_MINUTES = 7 * 24 * 60  # a week: longer belongs in rules.yaml, where it is reviewed
MAX_NOTE = 200


class OverrideRefused(VigieError):
    """An override request that does not make sense for these rules; the message says how to fix it."""


@dataclass(frozen=True)
class OverrideRequest:
    kind: OverrideKind
    group: str | None
    device: str | None
    domain: str | None
    duration: str  # `45m`, `2h`, `1h30`
    note: str
    author: str


def make_override(request: OverrideRequest, rules: Rules, now: datetime) -> Override:
    """A new override from a request, or OverrideRefused saying what is wrong."""
    group = request.group
    if request.device is not None:
        device = next((d for d in rules.devices if d.name == request.device), None)
        if device is None:
            raise OverrideRefused(f"no device {request.device!r} in the inventory"
                                  f"{did_you_mean(request.device, [d.name for d in rules.devices])}")
        if group is not None and group != device.group:
            raise OverrideRefused(f"device {device.name} is in group {device.group}, not {group}")
        group = device.group
    if group is None:
        raise OverrideRefused("say which group (--group cm2-a) or which device (--device tab-cm2a-01)")
    if group not in rules.groups:
        raise OverrideRefused(f"no group {group!r} in the rules{did_you_mean(group, list(rules.groups))}")
    domain = None
    if request.kind is OverrideKind.LOCK:
        if request.domain:
            raise OverrideRefused("a lock takes no domain: it blocks everything but the profile's allow list")
    else:
        if not request.domain:
            raise OverrideRefused(f"{request.kind.value} needs a domain (--domain youtube.com)")
        try:
            domain = normalize_domain(request.domain)
        except NameRejected as exc:
            raise OverrideRefused(str(exc)) from None
    try:
        minutes = parse_duration_minutes(request.duration)
    except ValueError:
        raise OverrideRefused(f"{request.duration!r} is not a duration (examples: 45m, 2h, 1h30)") from None
    if not 1 <= minutes <= MAX_OVERRIDE_MINUTES:
        raise OverrideRefused(f"an override lasts from 1 minute to 7 days, not {request.duration!r}; longer "
                              "changes belong in rules.yaml")
    note, author = request.note.strip(), request.author.strip()
    if not note:
        raise OverrideRefused("say why in a note (--note \"sortie scolaire\"): it is shown with the override")
    if len(note) > MAX_NOTE:
        raise OverrideRefused(f"the note is {len(note)} characters long; keep it under {MAX_NOTE}")
    if not author:
        raise OverrideRefused("say who makes the override (--by)")
    return Override(id=f"o-{secrets.token_hex(3)}", kind=request.kind, group=group, device=request.device,
                    domain=domain, expires_at=now + timedelta(minutes=minutes), author=author[:64], note=note,
                    created_at=now)


def did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class GroupUsage:
    group: str
    devices: int  # devices of the group in the inventory
    active: int  # devices with at least one minute
    total_minutes: int
    most_minutes: int
    budget_now: int | None  # the budget of the group's profile in force now
    spent: int  # devices at or over that budget


@dataclass(frozen=True)
class UsageReport:
    day: date
    groups: tuple[GroupUsage, ...]
    devices: tuple[tuple[str, str, int], ...]  # (group, device, minutes), only on request


def usage_report(rules: Rules, minutes: dict[str, int], day: date, budgets: dict[str, int | None], *,
                 with_devices: bool = False) -> UsageReport:
    """Per group: how many devices used how many minutes on `day`. `budgets` maps each group to the budget of
    its profile in force now. Devices the inventory no longer knows are reported under `(not in inventory)`."""
    group_of = {device.name: device.group for device in rules.devices}
    members: dict[str, list[str]] = {name: [] for name in rules.groups}
    for device in rules.devices:
        members.setdefault(device.group, []).append(device.name)
    strays = sorted(device for device in minutes if device not in group_of)
    if strays:
        members["(not in inventory)"] = strays
    groups = []
    for group, devices in members.items():
        used = [minutes.get(device, 0) for device in devices]
        budget = budgets.get(group)
        groups.append(GroupUsage(group, len(devices), sum(1 for m in used if m), sum(used), max(used, default=0),
                                 budget, sum(1 for m in used if budget is not None and m >= budget)))
    rows = tuple(sorted((group_of.get(device, "(not in inventory)"), device, count)
                        for device, count in minutes.items())) if with_devices else ()
    return UsageReport(day, tuple(groups), rows)


def budgets_now(rules: Rules, at: datetime) -> dict[str, int | None]:
    """The screen-time budget of each group's profile in force at `at` (None: no budget)."""
    clock = ScheduleClock(rules.timezone, rules.holidays)
    return {name: rules.profiles[clock.profile_for(group, rules.schedules, at).profile].screen_time_minutes
            for name, group in rules.groups.items()}


def report_to_json(report: UsageReport) -> dict[str, object]:
    return {"day": report.day.isoformat(),
            "groups": [{"group": g.group, "devices": g.devices, "active": g.active, "total_minutes": g.total_minutes,
                        "most_minutes": g.most_minutes, "budget_now": g.budget_now, "spent": g.spent}
                       for g in report.groups],
            **({"devices": [{"group": group, "device": device, "minutes": minutes}
                            for group, device, minutes in report.devices]} if report.devices else {})}
