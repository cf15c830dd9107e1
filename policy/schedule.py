"""Which profile a group has at a given instant, and until when: schedules, holidays, the time zone.

Times are evaluated in the rules' time zone at minute precision; a range past midnight belongs to the day it starts.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

from policy.model import Group, Holiday, Schedule, ScheduleRule

# How far ahead to look for the next change before saying "no change known": a year covers every holiday.
HORIZON_DAYS = 370


@dataclass(frozen=True)
class ProfileInForce:
    """The profile a group has now, the schedule line that chose it (None: the default), and until when."""

    profile: str
    rule: ScheduleRule | None
    until: datetime | None


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
            return ProfileInForce(group.profile, None, None)
        schedule = schedules[group.schedule]
        profile, rule = self._choose(schedule, at)
        return ProfileInForce(profile, rule, self._next_change(schedule, at, (profile, rule)))

    def _next_change(self, schedule: Schedule, at: datetime,
                     current: tuple[str, ScheduleRule | None]) -> datetime | None:
        edges = sorted({0} | {m % 1440 for r in schedule.rules for span in r.times for m in (span.start, span.end)})
        first_day = at.astimezone(self.zone).date()
        for offset in range(HORIZON_DAYS):
            day = first_day + timedelta(days=offset)
            for minute in edges:
                candidate = datetime.combine(day, time(minute // 60, minute % 60), tzinfo=self.zone)
                if candidate <= at:
                    continue
                if self._choose(schedule, candidate) != current:
                    return candidate
        return None
