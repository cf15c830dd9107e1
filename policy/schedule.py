"""Which profile a group has at a given instant, and until when: schedules, holidays, the time zone.

Times are evaluated in the rules' time zone at minute precision; a range past midnight belongs to the day it starts.

A time range is wall-clock time. On the day clocks skip an hour (spring), the part of a range inside the skipped
hour does not exist: `02:15-02:45` never holds that day, and `01:30-02:30` ends when the clocks jump. On the day
clocks repeat an hour (autumn), a range inside the repeated hour holds for both passes: `02:15-02:45` holds twice.
Every instant computed here ("until") is a real instant, in UTC; local time is only for reading the rules.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from policy.model import Group, Holiday, Schedule, ScheduleRule

# How far ahead to look for the next change before saying "no change known": a year covers every holiday.
HORIZON_DAYS = 370


@dataclass(frozen=True)
class ProfileInForce:
    """The profile a group has now, the schedule line that chose it (None: the default), until when, and all that
    in words (the line of a decision's trail; written once per schedule change, not per decision)."""

    profile: str
    rule: ScheduleRule | None
    until: datetime | None
    description: str


class ScheduleClock:
    def __init__(self, timezone: str, holidays: tuple[Holiday, ...]) -> None:
        self.zone = zoneinfo.ZoneInfo(timezone)
        self.holidays = holidays

    def holiday_on(self, day: date) -> Holiday | None:
        for holiday in self.holidays:
            if day in holiday.dates:
                return holiday
        return None

    def _day_matches(self, rule: ScheduleRule, day: date) -> bool:
        if rule.weekdays is not None and day.weekday() not in rule.weekdays:
            return False
        if rule.dates and not any(day in dates for dates in rule.dates):
            return False
        return rule.on_holidays is None or (self.holiday_on(day) is not None) == rule.on_holidays

    def rule_matches(self, rule: ScheduleRule, local: datetime) -> bool:
        day = local.date()
        if not rule.times:
            return self._day_matches(rule, day)
        minute = local.hour * 60 + local.minute
        for span in rule.times:
            if not span.crosses_midnight:
                if span.start <= minute < span.end and self._day_matches(rule, day):
                    return True
            elif (minute >= span.start and self._day_matches(rule, day)) or (
                minute < span.end and self._day_matches(rule, day - timedelta(days=1))
            ):
                return True
        return False

    def _choose(self, schedule: Schedule, at: datetime) -> tuple[str, ScheduleRule | None]:
        local = at.astimezone(self.zone)
        for rule in schedule.rules:
            if self.rule_matches(rule, local):
                return rule.profile, rule
        return schedule.default, None

    def profile_for(self, group: Group, schedules: dict[str, Schedule], at: datetime) -> ProfileInForce:
        """The profile in force for `group` at `at` (an aware datetime) and the next instant it may change."""
        if group.schedule is None:
            assert group.profile is not None
            return ProfileInForce(group.profile, None, None,
                                  f"profile {group.profile} in force (fixed profile of group {group.name})")
        schedule = schedules[group.schedule]
        profile, rule = self._choose(schedule, at)
        until = self._next_change(schedule, at, (profile, rule))
        why = str(rule.origin) if rule is not None else f"default of schedule {schedule.name}"
        until_text = f" until {until.astimezone(self.zone):%Y-%m-%d %H:%M}" if until else ""
        return ProfileInForce(profile, rule, until, f"profile {profile} in force ({why}){until_text}")

    def _next_change(self, schedule: Schedule, at: datetime,
                     current: tuple[str, ScheduleRule | None]) -> datetime | None:
        """The first instant after `at` where the schedule chooses otherwise: at a range's edge (each real instant
        whose wall-clock time it is: none in a skipped hour, two in a repeated one) or when the clocks change."""
        edges = sorted({0} | {m % 1440 for r in schedule.rules for span in r.times for m in (span.start, span.end)})
        at = at.astimezone(UTC)
        first_day = at.astimezone(self.zone).date()
        for offset in range(HORIZON_DAYS):
            day = first_day + timedelta(days=offset)
            candidates = sorted({instant for minute in edges for instant in self.instants(day, minute)}
                                | set(self.clock_changes(day)))
            for candidate in candidates:
                if candidate > at and self._choose(schedule, candidate) != current:
                    return candidate
        return None

    def instants(self, day: date, minute: int) -> list[datetime]:
        """The real instants (UTC) whose wall-clock time is `minute` past midnight on `day`: one on most days, none
        inside a skipped hour, two inside a repeated one."""
        wall = datetime.combine(day, time(minute // 60, minute % 60))
        found = []
        for fold in (0, 1):
            instant = wall.replace(tzinfo=self.zone, fold=fold).astimezone(UTC)
            if instant.astimezone(self.zone).replace(tzinfo=None) == wall and instant not in found:
                found.append(instant)
        return found

    def clock_changes(self, day: date) -> list[datetime]:
        """The instants (UTC) on `day` where the zone's offset changes (a DST transition), to the minute."""
        start = datetime.combine(day, time(0)).replace(tzinfo=self.zone).astimezone(UTC)
        end = start + timedelta(hours=25)
        if start.astimezone(self.zone).utcoffset() == end.astimezone(self.zone).utcoffset():
            return []
        low, high = start, end  # the offset differs between them: find the first minute with the new offset
        before = low.astimezone(self.zone).utcoffset()
        while high - low > timedelta(minutes=1):
            middle = low + (high - low) / 2
            middle = middle.replace(second=0, microsecond=0)
            if middle <= low:
                middle = low + timedelta(minutes=1)
            if middle.astimezone(self.zone).utcoffset() == before:
                low = middle
            else:
                high = middle
        return [high] if high.astimezone(self.zone).date() == day else []
