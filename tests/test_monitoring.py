"""What ships for monitoring: the Prometheus configuration and alerts pass promtool (and the alerts' own unit tests),
Vigie's exposition passes `promtool check metrics`, the Grafana dashboard is well-formed, and a real Prometheus
scraping a running resolver and proxy sees the series the dashboards use, with the right values, and evaluates
every query of the dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, free_port, write_tree
from tests.dns_servers import UpstreamServer, VigieProcess, dig
from tests.proxy_servers import Origin, ProxyProcess, curl

DEPLOY = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "vigie.json"
SECTIONS = ["Overview", "Performance", "Screen time per class", "Health"]
# What Grafana puts in place of its variables before a query reaches Prometheus (every class, every job).
GRAFANA_VARIABLES = {"$group": ".*", "$job": ".*", "$__rate_interval": "1m", "$__range": "5m"}
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


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels_and_queries() -> list[tuple[dict[str, Any], str]]:
    """Every panel (rows aside) with each of its queries, as Grafana sends them to Prometheus."""
    found = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expression = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expression = expression.replace(variable, value)
            found.append((panel, expression))
    return found


def test_the_dashboard_is_grafana_json_on_a_prometheus_datasource_variable() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] == "Vigie" and board["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("job", "group"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    rows = [panel["title"] for panel in board["panels"] if panel["type"] == "row"]
    assert rows == SECTIONS

    panels = [panel for panel in board["panels"] if panel["type"] != "row"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    occupied: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        place = panel["gridPos"]
        assert place["w"] >= 1 and place["h"] >= 1 and place["x"] + place["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(place["x"], place["x"] + place["w"])
                 for y in range(place["y"], place["y"] + place["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
    for panel in panels:
        assert panel["description"], f"{panel['title']} says what it shows"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    for _, expression in panels_and_queries():
        assert "$" not in expression, f"a Grafana variable the test does not know: {expression}"


def exposed_names(exposition: str) -> set[str]:
    """The series names an exposition offers, including those of families without samples yet."""
    suffixes = {"histogram": ["_bucket", "_sum", "_count"], "gaugehistogram": ["_bucket", "_gsum", "_gcount"]}
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):  # a counter's TYPE line already names it with its `_total`
            _, _, name, kind = line.split()
            names.update(name + suffix for suffix in suffixes.get(kind, [""]))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


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

    def evaluate(self, expression: str) -> dict[str, Any]:
        """Prometheus's whole answer, errors included (a bad query is a 400 with a JSON body)."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                answer: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as error:
            answer = json.loads(error.read())
        return answer

    def query(self, expression: str) -> list[dict[str, object]]:
        try:
            answer = self.evaluate(expression)
        except OSError:
            return []
        result: list[dict[str, object]] = answer["data"]["result"]
        return result

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

        expositions = []
        for port in (dns_metrics, proxy_metrics):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                expositions.append(response.read().decode())
            checked = promtool("check", "metrics", stdin=expositions[-1])
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

            # Every query of the dashboard names series Vigie exposes and is one Prometheus evaluates.
            exposed = exposed_names("\n".join(expositions))
            for panel, expression in panels_and_queries():
                named = set(re.findall(r"\b(?:vigie|process)_[a-z_]+", expression))
                assert named <= exposed, f"{panel['title']}: {named - exposed} are not exposed"
                answer = prometheus.evaluate(expression)
                assert answer["status"] == "success", f"{panel['title']}: {answer.get('error')}"
            # And the panels an admin looks at first show this Vigie as it is.
            shown = {panel["title"]: expression for panel, expression in panels_and_queries()}
            assert prometheus.value(shown["Devices active today"], 1) == 1
            assert prometheus.value(shown["Devices at their budget now"], 0) == 0
            assert prometheus.value(shown["Rules"], 1) == 1
            assert prometheus.value(shown["State store"], 1) == 1
            assert prometheus.value(shown["Alerts firing"], 0) == 0
            assert (prometheus.value(shown["Domains listed"], None, 1) or 0) >= 1
            assert {series["metric"]["group"]  # type: ignore[index]
                    for series in prometheus.query(shown["Blocks by group"])} == {"cm2-a"}
        finally:
            prometheus.stop()
