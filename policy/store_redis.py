"""The shared state store for several Vigie servers: Redis.

Keys (all under `vigie:`, documented in docs/rules.md):
  vigie:store                      a random epoch, written when missing: a new one means the data were lost
  vigie:override:<id>              an override as JSON, expiring by itself at the override's end (PEXPIREAT)
  vigie:overrides                  set of override ids (entries whose key expired are dropped on read)
  vigie:overrides:version          incremented on every change; also published on channel vigie:overrides:changed
  vigie:usage:<day>                hash device → minutes used that day (local day of the rules' time zone)
  vigie:usage:<day>:<device>       bitmap of the minutes used (bit n: n-th minute after local midnight)
Usage keys expire after eight days. A Lua script sets the minute bits and increments the totals in one step, so
a minute marked by several processes or servers counts once.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from typing import Any, TypeVar

import redis

from policy.state import Override
from policy.state_store import (
    USAGE_RETENTION_DAYS,
    OverrideNotFound,
    StoreUnavailable,
    encode_override,
    override_from_json,
    redacted,
)
from policy.usage import Minutes, minutes_in

PREFIX = "vigie:"
MARKER = PREFIX + "store"
OVERRIDES = PREFIX + "overrides"
VERSION = PREFIX + "overrides:version"
CHANNEL = PREFIX + "overrides:changed"
T = TypeVar("T")

# KEYS: the totals hash, then one bitmap per device; ARGV: seconds to keep, then per device its name and minutes.
_ADD_USAGE = """
local keep = tonumber(ARGV[1])
for index = 2, #KEYS do
  local device = ARGV[index * 2 - 2]
  local added = 0
  for minute in string.gmatch(ARGV[index * 2 - 1], "%d+") do
    if redis.call("SETBIT", KEYS[index], tonumber(minute), 1) == 0 then added = added + 1 end
  end
  if added > 0 then redis.call("HINCRBY", KEYS[1], device, added) end
  redis.call("EXPIRE", KEYS[index], keep)
end
redis.call("EXPIRE", KEYS[1], keep)
return 1
"""


def usage_key(day: date) -> str:
    return f"{PREFIX}usage:{day.isoformat()}"


class RedisStore:
    def __init__(self, url: str, timeout: float = 2.0, password: str | None = None) -> None:
        self.url = redacted(url)  # named in errors and logs
        extra = {"password": password} if password is not None else {}
        try:
            self._redis = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                               decode_responses=True, **extra)
        except ValueError as exc:
            raise StoreUnavailable(f"state store {url}: {exc} (example: redis://127.0.0.1:6379/0)") from None
        self._add_usage = self._redis.register_script(_ADD_USAGE)
        self._pubsub: Any = None
        self._epoch: str | None = None
        self._lock = threading.Lock()

    def _run(self, work: Callable[[], T]) -> T:
        try:
            return work()
        except redis.RedisError as exc:
            raise StoreUnavailable(f"state store {self.url}: {exc}") from None

    def add_usage(self, marks: Mapping[date, Minutes]) -> None:
        keep = USAGE_RETENTION_DAYS * 86400
        for day, devices in marks.items():
            names = sorted(devices)
            keys = [usage_key(day), *(f"{usage_key(day)}:{name}" for name in names)]
            args: list[str | int] = [keep]
            for name in names:
                args += [name, ",".join(str(minute) for minute in minutes_in(devices[name]))]
            self._write_usage(keys, args)

    def _write_usage(self, keys: list[str], args: list[str | int]) -> None:
        self._run(lambda: self._add_usage(keys=keys, args=args))

    def usage(self, day: date) -> dict[str, int]:
        totals = self._run(lambda: self._redis.hgetall(usage_key(day)))
        return {str(device): int(minutes) for device, minutes in totals.items()}

    def overrides(self, now: datetime) -> tuple[Override, ...]:
        def read() -> tuple[Override, ...]:
            ids = sorted(str(member) for member in self._redis.smembers(OVERRIDES))
            if not ids:
                return ()
            values = self._redis.mget([f"{PREFIX}override:{i}" for i in ids])
            gone = [i for i, value in zip(ids, values, strict=True) if value is None]
            if gone:
                self._redis.srem(OVERRIDES, *gone)
            found = [override_from_json(json.loads(value)) for value in values if value is not None]
            return tuple(sorted((o for o in found if o.expires_at > now),
                                key=lambda o: (o.created_at or o.expires_at, o.id)))

        return self._run(read)

    def add_override(self, override: Override) -> None:
        key = f"{PREFIX}override:{override.id}"

        def add() -> None:
            pipe = self._redis.pipeline()
            pipe.set(key, encode_override(override))
            pipe.pexpireat(key, int(override.expires_at.timestamp() * 1000))
            pipe.sadd(OVERRIDES, override.id)
            pipe.incr(VERSION)
            pipe.execute()
            self._redis.publish(CHANNEL, "added")

        self._run(add)

    def clear_override(self, override_id: str) -> Override:
        key = f"{PREFIX}override:{override_id}"

        def clear() -> Override | None:
            pipe = self._redis.pipeline()
            pipe.get(key)
            pipe.delete(key)
            pipe.srem(OVERRIDES, override_id)
            pipe.incr(VERSION)
            value = pipe.execute()[0]
            self._redis.publish(CHANNEL, "cleared")
            return override_from_json(json.loads(value)) if value else None

        cleared = self._run(clear)
        if cleared is None or cleared.expires_at <= datetime.now(UTC):
            raise OverrideNotFound(f"no override {override_id!r} in force (see `vigie override list`)")
        return cleared

    def wait_for_change(self, timeout: float) -> None:
        """Wait on the change channel, so an override made anywhere reaches this process at once."""
        try:
            if self._pubsub is None:
                self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                self._pubsub.subscribe(CHANNEL)
            self._pubsub.get_message(timeout=timeout)
        except redis.RedisError as exc:
            self._reset_pubsub()
            raise StoreUnavailable(f"state store {self.url}: {exc}") from None

    def _reset_pubsub(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(redis.RedisError):
                self._pubsub.close()
            self._pubsub = None

    def lost_data(self) -> bool:
        """The marker holds a random epoch, written by the first process that finds it missing: every process
        that saw another epoch before knows the data were lost, however many noticed first."""
        def check() -> bool:
            epoch = self._redis.get(MARKER)
            if epoch is None:
                self._redis.set(MARKER, secrets.token_hex(8), nx=True)
                epoch = self._redis.get(MARKER)
            lost = self._epoch is not None and epoch != self._epoch
            self._epoch = str(epoch)
            return lost

        return self._run(check)

    def close(self) -> None:
        self._reset_pubsub()
        self._redis.close()
