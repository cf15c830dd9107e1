"""The proxy auto-configuration file: `all` sends everything to the proxy, `selective` only what the proxy has to
see for the client's group. The PAC is run by real JavaScript engines: node for many hosts, and headless Chromium
browsing through `vigie proxy` for the end to end."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from filter_proxy.addon import VigieAddon
from policy.metrics import PROXY_ERRORS
from policy.snapshot import Snapshot
from policy.state import EMPTY_STATE
from tests.conftest import REPO, free_port, free_port_run, snapshot_of, write_tree
from tests.dns_servers import RunningVigie, UpstreamServer
from tests.proxy_servers import Origin, allow_origin

RULES = """
timezone: Europe/Paris
lists:
  games: {source: games.txt, format: domains}
  pages: {source: pages.txt, format: urls}
  pages-home: {source: pages-home.txt, format: urls}
categories:
  games: [games]
  pages: [pages]
  pages-home: [pages-home]
  bypass: [vigie/dns-bypass]
always_block: [bypass]
devices:
  unknown: refuse
server:
  proxy: {pac: selective}
groups:
  school: {networks: [127.0.0.0/24], schedule: week}
  home: {networks: [127.0.1.0/24], profile: maison}
  kiosk: {networks: [127.0.2.0/24], profile: maison, pac: all}
profiles:
  class:
    block: [games, pages]
    deny_urls: [youtube.com/shorts]
    safe_search: strict
  maison: {block: [pages-home], safe_search: 'off'}  # quoted: the test helpers rewrite this file with PyYAML
  nuit: {mode: block-all}
schedules:
  week:
    default: class
    rules:
      - {profile: nuit, time: "20:00-07:00"}
"""
FILES = {"rules.yaml": RULES, "games.txt": "roblox.com\n",
         # roblox.com/… : a URL rule on a host DNS blocks in every profile of the school group — no proxy needed
         "pages.txt": "pages.example/adult-section\nroblox.com/games/1\n",
         "pages-home.txt": "forum.example/off-topic\n"}
PROXY, DIRECT = "PROXY 127.0.0.1:8080", "DIRECT"
SCHOOL = {  # host → what the school group's PAC says
    "pages.example": PROXY, "www.pages.example": PROXY, "PAGES.EXAMPLE.": PROXY,  # a URL list of a blocked category
    "youtube.com": PROXY, "m.youtube.com": PROXY,  # a profile's deny_urls covers subdomains
    "www.google.fr": PROXY, "www.bing.com": PROXY, "html.duckduckgo.com": PROXY,  # safe search: those hosts,
    "mail.google.fr": DIRECT, "clients2.google.com": DIRECT,  # not their neighbours
    "192.0.2.10": PROXY, "2130706433": PROXY, "0x7f000001": PROXY, "127.1": PROXY, "[::1]": PROXY, "::1": PROXY,
    "intranet": PROXY,  # a plain host name: DNS search domains would make it anything
    "forum.example": DIRECT,  # a URL list of a category only the home profile blocks
    "roblox.com": DIRECT, "www.roblox.com": DIRECT,  # blocked by DNS in every profile: its URL rule needs no proxy
    "allowed.example": DIRECT, "notpages.example": DIRECT, "pages.example.org": DIRECT,
    "hasownproperty": PROXY, "constructor.example": DIRECT, "__proto__.example": DIRECT,
}
HOME = {"forum.example": PROXY, "pages.example": DIRECT, "roblox.com": DIRECT, "youtube.com": DIRECT,
        "www.google.fr": DIRECT, "allowed.example": DIRECT, "10.0.0.1": PROXY}


def run_pac(pac: str, hosts: list[str]) -> dict[str, str]:
    """FindProxyForURL for each host, evaluated by node with the PAC helper a browser provides."""
    node = shutil.which("node") or shutil.which("nodejs")
    assert node, "node is needed (Debian's nodejs package)"
    script = (pac + "\nfunction isPlainHostName(h) { return h.indexOf('.') < 0; }\n"
              f"var hosts = {json.dumps(hosts)}; var out = {{}};\n"
              "hosts.forEach(function (h) { out[h] = FindProxyForURL('http://' + h + '/', h); });\n"
              "console.log(JSON.stringify(out));\n")
    result = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    answers: dict[str, str] = json.loads(result.stdout)
    return answers


def ask_pac(addon: VigieAddon, address: str) -> http.Response:
    """The answer of the addon's request hook to a client at `address` fetching the PAC from the proxy itself."""
    flow = tflow.tflow(req=tutils.treq(host="127.0.0.1", port=8080, path=b"/proxy.pac", scheme=b"http",
                                       authority=b"", headers=http.Headers(Host="127.0.0.1:8080"), content=b""))
    flow.client_conn.peername = (address, 40000)
    flow.client_conn.sockname = ("127.0.0.1", 8080)

    async def hook() -> None:  # inside a running loop, which taddons then uses (and asyncio.run closes)
        with taddons.context(addon):
            addon.requestheaders(flow)

    asyncio.run(hook())
    assert flow.response is not None
    return flow.response


