"""Shared state: used minutes and overrides in the stores (SQLite, a real redis-server), and the keeper that brings
them to the hot paths through outages, restarts, day changes and daylight-saving changes."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from policy.loader import load_rules
from policy.state import Override, OverrideKind
from policy.state_keeper import StateKeeper
from policy.state_store import OverrideNotFound, StateStore, StoreAddress, StoreUnavailable, open_store
from policy.usage import UsageRecorder, local_day
from tests.conftest import REPO, paris, write_tree
from tests.state_servers import RedisServer

PARIS = ZoneInfo("Europe/Paris")


class FakeClock:
    def __init__(self, at: datetime) -> None:
        self.now = at.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def override(override_id: str, expires_at: datetime, kind: OverrideKind = OverrideKind.ALLOW,
             domain: str | None = "youtube.com") -> Override:
    return Override(override_id, kind, "cm2-a", None, domain, expires_at, "Mme Martin", "sortie scolaire",
                    created_at=expires_at - timedelta(hours=1))


# -- minutes of a local day -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("day", "minutes"), [("2026-11-23", 1440), ("2026-03-29", 1380), ("2026-10-25", 1500)],
                         ids=["an ordinary day", "the spring daylight-saving day", "the autumn daylight-saving day"])
def test_a_day_has_as_many_minutes_as_its_hours(day: str, minutes: int) -> None:
    local = local_day(paris(f"{day} 12:00").timestamp(), PARIS)
    assert local.day == date.fromisoformat(day)
    assert (local.end - local.start) / 60 == minutes
    assert local.minute(local.end - 1) == minutes - 1


def test_the_repeated_october_hour_counts_as_two_hours() -> None:
    first = datetime(2026, 10, 25, 2, 30, tzinfo=PARIS, fold=0).timestamp()
    second = datetime(2026, 10, 25, 2, 30, tzinfo=PARIS, fold=1).timestamp()
    day = local_day(first, PARIS)
    assert second - first == 3600
    assert day.minute(second) - day.minute(first) == 60


def test_a_minute_marked_twice_counts_once_and_midnight_starts_a_new_day() -> None:
    clock = FakeClock(paris("2026-11-23 23:59:10"))
    recorder = UsageRecorder(lambda: PARIS, clock)
    recorder.record("tab-01")
    clock.advance(30)
    recorder.record("tab-01")  # the same minute
    recorder.record("tab-02")
    clock.advance(30)  # 00:00:10 the next day
    recorder.record("tab-01")
    assert recorder.day == date(2026, 11, 24)
    assert recorder.today() == (date(2026, 11, 24), {"tab-01": 1})
    pending = recorder.take_pending()
    assert {day: {d: bits.bit_count() for d, bits in devices.items()} for day, devices in pending.items()} == {
        date(2026, 11, 23): {"tab-01": 1, "tab-02": 1}, date(2026, 11, 24): {"tab-01": 1}}
    assert recorder.take_pending() == {}


# -- the stores -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    if request.param == "sqlite":
        opened = open_store(StoreAddress.parse("sqlite:///state.sqlite3", tmp_path))
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        server.client().flushall()
        opened = open_store(StoreAddress.parse(server.url, tmp_path))
    yield opened
    opened.close()


def bits(*minutes: int) -> int:
    return sum(1 << minute for minute in minutes)


def test_the_store_counts_each_minute_once_per_device_and_day(store: StateStore) -> None:
    monday, tuesday = date(2026, 11, 23), date(2026, 11, 24)
    store.add_usage({monday: {"tab-01": bits(600, 601), "tab-02": bits(600)}})
    store.add_usage({monday: {"tab-01": bits(601, 602)}, tuesday: {"tab-01": bits(0)}})  # 601 again
    assert store.usage(monday) == {"tab-01": 3, "tab-02": 1}
    assert store.usage(tuesday) == {"tab-01": 1}
    assert store.usage(date(2026, 11, 25)) == {}


def test_the_store_keeps_overrides_until_they_expire_or_are_cleared(store: StateStore) -> None:
    now = datetime.now(UTC)
    store.add_override(override("a1", now + timedelta(minutes=45)))
    store.add_override(override("a2", now + timedelta(minutes=30), OverrideKind.LOCK, None))
    store.add_override(override("old", now - timedelta(minutes=1)))
    assert [o.id for o in store.overrides(now)] == ["a2", "a1"], "oldest first"
    assert [o.id for o in store.overrides(now + timedelta(minutes=40))] == ["a1"]
    found = {o.id: o for o in store.overrides(now)}
    assert found["a2"].kind is OverrideKind.LOCK and found["a2"].domain is None
    assert found["a1"].note == "sortie scolaire" and found["a1"].author == "Mme Martin"
    assert abs((found["a1"].expires_at - (now + timedelta(minutes=45))).total_seconds()) < 0.01
    assert store.clear_override("a1").id == "a1"
    assert [o.id for o in store.overrides(now)] == ["a2"]
    with pytest.raises(OverrideNotFound):
        store.clear_override("a1")
    with pytest.raises(OverrideNotFound):
        store.clear_override("old")


def test_processes_sharing_one_sqlite_file_count_each_minute_once(tmp_path: Path) -> None:
    """Two processes write overlapping minutes at the same time: the file holds each minute once."""
    script = textwrap.dedent("""
        import sys
        from datetime import date
        from pathlib import Path
        from policy.store_sqlite import SqliteStore
        store = SqliteStore(Path(sys.argv[1]))
        first = int(sys.argv[2])
        for minute in range(first, first + 300):
            store.add_usage({date(2026, 11, 23): {"tab-01": 1 << minute, f"tab-{minute % 7}": 1 << minute}})
    """)
    path = tmp_path / "state.sqlite3"
    writers = [subprocess.Popen([sys.executable, "-c", script, str(path), str(first)], cwd=REPO)
               for first in (0, 150)]
    assert [writer.wait(timeout=60) for writer in writers] == [0, 0]
    usage = open_store(StoreAddress("sqlite", str(path))).usage(date(2026, 11, 23))
    assert usage["tab-01"] == 450
    assert sum(usage.values()) == 450 + 450


def test_an_unusable_sqlite_file_is_named_in_the_error(tmp_path: Path) -> None:
    bad = tmp_path / "state.sqlite3"
    bad.write_bytes(b"this is not a database, " * 100)
    with pytest.raises(StoreUnavailable, match=str(bad)):
        open_store(StoreAddress("sqlite", str(bad)))


def test_a_relative_sqlite_path_is_relative_to_the_rules(tmp_path: Path) -> None:
    assert StoreAddress.parse("sqlite:///var/state.sqlite3", tmp_path).target == str(tmp_path / "var/state.sqlite3")
    assert StoreAddress.parse("sqlite:////srv/state.sqlite3", tmp_path).target == "/srv/state.sqlite3"
    assert str(StoreAddress.parse("redis://10.0.0.5:6379/2", tmp_path)) == "redis://10.0.0.5:6379/2"
    with pytest.raises(ValueError, match="not a state store"):
        StoreAddress.parse("postgres://x", tmp_path)


# -- the keeper -------------------------------------------------------------------------------------------------

def keeper_on(url: str, tmp_path: Path, clock: FakeClock | None = None) -> StateKeeper:
    address = StoreAddress.parse(url, tmp_path)
    if clock is None:
        return StateKeeper(lambda: open_store(address), lambda: PARIS, tmp_path / "spool")
    return StateKeeper(lambda: open_store(address), lambda: PARIS, tmp_path / "spool", clock=clock)


def test_through_a_redis_outage_decisions_keep_their_state_and_no_minute_is_lost(tmp_path: Path) -> None:
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))
    with RedisServer(tmp_path / "redis") as server:
        keeper = keeper_on(server.url, tmp_path, clock)
        keeper.step()
        ends = datetime.fromtimestamp(clock.now, UTC) + timedelta(hours=1)
        open_store(StoreAddress("redis", server.url)).add_override(override("o1", ends))
        for _ in range(3):
            keeper.usage.record("tab-01")
            clock.advance(60)
        keeper.step()
        assert [o.id for o in keeper.view.overrides] == ["o1"] and keeper.store_up
        assert keeper.view.minutes_used_today == {"tab-01": 3}

        server.kill()
        for _ in range(4):  # four more minutes while Redis is away
            keeper.usage.record("tab-01")
            clock.advance(60)
            keeper.step()
        assert not keeper.store_up
        assert [o.id for o in keeper.view.overrides] == ["o1"], "the last overrides keep deciding"
        assert keeper.view.minutes_used_today == {"tab-01": 7}, "minutes counted in memory meanwhile"

        server.start()  # an empty Redis: it had no persistence
        keeper.step()
        assert keeper.store_up
        today = datetime.fromtimestamp(clock.now, PARIS).date()
        assert open_store(StoreAddress("redis", server.url)).usage(today) == {"tab-01": 7}
        assert [o.id for o in open_store(StoreAddress("redis", server.url)).overrides(
            datetime.fromtimestamp(clock.now, UTC))] == ["o1"]
        assert keeper.view.minutes_used_today == {"tab-01": 7}
        keeper.stop()


def test_minutes_the_store_cannot_take_at_stop_are_written_by_the_next_start(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        keeper = keeper_on(server.url, tmp_path)
        keeper.step()
        server.kill()
        keeper.usage.record("tab-01")
        keeper.usage.record("tab-02")
        keeper.stop()
        assert len(list((tmp_path / "spool").glob("usage-spool-*.json"))) == 1

        server.start()
        restarted = keeper_on(server.url, tmp_path)
        restarted.start()
        assert restarted.view.minutes_used_today == {"tab-01": 1, "tab-02": 1}
        assert list((tmp_path / "spool").iterdir()) == []
        restarted.stop()


def test_at_midnight_the_view_starts_the_new_day_at_zero(tmp_path: Path) -> None:
    clock = FakeClock(paris("2026-03-28 23:58:30"))  # the night before the spring daylight-saving change
    keeper = keeper_on("sqlite:///state.sqlite3", tmp_path, clock)
    for _ in range(3):
        keeper.usage.record("tab-01")
        clock.advance(60)
    keeper.step()  # 00:01:30 on the 29th
    assert keeper.view.day == date(2026, 3, 29)
    assert keeper.view.minutes_used_today == {"tab-01": 1}
    store = open_store(StoreAddress.parse("sqlite:///state.sqlite3", tmp_path))
    assert store.usage(date(2026, 3, 28)) == {"tab-01": 2}
    clock.now = paris("2026-03-29 03:30").timestamp()  # 02:00-03:00 does not exist that night
    keeper.usage.record("tab-01")
    keeper.step()
    minute = local_day(clock.now, PARIS).minute(clock.now)
    assert minute == 2 * 60 + 30, "03:30 is 2 h 30 after midnight that day"
    assert keeper.view.minutes_used_today == {"tab-01": 2}
    keeper.stop()


def test_a_keeper_started_while_the_store_is_away_serves_and_connects_later(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")  # not started yet
    keeper = keeper_on(server.url, tmp_path)
    keeper.start()
    assert not keeper.store_up and keeper.view.overrides == ()
    keeper.usage.record("tab-01")
    with server:
        keeper.step()
        assert keeper.store_up
        assert keeper.view.minutes_used_today["tab-01"] == 1
        keeper.stop()


def test_processes_starting_together_all_open_a_new_sqlite_store(tmp_path: Path) -> None:
    """The workers and the proxy of one server open the same new file at the same instant. SQLite's refusal to wait
    while another process switches the file to WAL is rare (about 1 start in 100 here): 4 rounds of 12."""
    script = ("import sys, time\n"
              "from pathlib import Path\n"
              "from policy.store_sqlite import SqliteStore\n"
              "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
              "SqliteStore(Path(sys.argv[1])).close()\n")
    for round_number in range(4):
        path = tmp_path / f"state-{round_number}.sqlite3"
        start_at = str(time.time() + 1.0)
        processes = [subprocess.Popen([sys.executable, "-c", script, str(path), start_at], cwd=REPO,
                                      stderr=subprocess.PIPE, text=True) for _ in range(12)]
        errors = [process.communicate(timeout=30)[1] for process in processes]
        failures = [error for process, error in zip(processes, errors, strict=True) if process.returncode != 0]
        assert not failures, failures[0]


def test_a_redis_store_with_a_password_reads_it_from_a_file_and_never_shows_it(tmp_path: Path) -> None:
    (tmp_path / "redis-password").write_text("s3cret-of-the-city\n")
    with RedisServer(tmp_path / "redis", password="s3cret-of-the-city") as server:
        without = open_store(StoreAddress.parse(server.url, tmp_path))
        with pytest.raises(StoreUnavailable, match="authenticated"):
            without.usage(date(2026, 11, 23))
        address = dataclasses.replace(StoreAddress.parse(server.url, tmp_path),
                                      password_file=str(tmp_path / "redis-password"))
        store = open_store(address)
        store.add_usage({date(2026, 11, 23): {"tab-01": bits(600)}})
        assert store.usage(date(2026, 11, 23)) == {"tab-01": 1}
        store.close()
        written = StoreAddress.parse(server.url.replace("//", "//vigie:s3cret@"), tmp_path)
        assert "s3cret" not in str(written) and str(written).startswith("redis://vigie:***@127.0.0.1:")


def test_the_password_file_is_read_from_the_rules(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": """
        server:
          state: redis://127.0.0.1:6379/0
          state_password_file: secrets/redis
        groups:
          school: {networks: [10.20.1.0/24], profile: class}
        profiles:
          class: {}
        always_block: []
        """})
    assert load_rules(rules).rules.server.state.password_file == str(tmp_path / "secrets" / "redis")
