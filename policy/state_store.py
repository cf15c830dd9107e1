"""Where shared state lives: the interface both stores implement, and `open_store` for a `server.state` address.

- `sqlite:///path`: the embedded default, shared by the processes of one server (`policy.store_sqlite`);
- `redis://host:port/db`: shared by several servers (`policy.store_redis`); `rediss://` for TLS, a user in the URL
  (`redis://vigie@host:6379/0`) and the password read from `server.state_password_file`, never written in
  rules.yaml. The store holds the overrides: whoever can write to it can open any site for any class.

Only the state keeper (background thread), the command line and the admin API talk to a store; the hot paths read
the keeper's in-memory view. Every store error reaches callers as `StoreUnavailable`, with the store named.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Protocol

from blocklists.errors import VigieError
from policy.state import Override, OverrideKind
from policy.usage import Minutes

USAGE_RETENTION_DAYS = 8  # screen time is about today; a week back answers a parent's question, no more


class StoreUnavailable(VigieError):
    """The state store cannot be reached or used right now."""


class OverrideNotFound(VigieError):
    pass


@dataclass(frozen=True)
class StoreAddress:
    """`server.state`, parsed: `sqlite` with an absolute path, or `redis` with its URL."""

    scheme: str
    target: str
    password_file: str | None = None  # Redis: the file holding the password (a Docker or systemd secret)

    def __str__(self) -> str:
        if self.scheme == "sqlite":
            return f"sqlite://{self.target}"
        return redacted(self.target)

    def password(self) -> str | None:
        """The password from `password_file`; StoreUnavailable naming the file when it cannot be read."""
        if self.password_file is None:
            return None
        try:
            return Path(self.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise StoreUnavailable(f"server.state_password_file {self.password_file}: {exc.strerror}") from None

    @classmethod
    def parse(cls, text: str, base_dir: Path) -> StoreAddress:
        """`sqlite:///var/state.sqlite3` (relative to `base_dir`), `sqlite:////abs/path`, `redis://h:6379/0`."""
        if text.startswith("sqlite:///"):
            path = text[len("sqlite:///"):]
            if not path:
                raise ValueError("no file after sqlite:///")
            return cls("sqlite", str((base_dir / path).absolute()))
        if text.startswith(("redis://", "rediss://", "unix://")):
            return cls("redis", text)
        raise ValueError("not a state store")


def redacted(url: str) -> str:
    """`url` with any password in it replaced by `***`, for logs and banners."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


class StateStore(Protocol):
    """What the keeper, the command line and the API need from a store. Every method may raise StoreUnavailable."""

    def add_usage(self, marks: Mapping[date, Minutes]) -> None:
        """Mark minutes as used (bit sets per device and day); marking a minute twice counts it once."""

    def usage(self, day: date) -> dict[str, int]:
        """Minutes used on `day` per device."""

    def overrides(self, now: datetime) -> tuple[Override, ...]:
        """The overrides not expired at `now`, oldest first."""

    def add_override(self, override: Override) -> None: ...

    def clear_override(self, override_id: str) -> Override:
        """Remove an override now; raises OverrideNotFound."""

    def wait_for_change(self, timeout: float) -> None:
        """Return when another process may have changed the overrides, or after `timeout` seconds."""

    def lost_data(self) -> bool:
        """Whether the store was emptied since this process last looked (a Redis restarted without its files)."""

    def close(self) -> None: ...


def open_store(address: StoreAddress) -> StateStore:
    if address.scheme == "sqlite":
        from policy.store_sqlite import SqliteStore

        return SqliteStore(Path(address.target))
    from policy.store_redis import RedisStore

    return RedisStore(address.target, password=address.password())


def override_to_json(override: Override) -> dict[str, Any]:
    return {"id": override.id, "kind": override.kind.value, "group": override.group, "device": override.device,
            "domain": override.domain, "expires_at": override.expires_at.isoformat(), "author": override.author,
            "note": override.note,
            "created_at": override.created_at.isoformat() if override.created_at else None}


def override_from_json(data: Mapping[str, Any]) -> Override:
    created = data.get("created_at")
    return Override(id=str(data["id"]), kind=OverrideKind(data["kind"]), group=str(data["group"]),
                    device=data.get("device"), domain=data.get("domain"),
                    expires_at=datetime.fromisoformat(data["expires_at"]).astimezone(UTC),
                    author=str(data["author"]), note=str(data.get("note") or ""),
                    created_at=datetime.fromisoformat(created).astimezone(UTC) if created else None)


def encode_override(override: Override) -> str:
    return json.dumps(override_to_json(override), ensure_ascii=False, sort_keys=True)
