"""When a blocked site really opens for a client: `next_allowed` against a brute-force walk, minute by minute, of
the same rules — nights, weekends, holidays, dates, a profile that blocks the site and one that does not."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from policy.clients import Client
from policy.decision import Action, Query
from policy.engine import decide, next_allowed
from policy.snapshot import Snapshot
from policy.state import EMPTY_STATE
from tests.conftest import paris, snapshot_of

RULES = """
timezone: Europe/Paris
lists:
  games: {source: games.txt, format: domains}
categories:
  games: [games]
always_block: []
holidays:
  - {name: Pont, from: 2026-11-26, to: 2026-11-27}
groups:
  school: {networks: [10.20.1.0/24], schedule: week}
profiles:
  class: {block: [games]}
  free: {}
  nuit: {mode: block-all}
schedules:
  week:
    default: class
    rules:
      - {profile: nuit, time: "20:00-07:00"}
      - {profile: free, days: [sat, sun]}
      - {profile: free, holidays: true, time: "14:00-18:00"}
      - {profile: free, dates: ["2026-12-02"], time: "10:30-10:45"}
"""
CLIENT = Client("school", None, "network 10.20.1.0/24")
HORIZON = timedelta(days=6)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    return snapshot_of(tmp_path_factory.mktemp("opens"), {"rules.yaml": RULES, "games.txt": "roblox.com\n"})


def brute_force(snapshot: Snapshot, query: Query) -> datetime | None:
    at = query.at
    while at <= query.at + HORIZON:
        if decide(query._replace(at=at), snapshot, EMPTY_STATE).action is Action.ALLOW:
            return at
        at += timedelta(minutes=1)
    return None


@pytest.mark.parametrize(("host", "at"), [
    ("roblox.com", "2026-11-23 10:00"),  # Monday class: the pont's afternoon is the first opening
    ("roblox.com", "2026-11-26 19:00"),  # the holiday's evening: the night, then Friday's class, then Saturday
    ("roblox.com", "2026-11-27 16:00"),  # inside the holiday's free hours: allowed (not asked)
    ("roblox.com", "2026-12-01 22:00"),  # Tuesday night: the one dated line, Wednesday 10:30
    ("roblox.com", "2026-12-02 10:44"),
    ("roblox.com", "2026-12-02 10:45"),  # just after it: Saturday 07:00
    ("wikipedia.org", "2026-11-24 23:59"),  # the night: 07:00
    ("wikipedia.org", "2026-11-28 03:00"),  # a weekend night
])
def test_the_opening_is_the_first_minute_a_walk_finds_allowed(snapshot: Snapshot, host: str, at: str) -> None:
    query = Query(CLIENT, host, paris(at))
    if decide(query, snapshot, EMPTY_STATE).action is Action.ALLOW:
        return
    expected = brute_force(snapshot, query)
    found = next_allowed(query, snapshot, EMPTY_STATE, horizon=HORIZON)
    assert found == expected, (at, found, expected)
    assert found is None or found.tzinfo is UTC


def test_a_site_no_profile_allows_does_not_open(tmp_path_factory: pytest.TempPathFactory) -> None:
    always = snapshot_of(tmp_path_factory.mktemp("never"), {
        "rules.yaml": RULES.replace("free: {}", "free: {block: [games]}"), "games.txt": "roblox.com\n"})
    assert next_allowed(Query(CLIENT, "roblox.com", paris("2026-11-23 10:00")), always, EMPTY_STATE) is None
