"""The embedded state store: one SQLite file in WAL mode, shared by the processes of one server.

Used minutes are rows (day, device, minute) whose primary key makes a second mark of the same minute a no-op; a
trigger keeps the per-device totals that the keepers read every second, so a read never counts rows.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from policy.state import Override, OverrideKind
from policy.state_store import USAGE_RETENTION_DAYS, OverrideNotFound, StoreUnavailable
from policy.usage import Minutes, minutes_in

T = TypeVar("T")

SCHEMA_VERSION = 1
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS usage_minutes (
        day TEXT NOT NULL, device TEXT NOT NULL, minute INTEGER NOT NULL,
        PRIMARY KEY (day, device, minute)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS usage_totals (
        day TEXT NOT NULL, device TEXT NOT NULL, minutes INTEGER NOT NULL,
        PRIMARY KEY (day, device)) WITHOUT ROWID""",
    """CREATE TRIGGER IF NOT EXISTS usage_counted AFTER INSERT ON usage_minutes BEGIN
        INSERT INTO usage_totals VALUES (NEW.day, NEW.device, 1)
        ON CONFLICT (day, device) DO UPDATE SET minutes = minutes + 1;
    END""",
    """CREATE TABLE IF NOT EXISTS overrides (
        id TEXT PRIMARY KEY, kind TEXT NOT NULL, grp TEXT NOT NULL, device TEXT, domain TEXT,
        created_at REAL NOT NULL, expires_at REAL NOT NULL, author TEXT NOT NULL, note TEXT NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._closed = threading.Event()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit; transactions are explicit. Several threads (the admin API) may share the connection.
            self._db = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
            self._enable_wal()
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a crash of Vigie
            with self._transaction():
                for statement in _SCHEMA:  # not executescript(): it would commit our transaction
                    self._db.execute(statement)
                self._check_version()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"state store sqlite://{path}: {exc}") from None
        self._pruned_on: date | None = None

    def _enable_wal(self, seconds: float = 5.0) -> None:
        """WAL mode, set once per file. SQLite answers "database is locked" at once, without waiting, to a process
        switching a file to WAL while another does the same (the workers and the proxy of one server starting
        together): wait for the other, as the busy timeout does for everything else."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _check_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise StoreUnavailable(f"state store sqlite://{self.path} has schema {row[0]}, this Vigie knows "
                                   f"{SCHEMA_VERSION}: upgrade Vigie, or move the file away to start afresh")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlock between processes
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _run(self, work: Callable[[], T]) -> T:
        with self._lock:
            try:
                return work()
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"state store sqlite://{self.path}: {exc}") from None

    def add_usage(self, marks: Mapping[date, Minutes]) -> None:
        rows = [(day.isoformat(), device, minute) for day, devices in marks.items()
                for device, bits in devices.items() for minute in minutes_in(bits)]

        def write() -> None:
            with self._transaction():
                self._db.executemany("INSERT OR IGNORE INTO usage_minutes VALUES (?, ?, ?)", rows)
                self._prune(max(marks, default=None))

        self._run(write)

    def _prune(self, today: date | None) -> None:
        if today is None or today == self._pruned_on:
            return
        oldest = (today - timedelta(days=USAGE_RETENTION_DAYS)).isoformat()
        self._db.execute("DELETE FROM usage_minutes WHERE day < ?", (oldest,))
        self._db.execute("DELETE FROM usage_totals WHERE day < ?", (oldest,))
        self._db.execute("DELETE FROM overrides WHERE expires_at < ?", (time.time() - 86400,))
        self._pruned_on = today

    def usage(self, day: date) -> dict[str, int]:
        return self._run(lambda: dict(self._db.execute(
            "SELECT device, minutes FROM usage_totals WHERE day = ?", (day.isoformat(),)).fetchall()))

    def overrides(self, now: datetime) -> tuple[Override, ...]:
        rows = self._run(lambda: self._db.execute(
            f"SELECT {_OVERRIDE_COLUMNS} FROM overrides WHERE expires_at > ? ORDER BY created_at, id",
            (now.timestamp(),)).fetchall())
        return tuple(_override(row) for row in rows)

    def add_override(self, override: Override) -> None:
        created = (override.created_at or datetime.now(UTC)).timestamp()
        self._run(lambda: self._db.execute(
            "INSERT INTO overrides VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (override.id, override.kind.value, override.group, override.device, override.domain, created,
             override.expires_at.timestamp(), override.author, override.note)))

    def clear_override(self, override_id: str) -> Override:
        def clear() -> Override | None:
            with self._transaction():
                row = self._db.execute(f"SELECT {_OVERRIDE_COLUMNS} FROM overrides WHERE id = ? AND expires_at > ?",
                                       (override_id, time.time())).fetchone()
                if row is None:
                    return None
                self._db.execute("DELETE FROM overrides WHERE id = ?", (override_id,))
                return _override(row)

        cleared = self._run(clear)
        if cleared is None:
            raise OverrideNotFound(f"no override {override_id!r} in force (see `vigie override list`)")
        return cleared

    def wait_for_change(self, timeout: float) -> None:
        # Polling is enough here: reading the overrides of one file costs microseconds.
        self._closed.wait(timeout)

    def lost_data(self) -> bool:
        return False

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._db.close()


_OVERRIDE_COLUMNS = "id, kind, grp, device, domain, created_at, expires_at, author, note"


def _override(row: tuple[Any, ...]) -> Override:
    return Override(id=row[0], kind=OverrideKind(row[1]), group=row[2], device=row[3], domain=row[4],
                    created_at=datetime.fromtimestamp(row[5], UTC), expires_at=datetime.fromtimestamp(row[6], UTC),
                    author=row[7], note=row[8])
