"""What the Vigie addon costs the proxy: the same four paths through mitmproxy with and without it, in one run.

    .venv/bin/python benchmarks/proxy_overhead.py [--seconds 4] [--rounds 3] [--concurrency 10]

A local nginx (HTTP and HTTPS, keep-alive) is the origin; `hey -x` is the client (both installed with apt-get
when missing). "Without" is plain mitmproxy (`mitmdump`, passing TLS through with `ignore_hosts` for the
pass-through paths); "with" is `vigie proxy` with the whole UT1 snapshot loaded. For the pass-through paths a third
column is plain mitmproxy passing TLS through after reading the ClientHello, the mechanism Vigie needs to see the
TLS name (a harmless CONNECT may carry a blocked name). All load the same small script that sends upstream
connections to nginx in place of DNS, run side by side, and take turns: rounds of a few seconds per server and path,
the order reversed every round; a ratio is the median of per-round ratios. Then the decision itself: the engine and
the request hook timed per request on the same snapshot (median and p99, microseconds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import UT1_ARCHIVE, free_port  # noqa: E402
from tests.proxy_servers import make_origin_certificates  # noqa: E402

ARCHIVE = UT1_ARCHIVE  # VIGIE_UT1_ARCHIVE, else ../shared/data/ut1-blacklists.tar.gz
MAP_SCRIPT = REPO / "tests" / "proxy_origin_map.py"
# Plain mitmproxy passing TLS through after reading the ClientHello: the mechanism any SNI-based filter needs.
PASS_AFTER_HELLO = """
class PassAfterHello:
    def tls_clienthello(self, data):
        data.ignore_connection = True
addons = [PassAfterHello()]
"""
PASS_HOST, INTERCEPT_HOST = "allowed.example", "wiki.example"
RULES = f"""
lists:
  ut1: {{source: {ARCHIVE}, format: ut1}}
categories:
  adult: [ut1/adult, ut1/mixed_adult]
  games: [ut1/games]
  social: [ut1/social_networks, ut1/chat]
  gambling: [ut1/gambling]
  malware: [ut1/malware, ut1/phishing]
  bypass: [vigie/dns-bypass, ut1/doh, ut1/vpn, ut1/redirector]
always_block: [bypass, malware]
server:
  proxy: {{internal_hosts: [127.0.0.1]}}  # the origin (nginx) is on loopback
groups:
  bench: {{networks: [127.0.0.0/8], profile: class}}
profiles:
  class:
    block: [adult, games, social, gambling]
    deny_urls: [{INTERCEPT_HOST}/forbidden]
