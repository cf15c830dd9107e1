"""`vigie proxy` with several workers: every worker accepts on the one socket, decides alike, and takes reloads."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import free_port, free_port_run, write_tree
from tests.proxy_servers import Origin, ProxyProcess, curl
from tests.test_pac import requests_decided
from tests.test_proxy_end_to_end import FILES

WORKERS = 2
BATCH = 40


def requests_by_worker(metrics_port: int) -> list[float]:
    """Requests each worker has decided, read from its own metrics endpoint (the main process, then the next port)."""
    return [requests_decided(port) for port in range(metrics_port, metrics_port + WORKERS)]


def fetch_batch(port: int, url: str) -> list[str]:
    """BATCH requests at once, each on a new connection (a class opening a page)."""
    with ThreadPoolExecutor(max_workers=20) as pool:
        return [status for _, status, _ in pool.map(lambda _: curl(port, url), range(BATCH))]


def test_workers_share_the_socket_decide_alike_and_all_take_a_reload(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, FILES)
    metrics_port = free_port_run(WORKERS)
    with Origin(tmp_path) as origin, ProxyProcess(rules, free_port(), origin, "--proxy-workers", str(WORKERS),
                                                  "--metrics-listen", f"127.0.0.1:{metrics_port}") as proxy:
        assert f"{WORKERS} worker(s)" in proxy.output()
        sent = 0
        for _ in range(10):  # whichever worker is free takes the next connection: under load, both do
            assert fetch_batch(proxy.port, "http://allowed.example/") == ["200"] * BATCH
            assert fetch_batch(proxy.port, "http://roblox.com/") == ["403"] * BATCH
            sent += 2 * BATCH
            counts = requests_by_worker(metrics_port)
            assert sum(counts) == sent, counts
            if all(counts):
                break
        assert all(counts), f"one worker took every connection: {counts}"
        # A reload reaches every worker: after the edit, no worker lets the site through.
        edited = rules.read_text().replace("    deny_urls:", "    deny: [allowed.example]\n    deny_urls:", 1)
        assert edited != rules.read_text()
        rules.write_text(edited)
        deadline = time.monotonic() + 10
        while fetch_batch(proxy.port, "http://allowed.example/") != ["403"] * BATCH:
            assert time.monotonic() < deadline, "every worker took the new rules within 10 s"
            time.sleep(0.5)
        before = requests_by_worker(metrics_port)
        assert fetch_batch(proxy.port, "http://allowed.example/") == ["403"] * BATCH
        after = requests_by_worker(metrics_port)
        assert sum(after) - sum(before) == BATCH
