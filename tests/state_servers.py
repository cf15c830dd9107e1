"""A real `redis-server` for the state tests: started on a free loopback port, killed and restarted at will."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Self

import redis

from tests.conftest import free_port


class RedisServer:
    """`redis-server` on 127.0.0.1 without persistence (like a cache-only deployment: the worst case for us)."""

    def __init__(self, directory: Path, password: str | None = None) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is missing: `make system-deps` installs it")
        self.directory = directory
        self.port = free_port()
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log"),
             *(("--requirepass", self.password) if self.password else ())],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, password=self.password)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                client.close()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start: {(self.directory / 'redis.log').read_text()}"
                                       ) from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, password=self.password)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
