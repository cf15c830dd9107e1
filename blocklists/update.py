"""`vigie lists update`: fetch the list sources that are URLs, check them, and swap them in atomically.

For each remote source: a conditional GET (ETag / Last-Modified from the last success), a size limit and an
overall deadline (a server that hangs or trickles cannot hold the update), the download written beside the last
good copy, then read in full with the same parser and archive checks the services use, and compared with the last
good copy: a list that lost more than `max_shrink` of its entries is refused as suspicious. Only then does one
rename replace the file. On any failure the last good copy stays where it is and keeps serving.

What happened is kept in `<download>.state.json` (validators, entry count, digest, times, last error): it feeds
`vigie lists stats`, the next conditional request and the refresh schedule shared by every process.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from blocklists.compiled import content_digest
from blocklists.errors import ListError
from blocklists.sources import SourceSpec, load_source

log = logging.getLogger(__name__)

USER_AGENT = "vigie-list-updater/1 (school tablet filter)"
_CHUNK = 1 << 16


@dataclass(frozen=True)
class UpdatePolicy:
    """How updates are bounded; rules.yaml `server.lists` sets them (see docs/rules.md)."""

    refresh_seconds: int = 24 * 3600
    timeout_seconds: float = 300.0
    max_bytes: int = 512 * 1024 * 1024
    max_shrink: float = 0.5


class UpdateResult(enum.Enum):
    UPDATED = "updated"
    NOT_MODIFIED = "not_modified"
    FAILED = "failed"


@dataclass(frozen=True)
class SourceState:
    """What the updater knows of one downloaded source, persisted beside it."""

    location: str = ""
    etag: str | None = None
    last_modified: str | None = None
    fetched_at: float | None = None  # when the copy on disk was downloaded
    checked_at: float | None = None  # last time the source answered (downloaded or not modified)
    attempted_at: float | None = None
    entries: int | None = None
    size: int | None = None
    sha256: str | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class UpdateOutcome:
    source: str
    result: UpdateResult
    message: str
    entries: int | None = None
    previous_entries: int | None = None


def state_path(spec: SourceSpec) -> Path:
    return spec.local_path.with_name(spec.local_path.name + ".state.json")


def read_state(spec: SourceSpec) -> SourceState:
    try:
        data = json.loads(state_path(spec).read_text(encoding="utf-8"))
        return SourceState(**{k: v for k, v in data.items() if k in SourceState.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return SourceState(location=spec.location)


def _write_state(spec: SourceSpec, state: SourceState) -> None:
    _atomic_write(state_path(spec), json.dumps(asdict(state), indent=1).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(file.name, path)


def count_entries(spec: SourceSpec) -> int:
    """Read a source as the services will (archive checks included); raises ListError when it is unusable."""
    loaded = load_source(spec)
    return sum(len(p.domains) + len(p.urls) + len(p.addresses) for p in loaded.lists.values())


class _Refused(Exception):
    """A download stopped for a reason the admin should read."""


def _download(spec: SourceSpec, state: SourceState, policy: UpdatePolicy, target: Path, *,
              conditional: bool) -> tuple[bool, str | None, str | None]:
    """GET the source into `target`. Returns (modified, etag, last_modified); raises _Refused."""
    request = urllib.request.Request(spec.location, headers={"User-Agent": USER_AGENT})
    if conditional and state.location == spec.location and spec.local_path.exists():
        if state.etag:
            request.add_header("If-None-Match", state.etag)
        if state.last_modified:
            request.add_header("If-Modified-Since", state.last_modified)
    deadline = time.monotonic() + policy.timeout_seconds
    try:
        with urllib.request.urlopen(request, timeout=policy.timeout_seconds) as response, open(target, "wb") as out:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                raise _Refused(f"the server announces {int(declared):,} bytes, over the limit of "
                               f"{policy.max_bytes:,} (server.lists.max_size)")
            received = 0
            while chunk := response.read(_CHUNK):
                received += len(chunk)
                if received > policy.max_bytes:
                    raise _Refused(f"more than {policy.max_bytes:,} bytes received (server.lists.max_size)")
                if time.monotonic() > deadline:
                    raise _Refused(f"download not finished after {policy.timeout_seconds:g} s "
                                   "(server.lists.timeout)")
                out.write(chunk)
            if declared and declared.isdigit() and received != int(declared):
                raise _Refused(f"connection closed after {received:,} of {int(declared):,} bytes")
            out.flush()
            os.fsync(out.fileno())
            return True, response.headers.get("ETag"), response.headers.get("Last-Modified")
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            return False, state.etag, state.last_modified
        raise _Refused(f"the server answered HTTP {exc.code} {exc.reason}") from None
    except (TimeoutError, OSError, urllib.error.URLError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Refused(f"cannot download ({reason or type(exc).__name__})") from None


def update_source(spec: SourceSpec, policy: UpdatePolicy, *, accept_shrink: bool = False,
                  conditional: bool = True) -> UpdateOutcome:
    """Bring one remote source up to date. Never raises for a network or content problem: the outcome says it."""
    previous = read_state(spec)
    now = time.time()
    spec.local_path.parent.mkdir(parents=True, exist_ok=True)
    staging = spec.local_path.with_name(f".{spec.local_path.name}.download")
    try:
        modified, etag, last_modified = _download(spec, previous, policy, staging, conditional=conditional)
        if not modified:
            _write_state(spec, replace(previous, checked_at=now, attempted_at=now, last_error=None))
            return UpdateOutcome(spec.name, UpdateResult.NOT_MODIFIED, "not modified since the last download",
                                 previous.entries, previous.entries)
        try:
            entries = count_entries(replace(spec, local_path=staging))
        except ListError as exc:
            raise _Refused(f"the download is not a usable {spec.format.value} list: {exc}") from None
        if entries == 0:
            raise _Refused("the download holds no entry")
        kept = previous.entries if spec.local_path.exists() else None
        if kept and not accept_shrink and entries < kept * (1 - policy.max_shrink):
            raise _Refused(f"suspicious: {entries:,} entries where the last good copy has {kept:,} (more than "
                           f"{policy.max_shrink:.0%} fewer; server.lists.max_shrink, or "
                           "`vigie lists update --accept-shrink` once checked)")
        digest = content_digest(staging)
        os.replace(staging, spec.local_path)
        _write_state(spec, SourceState(spec.location, etag, last_modified, now, now, now, entries,
                                       spec.local_path.stat().st_size, digest, None))
        return UpdateOutcome(spec.name, UpdateResult.UPDATED, f"{entries:,} entries", entries, kept)
    except _Refused as exc:
        staging.unlink(missing_ok=True)
        kept_note = "the last good copy keeps serving" if spec.local_path.exists() else "no copy on disk yet"
        with contextlib.suppress(OSError):
            _write_state(spec, replace(previous, location=previous.location or spec.location, attempted_at=now,
                                       last_error=str(exc)))
        return UpdateOutcome(spec.name, UpdateResult.FAILED, f"{exc}; {kept_note}", None, previous.entries)


def is_due(spec: SourceSpec, policy: UpdatePolicy, now: float) -> bool:
    """Whether the refresh schedule calls for an attempt; after a failure, wait before trying again."""
    state = read_state(spec)
    retry_after = min(policy.refresh_seconds, 3600)
    if state.last_error and state.attempted_at is not None and now - state.attempted_at < retry_after:
        return False
    if not spec.local_path.exists() or state.location != spec.location:
        return True
    return state.checked_at is None or now - state.checked_at >= policy.refresh_seconds


@contextlib.contextmanager
def update_lock(directory: Path, *, wait: bool) -> Iterator[bool]:
    """One updater at a time per data directory (several services and cron may share it). Yields whether this
    process holds the lock; with `wait`, blocks until it does."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".update.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def updating_now(directory: Path) -> bool:
    """Whether an updater (this process's or another's) holds the lock: reloads wait for its compiled lists."""
    with update_lock(directory, wait=False) as held:
        return not held
