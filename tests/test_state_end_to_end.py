"""Shared state end to end: real `vigie dns` and `vigie proxy` processes sharing a real redis-server (or one SQLite
file), overrides made through the command line and the admin API, a Redis killed and restarted, a SQLite file
locked, a Vigie restarted; dig and curl as the tablets, each from its own loopback address."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from tests.conftest import REPO, free_port, write_tree
from tests.dns_servers import RULES_PREAMBLE, UpstreamServer, VigieProcess, dig
from tests.proxy_servers import Origin, ProxyProcess, curl
from tests.state_servers import RedisServer

TABLETS = {"tab-01": "127.0.0.11", "tab-02": "127.0.0.12", "tab-03": "127.0.0.13"}
PROPAGATION_SECONDS = 2.0  # the promise: every running instance applies an override within 2 s
PARIS = ZoneInfo("Europe/Paris")


def files(state: str) -> dict[str, str]:
    return {
        "rules.yaml": RULES_PREAMBLE.replace("devices:\n  unknown: refuse", "devices:\n  inventory: devices.csv\n"
                                             "  unknown: refuse") + f"""
            groups:
              cm2-a: {{profile: maison}}
              cm2-b: {{profile: maison}}
            profiles:
              maison:
                block: [games]
                allow: [lumni.fr]
                screen_time: 8h
            server:
              state: {state}
            """.replace("            ", ""),
        "devices.csv": "name,addresses,group,credential\n"
                       "tab-01,127.0.0.11,cm2-a,\ntab-02,127.0.0.12,cm2-a,\ntab-03,127.0.0.13,cm2-b,\n",
        "games.txt": "roblox.com\n",
    }


def vigie(rules: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vigie", *args, "--rules", str(rules)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def answers(port: int, device: str, name: str) -> bool:
    """Whether `device` gets an address for `name` (rather than a block) from the resolver on `port`."""
    return "status: NOERROR" in dig(port, name, "A", "-b", TABLETS[device])


def wait_until(condition: Callable[[], bool], seconds: float) -> float | None:
    """Seconds until `condition` held, or None if it did not within `seconds`."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def usage(rules: Path) -> dict[str, int]:
    result = vigie(rules, "usage", "--devices", "--json")
    assert result.returncode == 0, result.stderr
    return {row["device"]: row["minutes"] for row in json.loads(result.stdout).get("devices", [])}


class MinuteWitness:
    """The local minutes during which a device certainly / possibly was active, from the test's own clock."""

    def __init__(self) -> None:
        self.certain: dict[str, set[tuple[str, int]]] = {}
        self.possible: dict[str, set[tuple[str, int]]] = {}

    def around(self, device: str, act: Callable[[], bool]) -> bool:
        before = self._minute()
        result = act()
        after = self._minute()
        self.possible.setdefault(device, set()).update({before, after})
        if before == after:
            self.certain.setdefault(device, set()).add(before)
        return result

    def answers(self, port: int, device: str, name: str) -> bool:
        return self.around(device, lambda: answers(port, device, name))

    @staticmethod
    def _minute() -> tuple[str, int]:
        now = datetime.now(PARIS)
        return now.date().isoformat(), now.hour * 60 + now.minute

    def check(self, counted: dict[str, int]) -> None:
        for device, possible in self.possible.items():
            assert len(self.certain.get(device, ())) <= counted.get(device, 0) <= len(possible), (device, counted)
        assert set(counted) == set(self.possible), counted


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


