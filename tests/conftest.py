"""Shared test helpers: rules written to a temporary directory, the UT1 snapshot, free ports."""

from __future__ import annotations

import os
import socket
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from policy.snapshot import ListCache, Snapshot
from tests.ut1_sample import build_ut1_archive
from vigie.loading import load_snapshot

REPO = Path(__file__).resolve().parent.parent
# The real UT1 snapshot, for the few tests and the benchmarks that need it: VIGIE_UT1_ARCHIVE, else shared/ beside
# the repository (as CI has it). A clone without it runs every other test.
UT1_ARCHIVE = Path(os.environ.get("VIGIE_UT1_ARCHIVE", REPO.parent / "shared" / "data" / "ut1-blacklists.tar.gz"))


def write_tree(directory: Path, files: dict[str, str]) -> Path:
    """Write `files` (name → text, dedented) below `directory`; returns the path of rules.yaml."""
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return directory / "rules.yaml"


def snapshot_of(directory: Path, files: dict[str, str]) -> Snapshot:
    return load_snapshot(write_tree(directory, files), ListCache()).snapshot


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


def free_port_run(count: int) -> int:
    """The first of `count` consecutive TCP ports free on 127.0.0.1: a Vigie with workers serves metrics on its
    port and the next ones, and a worker that cannot listen stops the whole service."""
    while True:
        first = free_port()
        sockets = []
        try:
            for port in range(first, first + count):
                probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(probe)
                probe.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for probe in sockets:
                probe.close()


@pytest.fixture(scope="session")
def ut1_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small archive in UT1's official layout, built here (tests/ut1_sample.py): no download, nothing beside the
    repository."""
    return build_ut1_archive(tmp_path_factory.mktemp("ut1") / "blacklists.tar.gz")


@pytest.fixture(scope="session")
def real_ut1_archive() -> Path:
    """The real UT1 snapshot, for the tests that need its size or content; skipped when it is not there."""
    if not UT1_ARCHIVE.exists():
        pytest.skip(f"no UT1 snapshot at {UT1_ARCHIVE} (set VIGIE_UT1_ARCHIVE)")
    return UT1_ARCHIVE


def paris(text: str) -> datetime:
    """`2026-11-23 14:05` in Europe/Paris, as an aware datetime."""
    from zoneinfo import ZoneInfo

    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo("Europe/Paris"))


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)