def pac_for(tmp_path: Path, address: str, files: dict[str, str] = FILES) -> tuple[str, dict[str, str]]:
    """The PAC the addon serves to a client at `address` asking the proxy directly, and its headers."""
    snapshot = snapshot_of(tmp_path, files)
    response = ask_pac(VigieAddon(lambda: snapshot, lambda: EMPTY_STATE), address)
    assert response.status_code == 200
    return response.get_text() or "", dict(response.headers)


def test_a_selective_pac_sends_the_proxy_exactly_what_it_must_see(tmp_path: Path) -> None:
    pac, headers = pac_for(tmp_path, "127.0.0.5")
    assert headers["Content-Type"] == "application/x-ns-proxy-autoconfig"
    assert headers["Cache-Control"] == "max-age=300" and headers["ETag"]
    assert run_pac(pac, list(SCHOOL)) == SCHOOL
    proxy_line = re.search(r'var PROXY = "([^"]*)";', pac)
    assert proxy_line and "DIRECT" not in proxy_line.group(1), "the proxied hosts have no DIRECT fallback"


def test_each_group_gets_its_own_pac_and_a_group_may_keep_all(tmp_path: Path) -> None:
    home, _ = pac_for(tmp_path, "127.0.1.5")
    assert run_pac(home, list(HOME)) == HOME
    kiosk, _ = pac_for(tmp_path, "127.0.2.5")
    assert set(run_pac(kiosk, ["allowed.example", "roblox.com", "forum.example"]).values()) == {PROXY}
    stranger, _ = pac_for(tmp_path, "192.0.2.99")  # not placed in a group: everything through the proxy
    assert set(run_pac(stranger, ["allowed.example"]).values()) == {PROXY}


def test_a_pac_that_cannot_be_made_sends_everything_to_the_proxy(tmp_path: Path) -> None:
    """A PAC that fails to load makes a browser go DIRECT, unfiltered: an error serves the `all` PAC instead."""
    def no_snapshot() -> Snapshot:
        raise RuntimeError("the rules are gone")

    before = PROXY_ERRORS.labels("pac")._value.get()
    response = ask_pac(VigieAddon(no_snapshot, lambda: EMPTY_STATE), "127.0.0.5")
    assert response.status_code == 200
    assert set(run_pac(response.get_text() or "", ["allowed.example", "roblox.com"]).values()) == {PROXY}
    assert PROXY_ERRORS.labels("pac")._value.get() == before + 1


def test_pac_proxies_names_every_server(tmp_path: Path) -> None:
    files = {**FILES, "rules.yaml": RULES.replace("proxy: {pac: selective}",
                                                  "proxy: {pac: all, pac_proxies: [10.99.0.1:8080, 10.99.0.2:8080]}")}
    pac, _ = pac_for(tmp_path, "127.0.0.5", files)
    assert run_pac(pac, ["a.example"]) == {"a.example": "PROXY 10.99.0.1:8080; PROXY 10.99.0.2:8080"}


def requests_decided(port: int) -> float:
    """Requests one Vigie process's proxy decided, from its /metrics."""
    return sum(float(v) for v in re.findall(r"^vigie_proxy_requests_total\{.*\} (\S+)$", metrics_text(port),
                                            re.MULTILINE))


