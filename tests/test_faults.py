"""Faults a city's network will have, on running processes: hostile or broken upstreams, a disk full under the state
store, rules replaced by garbage and reload storms while under load. Nothing crashes, nothing already counted is
lost, and each fault shows in a metric and in one log line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnslib import DNSRecord

from tests.conftest import free_port, write_tree
from tests.dns_servers import RULES_PREAMBLE, UpstreamServer, VigieProcess, dig
from tests.test_state_end_to_end import TABLETS, files, metric, usage, wait_until

RULES = RULES_PREAMBLE + """
groups:
  school: {networks: [127.0.0.0/8], profile: class}
profiles:
  class: {block: [games]}
"""


def metric_with(port: int, name: str, labels: str) -> float:
    """The value of `name{labels}` (0 when absent)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"{name}{{") and labels in line:
                return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("mode", ["garbage", "wrong_id", "wrong_question", "mangled", "silent", "servfail"])
def test_a_hostile_or_broken_upstream_is_passed_over_and_its_answers_never_reach_a_client(tmp_path: Path,
                                                                                          mode: str) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    metrics = free_port()
    with UpstreamServer("192.0.2.66") as bad, UpstreamServer("192.0.2.1") as good, \
            VigieProcess(rules, free_port(), bad.port, metrics, "--upstream", f"127.0.0.1:{good.port}") as dns:
        bad.mode = mode
        for index in range(4):
            answer = dig(dns.dns_port, f"name{index}.example", "+time=5")
            assert "status: NOERROR" in answer and "192.0.2.1" in answer, answer
            assert "203.0.113.66" not in answer and "poisoned" not in answer
        assert metric_with(metrics, "vigie_dns_upstream_up", f"127.0.0.1:{bad.port}") == 0
        assert metric_with(metrics, "vigie_dns_upstream_failures_total", f"127.0.0.1:{bad.port}") >= 3
        bad.mode = "answer"
        assert wait_until(lambda: "192.0.2" in dig(dns.dns_port, f"again{time.monotonic()}.example"), 40)
    log = dns.output()
    assert log.count(f"upstream 127.0.0.1:{bad.port} gave no usable answer") == 1, log
    assert "Traceback" not in log


def test_a_slow_upstream_is_waited_for_up_to_its_timeout_then_the_next_answers(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    with UpstreamServer("192.0.2.66") as slow, UpstreamServer("192.0.2.1") as good, \
            VigieProcess(rules, free_port(), slow.port, None, "--upstream", f"127.0.0.1:{good.port}") as dns:
        slow.delay = 3.0
        started = time.monotonic()
        answer = dig(dns.dns_port, "slow.example", "+time=5")
        assert "192.0.2.1" in answer and time.monotonic() - started < 3.0, answer


class QueryLoad:
    """A client asking over UDP, one query in flight, at most 500 a second (under the per-client rate limit of
    1000/s), a 2-second timeout; it counts what went unanswered, and what came back for the blocked name."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent = self.lost = self.blocked_allowed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> QueryLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(2)
            while not self._stop.is_set():
                time.sleep(0.002)
                name = "roblox.com" if self.sent % 2 else "example.org"
                query = DNSRecord.question(name)
                client.sendto(query.pack(), ("127.0.0.1", self.port))
                self.sent += 1
                try:
                    while True:
                        reply = DNSRecord.parse(client.recv(4096))
                        if reply.header.id == query.header.id:
                            break
                except TimeoutError:
                    self.lost += 1
                    continue
                if name == "roblox.com" and reply.header.rcode != 3:
                    self.blocked_allowed += 1


def test_rules_replaced_by_garbage_under_load_keep_the_old_rules_and_lose_no_query(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    good = rules.read_bytes()
    metrics = free_port()
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port, metrics) as dns, \
            QueryLoad(dns.dns_port) as load:
        for garbage in (os.urandom(4096), b"groups: [\n", b"profiles: {class: {block: [nothing]}}\n", b""):
            rules.write_bytes(garbage)
            time.sleep(2.5)  # the watcher looks every 2 s
        assert metric_with(metrics, "vigie_rules_reloads_total", 'result="invalid"') == 4
        assert metric(metrics, "vigie_rules_last_reload_ok") == 0
        rules.write_bytes(good)
        assert wait_until(lambda: metric(metrics, "vigie_rules_last_reload_ok") == 1, 5)
    assert load.sent > 200 and load.lost == 0 and load.blocked_allowed == 0, vars(load)
    log = dns.output()
    assert log.count("rules reload refused") == 4, "one line per bad edit, not one per look at the file"
    assert "Traceback" not in log


def test_a_sighup_storm_under_load_loses_no_query(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    metrics = free_port()
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port, metrics) as dns, \
            QueryLoad(dns.dns_port) as load:
        for _ in range(300):
            dns.process.send_signal(signal.SIGHUP)
            time.sleep(0.01)
        time.sleep(2)
        assert dns.process.poll() is None, "still running"
        reloads = metric_with(metrics, "vigie_rules_reloads_total", 'result="ok"')
        assert 1 <= reloads <= 300, "signals coalesce into the reloads that fit"
    assert load.sent > 200 and load.lost == 0 and load.blocked_allowed == 0, vars(load)
    assert "Traceback" not in dns.output()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted after the test (mounting needs root, which the test command has)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"mounting a tmpfs needs root ({mounted.stderr.strip()}): run the tests as `make test` does")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_under_the_state_store_loses_no_minute(tmp_path: Path, small_disk: Path) -> None:
    rules = write_tree(tmp_path, files(f"sqlite:///{small_disk}/state.sqlite3"))
    metrics = free_port()
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port, metrics) as dns:
        assert "NOERROR" in dig(dns.dns_port, "example.org", "-b", TABLETS["tab-01"])
        assert wait_until(lambda: "tab-01" in usage(rules), 5), "written while there is room"

        filler = small_disk / "filler"
        with filler.open("wb") as file:
            try:
                while True:
                    file.write(b"\0" * 65536)
                    file.flush()
            except OSError:
                pass  # the disk is full
        for device in ("tab-02", "tab-03"):
            assert "NOERROR" in dig(dns.dns_port, "example.org", "-b", TABLETS[device]), "decisions go on"
        assert wait_until(lambda: metric(metrics, "vigie_usage_marks_pending") == 2, 6), "kept in memory"
        assert metric_with(metrics, "vigie_state_store_errors_total", 'operation="write"') >= 1
        assert "NXDOMAIN" in dig(dns.dns_port, "roblox.com", "-b", TABLETS["tab-02"])

        filler.unlink()
        assert wait_until(lambda: set(usage(rules)) == {"tab-01", "tab-02", "tab-03"}, 6), usage(rules)
        assert wait_until(lambda: metric(metrics, "vigie_usage_marks_pending") == 0, 4)
    log = dns.output()
    assert log.count("counting screen time in memory") == 1, log
    assert "Traceback" not in log