def test_an_override_made_on_one_instance_is_enforced_by_every_instance_within_two_seconds(
        tmp_path: Path, upstream: UpstreamServer) -> None:
    with RedisServer(tmp_path / "redis") as redis_server, Origin(tmp_path) as origin:
        rules = write_tree(tmp_path, files(redis_server.url))
        api_port = free_port()
        first = VigieProcess(rules, free_port(), upstream.port, None, "--api-listen", f"127.0.0.1:{api_port}")
        second = VigieProcess(rules, free_port(), upstream.port)
        # Two servers' worth: two resolvers and two proxies, the second proxy with two workers.
        with first, second, ProxyProcess(rules, free_port(), origin) as proxy, \
                ProxyProcess(rules, free_port(), origin, "--proxy-workers", "2") as other_proxy:
            token = (tmp_path / "var" / "api-token").read_text().strip()

            def api(method: str, path: str, body: object = None) -> tuple[int, object]:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{api_port}{path}", method=method,
                    data=json.dumps(body).encode() if body is not None else None,
                    headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=10) as response:
                        return response.status, json.loads(response.read())
                except urllib.error.HTTPError as error:
                    return error.code, json.loads(error.read())

            def proxy_says(port: int, device: str, name: str, times: int) -> set[str]:
                return {curl(port, f"http://{name}/", "--interface", TABLETS[device])[1] for _ in range(times)}

            def everywhere(device: str, name: str, allowed: bool) -> list[Callable[[], bool]]:
                """Each instance gives `device` the expected answer for `name` (the two-worker proxy, on four new
                connections: whichever worker is free takes each)."""
                status = {"200" if allowed else "403"}
                return [lambda: answers(first.dns_port, device, name) == allowed,
                        lambda: answers(second.dns_port, device, name) == allowed,
                        lambda: proxy_says(proxy.port, device, name, 1) == status,
                        lambda: proxy_says(other_proxy.port, device, name, 4) == status]

            assert all(check() for check in everywhere("tab-01", "roblox.com", allowed=False))
            status, created = api("POST", "/v1/overrides", {"action": "allow", "group": "cm2-a",
                                                            "domain": "roblox.com", "for": "30m",
                                                            "note": "jeu de maths", "author": "mme.martin"})
            assert status == 201, created
            assert isinstance(created, dict)
            delays = [wait_until(check, PROPAGATION_SECONDS) for check in everywhere("tab-01", "roblox.com", True)]
            assert None not in delays, f"not enforced everywhere within {PROPAGATION_SECONDS} s: {delays}"
            assert all(check() for check in everywhere("tab-03", "roblox.com", False)), "cm2-b is not concerned"

            lock = vigie(rules, "override", "lock", "--device", "tab-02", "--for", "10m", "--note", "contrôle")
            assert lock.returncode == 0, lock.stderr
            blocked = [wait_until(check, PROPAGATION_SECONDS) for check in everywhere("tab-02", "example.org", False)]
            assert None not in blocked, "a locked device reaches only its allow list"
            assert all(check() for check in everywhere("tab-02", "lumni.fr", True))
            assert all(check() for check in everywhere("tab-01", "example.org", True)), "the rest of the class is free"

            status, listed = api("GET", "/v1/overrides")
            assert status == 200 and isinstance(listed, list) and len(listed) == 2
            status, _ = api("DELETE", f"/v1/overrides/{created['id']}")
            assert status == 200
            assert None not in [wait_until(check, PROPAGATION_SECONDS)
                                for check in everywhere("tab-01", "roblox.com", False)]
            assert api("DELETE", f"/v1/overrides/{created['id']}")[0] == 404


def test_the_admin_api_refuses_bad_tokens_and_bad_requests(tmp_path: Path, upstream: UpstreamServer) -> None:
    rules = write_tree(tmp_path, files("sqlite:///var/state.sqlite3"))
    api_port = free_port()
    with VigieProcess(rules, free_port(), upstream.port, None, "--api-listen", f"127.0.0.1:{api_port}"):
        token_file = tmp_path / "var" / "api-token"
        assert token_file.stat().st_mode & 0o777 == 0o600

        def post(body: bytes, token: str) -> tuple[int, dict[str, str]]:
            request = urllib.request.Request(f"http://127.0.0.1:{api_port}/v1/overrides", method="POST", data=body,
                                             headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())

        token = token_file.read_text().strip()
        good = {"action": "block", "group": "cm2-a", "domain": "lumni.fr", "for": "5m", "note": "n", "author": "a"}
        assert post(json.dumps(good).encode(), "wrong-token")[0] == 401
        assert post(b"{not json", token) == (400, {"error": "the body is not JSON"})
        status, error = post(json.dumps({**good, "group": "cm2a"}).encode(), token)
        assert status == 400 and "did you mean 'cm2-a'" in error["error"]
        status, error = post(json.dumps({**good, "for": "8 days"}).encode(), token)
        assert status == 400 and "duration" in error["error"]
        status, error = post(b"[" * 5000 + b"]" * 5000, token)
        assert status == 400 and "nested too deeply" in error["error"]
        status, error = post(json.dumps({**good, "note": {"a": [1]}}).encode(), token)
        assert status == 400 and "flat JSON object" in error["error"]
        assert post(json.dumps(good).encode(), token)[0] == 201
        # An idle connection is closed after IDLE_SECONDS rather than holding a thread for ever.
        with socket.create_connection(("127.0.0.1", api_port), timeout=20) as idle:
            started = time.monotonic()
            assert idle.recv(1) == b""
            assert time.monotonic() - started < 15


def metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def test_through_a_redis_restart_decisions_continue_and_no_minute_is_lost(tmp_path: Path,
                                                                          upstream: UpstreamServer) -> None:
    with RedisServer(tmp_path / "redis") as redis_server, Origin(tmp_path) as origin:
        rules = write_tree(tmp_path, files(redis_server.url))
        metrics_port = free_port()
        witness = MinuteWitness()
        with VigieProcess(rules, free_port(), upstream.port, metrics_port) as dns, \
                ProxyProcess(rules, free_port(), origin) as proxy:
            made = vigie(rules, "override", "allow", "--group", "cm2-a", "--domain", "roblox.com", "--for", "1h",
                         "--note", "jeu de maths")
            assert made.returncode == 0, made.stderr
            assert wait_until(lambda: witness.answers(dns.dns_port, "tab-01", "roblox.com"), PROPAGATION_SECONDS)
            assert wait_until(lambda: usage(rules).get("tab-01", 0) >= 1, 5), "written within the flush interval"

            redis_server.kill()
            assert wait_until(lambda: metric(metrics_port, "vigie_state_store_up") == 0, 5)
            witness.answers(dns.dns_port, "tab-02", "example.org")
            witness.around("tab-03", lambda: curl(proxy.port, "http://example.org/", "--interface",
                                                  TABLETS["tab-03"])[1] == "200")
            assert witness.answers(dns.dns_port, "tab-01", "roblox.com"), "the override decides during the outage"
            assert vigie(rules, "usage").returncode == 1, "the command line says the store is away"
            time.sleep(2.5)  # a few failed flushes: still one log line for the outage

            redis_server.start()  # empty: this Redis keeps nothing on disk
            assert wait_until(lambda: metric(metrics_port, "vigie_state_store_up") == 1, 5)
            assert wait_until(lambda: set(usage(rules)) == {"tab-01", "tab-02", "tab-03"}, 5), usage(rules)
            witness.check(usage(rules))
            assert witness.answers(dns.dns_port, "tab-01", "roblox.com"), "the override was written again"
        for log in (dns.output(), proxy.output()):
            assert log.count("counting screen time in memory") == 1, log
            assert "state store back after" in log


def test_two_processes_sharing_sqlite_survive_a_lock_and_a_restart(tmp_path: Path, upstream: UpstreamServer) -> None:
    rules = write_tree(tmp_path, files("sqlite:///var/state.sqlite3"))
    witness = MinuteWitness()
    first_port, second_port = free_port(), free_port()
    with VigieProcess(rules, first_port, upstream.port), VigieProcess(rules, second_port, upstream.port):
        made = vigie(rules, "override", "block", "--device", "tab-01", "--domain", "example.org", "--for", "20m",
                     "--note", "exercice")
        assert made.returncode == 0, made.stderr
        for port in (first_port, second_port):
            assert wait_until(lambda port=port: not witness.answers(port, "tab-01", "example.org"),  # type: ignore[misc]
                              PROPAGATION_SECONDS)
        assert witness.answers(first_port, "tab-02", "example.org"), "only the device named is concerned"

        # An exclusive transaction held elsewhere (a backup, an admin's sqlite3 shell): writes wait, then fail.
        holder = sqlite3.connect(tmp_path / "var" / "state.sqlite3", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        witness.answers(first_port, "tab-02", "example.org")
        witness.answers(second_port, "tab-03", "example.org")
        time.sleep(6)  # past the busy timeout: the writes fail and are kept
        holder.execute("ROLLBACK")
        holder.close()
        assert wait_until(lambda: set(usage(rules)) >= {"tab-02", "tab-03"}, 15), usage(rules)

        witness.answers(first_port, "tab-01", "lumni.fr")
    # Both stopped (SIGTERM): whatever was pending was written. A new process reads it all back.
    witness.check(usage(rules))
    with VigieProcess(rules, first_port, upstream.port):
        assert not witness.answers(first_port, "tab-01", "example.org"), "the override outlived the restart"
    witness.check(usage(rules))
