"""What ships for monitoring: the Prometheus configuration and alerts pass promtool (and the alerts' own unit tests),
Vigie's exposition passes `promtool check metrics`, and a real Prometheus scraping a running resolver and proxy
sees the series the dashboards use, with the right values."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, write_tree
from tests.dns_servers import UpstreamServer, VigieProcess, dig
from tests.proxy_servers import Origin, ProxyProcess, curl

DEPLOY = REPO / "deploy" / "prometheus"
RULES = {
    "rules.yaml": """
        lists:
          games: {source: games.txt, format: domains}
        categories:
          games: [games]
        devices:
          inventory: devices.csv
          unknown: refuse
        groups:
          cm2-a: {profile: maison}
        profiles:
          maison: {block: [games], screen_time: 2h}
        """,
    "games.txt": "roblox.com\n",
    "devices.csv": "name,addresses,group,credential\ntab-01,127.0.0.1,cm2-a,\n",
}


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: `make system-deps` installs Debian's prometheus package")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, input=stdin, timeout=120)


@pytest.mark.parametrize("command", [("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml"),
                                     ("test", "rules", "alerts_test.yml")],
                         ids=["the scrape config", "the alert rules", "the alerts fire when they should"])
def test_the_shipped_prometheus_files_pass_promtool(command: tuple[str, ...]) -> None:
    result = promtool(*command[:-1], str(DEPLOY / command[-1]))
    assert result.returncode == 0, result.stdout + result.stderr


class Prometheus:
    """A real Prometheus on 127.0.0.1 scraping `targets` every second, its data in a temporary directory."""

    def __init__(self, directory: Path, targets: list[str]) -> None:
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(DEPLOY / "alerts.yml")],
            "scrape_configs": [{"job_name": "vigie", "static_configs": [{"targets": targets}]}]}))
        self.log = (directory / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, expression: str) -> list[dict[str, object]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                result: list[dict[str, object]] = json.loads(response.read())["data"]["result"]
                return result
        except OSError:
            return []

    def value(self, expression: str, expected: float | None, seconds: float = 20) -> float | None:
        """The value of `expression` once it equals `expected` (scrapes bring values in over a few seconds), or
        the last value seen (None: no series) when it does not within `seconds`."""
        deadline = time.monotonic() + seconds
        last = None
        while time.monotonic() < deadline:
            result = self.query(expression)
            last = None
            if result:
                sample = result[0]["value"]
                assert isinstance(sample, list)
                last = float(sample[1])
            if last == expected:
                break
            time.sleep(0.5)
        return last

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(20)
        self.log.close()


def test_a_real_prometheus_sees_what_the_dashboards_show(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, RULES)
    dns_metrics, proxy_metrics = free_port(), free_port()
    with UpstreamServer() as upstream, Origin(tmp_path) as origin, \
            VigieProcess(rules, free_port(), upstream.port, dns_metrics) as dns, \
            ProxyProcess(rules, free_port(), origin, "--metrics-listen", f"127.0.0.1:{proxy_metrics}") as proxy:
        for _ in range(3):
            assert "NXDOMAIN" in dig(dns.dns_port, "roblox.com")
        for _ in range(2):
            assert "NOERROR" in dig(dns.dns_port, "example.org")
        _, status, _ = curl(proxy.port, "http://roblox.com/")
        assert status == "403"

        with urllib.request.urlopen(f"http://127.0.0.1:{dns_metrics}/metrics", timeout=5) as response:
            exposition = response.read().decode()
        checked = promtool("check", "metrics", stdin=exposition)
        assert checked.returncode == 0, checked.stdout + checked.stderr

        prometheus = Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{dns_metrics}", f"127.0.0.1:{proxy_metrics}"])
        try:
            assert prometheus.value('count(up{job="vigie"} == 1)', 2) == 2
            blocked = 'sum(vigie_dns_queries_total{group="cm2-a",action="block",category="games"})'
            assert prometheus.value(blocked, 3) == 3
            assert prometheus.value('sum(vigie_dns_queries_total{group="cm2-a",action="allow"})', 2) == 2
            assert prometheus.value('sum(vigie_proxy_requests_total{action="block",category="games"})', 1) == 1
            assert prometheus.value('sum(vigie_block_pages_total{reason="category"})', 1) == 1
            assert prometheus.value(f'vigie_dns_upstream_up{{upstream="127.0.0.1:{upstream.port}"}}', 1) == 1
            assert prometheus.value("sum(vigie_dns_upstream_seconds_count)", 1) == 1, "one upstream query, then cached"
            instance = f'instance="127.0.0.1:{dns_metrics}"'
            assert prometheus.value(f"vigie_state_store_up{{{instance}}}", 1) == 1
            assert prometheus.value(f"vigie_rules_last_reload_ok{{{instance}}}", 1) == 1
            # Every main process reports the store's view: dashboards take the max, not the sum.
            assert prometheus.value('max(vigie_screen_time_devices_active{group="cm2-a"})', 1) == 1
            assert prometheus.value('count(vigie_screen_time_devices_active{group="cm2-a"})', 2) == 2
            assert prometheus.value('count(vigie_build_info{role="main"})', 2) == 2
            assert prometheus.value('ALERTS{alertstate="firing"}', None, 3) is None, "a healthy Vigie fires no alert"
        finally:
            prometheus.stop()
