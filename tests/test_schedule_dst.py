"""Schedules on the days clocks change: a decision made at instant t that holds until u is the same at every minute
of [t, u), and differs at u — over the daylight-saving days of six years, with lines inside the skipped and the
repeated hour. Instants are walked in UTC, minute by minute, as a clock on the wall never could."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.model import Origin, Schedule, ScheduleRule, TimeRange
from policy.schedule import ScheduleClock

ORIGIN = Origin("rules.yaml", 1, 1, "schedules.test")
CLOCK = ScheduleClock("Europe/Paris", ())
WINDOW = timedelta(hours=30)  # how far past t the minute walk checks


def rule(profile: str, times: str | None = None, days: frozenset[int] | None = None) -> ScheduleRule:
    spans = ()
    if times is not None:
        start, end = (int(part[:2]) * 60 + int(part[3:]) for part in times.split("-"))
        spans = (TimeRange(start, end),)
    return ScheduleRule(profile, days, spans, (), None, ORIGIN)


SUNDAY = frozenset({6})
SCHEDULES = {
    "inside the skipped and repeated hour": Schedule("s", (rule("late", "02:15-02:45", SUNDAY),), "day", ORIGIN),
    "across the changing hour": Schedule("s", (rule("night", "01:30-02:30"),), "day", ORIGIN),
    "a night past midnight": Schedule("s", (rule("night", "20:30-07:00"), rule("school", "08:20-16:40")), "home",
                                      ORIGIN),
    "the hour itself": Schedule("s", (rule("b", "02:00-03:00"), rule("c", "03:00-03:30")), "a", ORIGIN),
    "whole days": Schedule("s", (rule("weekend", None, frozenset({5, 6})),), "week", ORIGIN),
}


def dst_days() -> list[date]:
    """The last Sundays of March and October, 2026-2031, and the day before each."""
    days = []
    for year in range(2026, 2032):
        for month in (3, 10):
            last = date(year, month, 31)
            sunday = last - timedelta(days=(last.weekday() - 6) % 7)
            days += [sunday - timedelta(days=1), sunday]
    return days


instants = st.builds(lambda day, minute: datetime.combine(day, datetime.min.time(), UTC) + timedelta(minutes=minute),
                     st.sampled_from(dst_days()), st.integers(min_value=-120, max_value=26 * 60))


@pytest.mark.parametrize("shape", SCHEDULES, ids=str)
@settings(max_examples=60, deadline=None)
@given(at=instants)
def test_a_decision_holds_every_minute_until_its_end_and_changes_there(shape: str, at: datetime) -> None:
    schedule = SCHEDULES[shape]
    current = CLOCK._choose(schedule, at)
    until = CLOCK._next_change(schedule, at, current)
    assert until is None or (until > at and until.utcoffset() == timedelta(0)), until
    end = min(until, at + WINDOW) if until is not None else at + WINDOW
    minute = at
    while minute < end:
        assert CLOCK._choose(schedule, minute) == current, (minute, current, until)
        minute += timedelta(minutes=1)
    if until is not None:
        assert CLOCK._choose(schedule, until) != current, (until, current)


def test_a_range_inside_the_skipped_hour_never_holds_and_one_in_the_repeated_hour_holds_twice() -> None:
    schedule = SCHEDULES["inside the skipped and repeated hour"]
    spring = [datetime(2027, 3, 28, 0, 0, tzinfo=UTC) + timedelta(minutes=m) for m in range(180)]
    assert {CLOCK._choose(schedule, t)[0] for t in spring} == {"day"}
    autumn = [datetime(2026, 10, 24, 23, 0, tzinfo=UTC) + timedelta(minutes=m) for m in range(240)]
    late = [t for t in autumn if CLOCK._choose(schedule, t)[0] == "late"]
    # 02:15-02:45 CEST is 00:15-00:45 UTC, and 02:15-02:45 CET is 01:15-01:45 UTC: 30 minutes each pass.
    assert len(late) == 60 and late[0] == datetime(2026, 10, 25, 0, 15, tzinfo=UTC)
    assert late[30] == datetime(2026, 10, 25, 1, 15, tzinfo=UTC)