"""
NGINX = """
worker_processes 1; daemon off; pid {dir}/nginx.pid; error_log {dir}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  server {{ listen 127.0.0.1:{http}; location / {{ return 200 "ok\\n"; }} }}
  server {{ listen 127.0.0.1:{https} ssl; ssl_certificate {cert}; ssl_certificate_key {cert};
           location / {{ return 200 "ok\\n"; }} }}
}}
"""
# (label, URL, hey options, plain mitmproxy passes TLS through)
PATHS = [
    ("plain HTTP, keep-alive", f"http://{PASS_HOST}/", (), False),
    ("intercepted HTTPS, keep-alive", f"https://{INTERCEPT_HOST}/", (), False),
    ("passed-through HTTPS, keep-alive", f"https://{PASS_HOST}/", (), True),
    ("passed-through HTTPS, new connection", f"https://{PASS_HOST}/", ("-disable-keepalive",), True),
]


def ensure_tools() -> None:
    missing = [package for tool, package in (("nginx", "nginx-light"), ("hey", "hey")) if not shutil.which(tool)]
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    import socket

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} stopped at start")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"{what} did not listen on {port}")


@contextlib.contextmanager
def nginx_origin(workdir: Path) -> Iterator[tuple[int, int, Path]]:
    """nginx on loopback answering "ok" over HTTP and HTTPS: (http port, https port, the CA of its certificate)."""
    origin_ca, origin_cert = make_origin_certificates(workdir)
    http_port, https_port = free_port(), free_port()
    (workdir / "nginx.conf").write_text(NGINX.format(dir=workdir, http=http_port, https=https_port,
                                                     cert=origin_cert))
    nginx = subprocess.Popen(["nginx", "-c", str(workdir / "nginx.conf"), "-p", str(workdir)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(http_port, nginx, "nginx")
        yield http_port, https_port, origin_ca
    finally:
        nginx.terminate()
        nginx.wait(10)


def hey(proxy_port: int, url: str, options: tuple[str, ...], seconds: float, concurrency: int) -> float:
    output = subprocess.run(["hey", "-z", f"{seconds}s", "-c", str(concurrency), *options,
                             "-x", f"http://127.0.0.1:{proxy_port}", url],
                            capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    statuses = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", output))
    if set(statuses) != {"200"}:
        raise SystemExit(f"{url}: unexpected answers {statuses}\n{output}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    assert match, output
    return float(match.group(1))


def start_proxy(command: list[str], port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "a") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    wait_for_port(port, process, command[0])
    return process


def rounds_of(servers: dict[str, int], url: str, options: tuple[str, ...], seconds: float, concurrency: int,
              rounds: int) -> dict[str, list[float]]:
    """req/s of each server (name → port) in each round; the servers take turns, the order reversed every round,
    so that a ratio compares runs seconds apart on a machine whose speed drifts over minutes."""
    for port in servers.values():
        hey(port, url, options, 1, concurrency)  # warm-up: certificates minted, lists mapped
    measured: dict[str, list[float]] = {name: [] for name in servers}
    order = list(servers)
    for _ in range(rounds):
        for name in order:
            # Best of two: hey now and then stalls a connection for its whole timeout, which says nothing about
            # the proxy.
            measured[name].append(max(hey(servers[name], url, options, seconds, concurrency) for _ in range(2)))
        order.reverse()
    return measured


def decision_latency(rules: Path) -> tuple[float, float, float, float]:
    """(median, p99) µs of decide() and of the request hook, over requests for varied names and URLs."""
    from datetime import UTC, datetime

    from mitmproxy import http
    from mitmproxy.test import taddons, tflow, tutils

    from filter_proxy.addon import VigieAddon
    from policy.decision import Query
    from policy.engine import decide
    from policy.state import EMPTY_STATE
    from vigie.loading import load_snapshot

    snapshot = load_snapshot(rules).snapshot
    client = snapshot.identify("127.0.0.1")
    hosts = [f"www.site{i}.example" for i in range(500)] + ["www.roblox.com", "www.google.com", "wiki.example"]
    now = datetime.now(UTC)
    engine_times = []
    for index in range(20_000):
        host = hosts[index % len(hosts)]
        started = time.perf_counter_ns()
        decide(Query(client, host, now, f"/page/{index}", f"https://{host}/page/{index}"), snapshot, EMPTY_STATE)
        engine_times.append((time.perf_counter_ns() - started) / 1000)
    addon = VigieAddon(lambda: snapshot, lambda: EMPTY_STATE)
    hook_times = []

    async def run_hooks() -> None:
        with taddons.context(addon):
            for index in range(5_000):
                host = hosts[index % len(hosts)]
                flow = tflow.tflow(req=tutils.treq(host=host, port=80, scheme=b"http", authority=b"",
                                                   path=f"/page/{index}".encode(),
                                                   headers=http.Headers(Host=host), content=b""))
                started = time.perf_counter_ns()
                addon.requestheaders(flow)
                hook_times.append((time.perf_counter_ns() - started) / 1000)

    asyncio.run(run_hooks())

    def p99(values: list[float]) -> float:
        return sorted(values)[int(len(values) * 0.99)]

    return statistics.median(engine_times), p99(engine_times), statistics.median(hook_times), p99(hook_times)


def main() -> None:
    if not ARCHIVE.exists():
        sys.exit(f"no UT1 snapshot at {ARCHIVE} (set VIGIE_UT1_ARCHIVE): this benchmark loads the real lists")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=10)
    arguments = parser.parse_args()
    ensure_tools()
    with tempfile.TemporaryDirectory(prefix="vigie-proxy-bench-") as temp, \
            nginx_origin(Path(temp)) as (http_port, https_port, origin_ca):
        workdir = Path(temp)
        rules = workdir / "rules.yaml"
        rules.write_text(RULES)
        env = {**os.environ, "VIGIE_TEST_ORIGIN_HTTP": str(http_port), "VIGIE_TEST_ORIGIN_HTTPS": str(https_port)}
        venv_bin = Path(sys.executable).parent
        common = ["--set", f"scripts={MAP_SCRIPT}", "--set", f"ssl_verify_upstream_trusted_ca={origin_ca}",
                  "--set", "connection_strategy=lazy"]
        (workdir / "pass_after_hello.py").write_text(PASS_AFTER_HELLO)
        ports = {name: free_port() for name in ("mitmproxy", "mitmproxy, ignore_hosts", "mitmproxy, SNI", "Vigie")}

        def plain(name: str, *extra: str) -> list[str]:
            return [str(venv_bin / "mitmdump"), "-q", "--listen-host", "127.0.0.1", "--listen-port",
                    str(ports[name]), "--set", f"confdir={workdir / 'mitmdump'}", *common, *extra]

        commands = {
            "mitmproxy": plain("mitmproxy"),
            "mitmproxy, ignore_hosts": plain("mitmproxy, ignore_hosts", "--ignore-hosts", ".*"),
            "mitmproxy, SNI": plain("mitmproxy, SNI", "--set", f"scripts={workdir / 'pass_after_hello.py'}"),
            "Vigie": [sys.executable, "-m", "vigie", "proxy", "--rules", str(rules), "--metrics-listen", "off",
                      "--api-listen", "off", "--proxy-listen", f"127.0.0.1:{ports['Vigie']}", *common],
        }
        processes = []
        rows = []
        try:
            for name, command in commands.items():  # side by side, idle while the others are measured
                processes.append(start_proxy(command, ports[name], env, workdir / f"{name}.log"))
            for label, url, options, plain_passes_tls in PATHS:
                baseline = "mitmproxy, ignore_hosts" if plain_passes_tls else "mitmproxy"
                servers = {baseline: ports[baseline], "Vigie": ports["Vigie"]}
                if plain_passes_tls:
                    servers["mitmproxy, SNI"] = ports["mitmproxy, SNI"]
                measured = rounds_of(servers, url, options, arguments.seconds, arguments.concurrency,
                                     arguments.rounds)
                rows.append((label, measured[baseline], measured.get("mitmproxy, SNI"), measured["Vigie"]))
                print(f"  measured {label}", file=sys.stderr, flush=True)
        finally:
            for process in processes:
                process.terminate()
                process.wait(10)
        engine_median, engine_p99, hook_median, hook_p99 = decision_latency(rules)

    def ratios(ours: list[float], theirs: list[float]) -> str:
        each = sorted(a / b for a, b in zip(ours, theirs, strict=True))
        return f"{statistics.median(each):.2f} ({each[0]:.2f}–{each[-1]:.2f})"

    print(f"{arguments.rounds} rounds per server and path, each the best of two {arguments.seconds:g}-s runs of hey -c "
          f"{arguments.concurrency}; median req/s, and the median (range) of the per-round ratios")
    print(f"{'path':38} {'mitmproxy':>10} {'same, SNI':>10} {'Vigie':>8}  {'ratio':>16}  {'ratio SNI':>16}")
    for label, without, after_hello, with_addon in rows:
        sni = f"{statistics.median(after_hello):>10,.0f}" if after_hello else f"{'-':>10}"
        sni_ratio = ratios(with_addon, after_hello) if after_hello else "-"
        print(f"{label:38} {statistics.median(without):>10,.0f} {sni} {statistics.median(with_addon):>8,.0f}  "
              f"{ratios(with_addon, without):>16}  {sni_ratio:>16}")
    print("mitmproxy: plain mitmdump (for pass-through paths, passing TLS through at CONNECT with ignore_hosts); "
          "same, SNI: plain mitmdump passing TLS through after reading the ClientHello, as Vigie must to see the "
          "name. Target: ratio ≥ 0.90.")
    print(f"\ndecision per request (UT1 snapshot loaded):  engine median {engine_median:.0f} µs, "
          f"p99 {engine_p99:.0f} µs;  request hook median {hook_median:.0f} µs, p99 {hook_p99:.0f} µs")


if __name__ == "__main__":
    main()