def proxy_requests(metrics_port: int, processes: int = 2) -> float:
    """Requests the proxy decided, summed over every process's metrics (the main one, then the next ports)."""
    return sum(requests_decided(port) for port in range(metrics_port, metrics_port + processes))


def metrics_text(port: int) -> str:
    """A worker's /metrics; a worker still starting is waited for (at most 20 s)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return str(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize("reached", ["127.0.0.1", "127.0.0.2"], ids=["at school", "over the VPN address"])
def test_vigie_run_serves_chromium_through_a_selective_pac(tmp_path: Path, reached: str) -> None:
    """`vigie run` with DNS and proxy workers `auto`; the device reaches Vigie at the school address or at the VPN
    address (the tunnel's, here another loopback address), and the PAC names the address it reached."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is needed (make test installs Debian's chromium package)"
    rules = write_tree(tmp_path, {**FILES, "rules.yaml": RULES.replace("schedule: week", "profile: class")})
    cores = os.cpu_count() or 1
    processes = 1 + 2 * (cores - 1)  # the main process, then the extra DNS and proxy workers
    metrics_port, proxy_port = free_port_run(processes), free_port()
    with Origin(tmp_path) as origin, UpstreamServer() as upstream:
        allow_origin(rules, origin)
        command = ["run", "--rules", str(rules), "--dns-listen", f"127.0.0.1:{free_port()}", "--upstream",
                   f"127.0.0.1:{upstream.port}", "--workers", "auto", "--proxy-listen", f"{reached}:{proxy_port}",
                   "--proxy-workers", "auto", "--metrics-listen", f"127.0.0.1:{metrics_port}", "--api-listen", "off",
                   "--set", f"scripts={REPO / 'tests' / 'proxy_origin_map.py'}",
                   "--set", f"ssl_verify_upstream_trusted_ca={origin.ca_file}"]
        env = {"VIGIE_TEST_ORIGIN_HTTP": str(origin.http.server_port),
               "VIGIE_TEST_ORIGIN_HTTPS": str(origin.https.server_port)}
        with RunningVigie(command, tmp_path / "run.log", env) as running:
            assert f"{cores} worker(s)" in running.output()
            with urllib.request.urlopen(f"http://{reached}:{proxy_port}/proxy.pac", timeout=10) as response:
                assert f'"PROXY {reached}:{proxy_port}"' in response.read().decode(), "the address it reached"

            def browse(url: str) -> str:
                """The page as headless Chromium shows it, configured by the PAC; every name resolves to 127.0.0.1,
                where the origin listens (a name sent DIRECT reaches it without Vigie)."""
                return subprocess.run(
                    [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update",  # only the page's requests
                     f"--user-data-dir={tmp_path / 'chromium-profile'}",
                     f"--proxy-pac-url=http://{reached}:{proxy_port}/proxy.pac",
                     f"--host-resolver-rules=MAP * 127.0.0.1, EXCLUDE {reached}", "--dump-dom", url],
                    check=True, capture_output=True, text=True, timeout=60).stdout

            port = origin.http.server_port
            before = proxy_requests(metrics_port, processes)
            direct = browse(f"http://allowed.example:{port}/direct")
            assert '"path": "/direct"' in direct.replace('":"', '": "'), direct[:300]
            assert proxy_requests(metrics_port, processes) == before, "an allowed host went DIRECT"
            blocked = browse(f"http://www.pages.example:{port}/adult-section/1")
            assert "<title>Site blocked — www.pages.example</title>" in blocked, blocked[:300]  # Chromium: English
            after_block = proxy_requests(metrics_port, processes)
            assert after_block > before, "a host with URL rules went through the proxy (the page, and its favicon)"
            # 192.0.2.10 (documentation range) in one number: the PAC sends it to the proxy, which refuses IP
            # literals without connecting. (A loopback literal would not do: Chromium never proxies loopback.)
            literal = browse("http://3221225994/")
            assert "<title>Site blocked — 192.0.2.10</title>" in literal, literal[:300]
            assert proxy_requests(metrics_port, processes) > after_block
