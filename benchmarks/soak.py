"""Soak: `vigie run` (DNS and proxy, one worker of each per core, the whole UT1 snapshot) at the city's peak for a
long while — 20,000 DNS queries a second (the mixed file of dns_vs_unbound.py), 200 requests a second through the
proxy on kept-alive connections, and new TLS connections through the proxy (a CONNECT each, passed through: a
class opening a page) — with memory sampled from start to end and every error counted. Loopback only; it stops by
itself.

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--qps 20000] [--requests 200] [--connections 200]

Installs dnsperf, unbound (the loopback upstream), nginx-light (the origin) and hey with apt-get when missing.
Prints memory (summed RSS and PSS of every Vigie process) at each sample, then the totals: DNS queries sent and
lost, average latency, proxy answers by status, Vigie's own error counters and log lines.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks import dns_vs_unbound as dns_bench  # noqa: E402
from benchmarks import proxy_overhead as proxy_bench  # noqa: E402
from blocklists.ut1 import read_ut1  # noqa: E402
from tests.conftest import free_port  # noqa: E402

# The benchmark's rules (every UT1 category blocked, so the query file's blocked names are) with the production
# worker count. The per-client rate limit is off: dnsperf is one address sending what thousands of tablets would.
# The origin (nginx) is on loopback, which the proxy reaches only as a listed internal host.
RULES = dns_bench.RULES.replace("{{rate_limit: off}}", "{{rate_limit: off, workers: auto}}\n"
                                "  proxy: {{internal_hosts: [127.0.0.1], workers: auto}}")
PROCESS_PORTS = 8  # the main process's metrics port and the next ones, one per extra DNS or proxy worker


def metrics_total(first_port: int, prefix: str) -> float:
    """The sum of every sample of the series starting with `prefix` over every Vigie process's /metrics."""
    total = 0.0
    for port in range(first_port, first_port + PROCESS_PORTS):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            continue  # fewer workers than ports tried
        total += sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix + " ")
                     or line.startswith(prefix + "{"))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--qps", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=200, help="proxy requests per second (kept alive)")
    parser.add_argument("--connections", type=int, default=200, help="new TLS connections per second")
    parser.add_argument("--sample-minutes", type=float, default=5)
    arguments = parser.parse_args()
    dns_bench.ensure_tools()
    proxy_bench.ensure_tools()
    seconds = arguments.minutes * 60

    with tempfile.TemporaryDirectory(prefix="vigie-soak-") as temp:
        workdir = Path(temp)
        _, queries = dns_bench.write_files(workdir)
        upstream_port, dns_port, proxy_port, metrics_port = free_port(), free_port(), free_port(), free_port()
        (workdir / "upstream.conf").write_text(dns_bench.UPSTREAM_CONF.format(port=upstream_port, dir=workdir))
        rules = workdir / "rules.yaml"
        categories = ", ".join(f"ut1/{name}" for name in sorted(read_ut1(dns_bench.ARCHIVE).categories))
        rules.write_text(RULES.format(archive=dns_bench.ARCHIVE, categories=categories))
        log = workdir / "vigie.log"
        with proxy_bench.nginx_origin(workdir) as (http_port, https_port, origin_ca):
            vigie = [sys.executable, "-m", "vigie", "run", "--rules", str(rules), "--dns-listen",
                     f"127.0.0.1:{dns_port}", "--upstream", f"127.0.0.1:{upstream_port}", "--proxy-listen",
                     f"127.0.0.1:{proxy_port}", "--metrics-listen", f"127.0.0.1:{metrics_port}", "--api-listen",
                     "off", "--set", f"scripts={proxy_bench.MAP_SCRIPT}", "--set",
                     f"ssl_verify_upstream_trusted_ca={origin_ca}"]
            # The origin-map script (tests/proxy_origin_map.py) reads these in the proxy processes.
            os.environ.update({"VIGIE_TEST_ORIGIN_HTTP": str(http_port), "VIGIE_TEST_ORIGIN_HTTPS": str(https_port)})
            with dns_bench.serving(["unbound", "-d", "-c", str(workdir / "upstream.conf")], upstream_port,
                                   workdir / "unbound.log", workdir), \
                    dns_bench.serving(vigie, dns_port, log, REPO) as (server, startup):
                proxy_bench.wait_for_port(proxy_port, server, "the proxy")
                print(f"vigie run up in {startup:.1f} s; {arguments.minutes:g} min at {arguments.qps:,} qps DNS, "
                      f"{arguments.requests} req/s and {arguments.connections} new TLS connections/s through the "
                      "proxy", flush=True)
                report = run_load(arguments, seconds, queries["mixed"], dns_port, proxy_port, metrics_port, server)
        log_text = log.read_text()
    print_report(report, log_text)


def run_load(arguments: argparse.Namespace, seconds: float, queries: Path, dns_port: int, proxy_port: int,
             metrics_port: int, server: subprocess.Popen[bytes]) -> dict[str, object]:
    results: dict[str, object] = {}

    def dns() -> None:
        results["dns"] = dns_bench.dnsperf(dns_port, queries, seconds, arguments.qps)

    def hey(name: str, rate: int, url: str, *options: str) -> None:
        concurrency = 10 if rate <= 200 else 20
        output = subprocess.run(["hey", "-z", f"{seconds}s", "-c", str(concurrency), "-q", str(rate / concurrency),
                                 *options, "-x", f"http://127.0.0.1:{proxy_port}", url],
                                capture_output=True, text=True, timeout=seconds + 120).stdout
        results[name] = {status: int(count) for status, count in re.findall(r"\[(\d+)\]\s+(\d+) responses",
                                                                           output)}
        errors = re.search(r"Error distribution:\n((?:.*\n)*)", output)
        results[f"{name}_errors"] = errors.group(1).strip() if errors else ""

    threads = [threading.Thread(target=dns),
               threading.Thread(target=hey, args=("proxy", arguments.requests, f"http://{proxy_bench.PASS_HOST}/")),
               threading.Thread(target=hey, args=("tls", arguments.connections, f"https://{proxy_bench.PASS_HOST}/",
                                                  "-disable-keepalive"))]
    for thread in threads:
        thread.start()
    samples = []
    started = time.monotonic()
    time.sleep(min(60.0, seconds / 4))  # warmed up: caches filled, certificates minted
    while any(thread.is_alive() for thread in threads):
        peak, proportional = dns_bench.memory_mb(server)
        current = current_rss_mb(server)
        samples.append((time.monotonic() - started, current, proportional, peak))
        print(f"  {samples[-1][0] / 60:5.1f} min  RSS {current:7.1f} MB  PSS {proportional:7.1f} MB  "
              f"(peak RSS so far {peak:.1f} MB)", flush=True)
        for _ in range(int(arguments.sample_minutes * 60)):
            if not any(thread.is_alive() for thread in threads):
                break
            time.sleep(1)
    results["samples"] = samples
    results["errors"] = {name: metrics_total(metrics_port, name) for name in (
        "vigie_dns_errors_total", "vigie_dns_rate_limited_total", "vigie_dns_stale_answers_total",
        "vigie_state_store_errors_total", "vigie_proxy_errors_total")}
    results["alive"] = server.poll() is None
    return results


def current_rss_mb(process: subprocess.Popen[bytes]) -> float:
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    total = 0
    for pid in [str(process.pid), *children]:
        try:
            match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
        except OSError:
            continue
        total += int(match.group(1)) if match else 0
    return total / 1024


def print_report(report: dict[str, object], log_text: str) -> None:
    dns = report["dns"]
    samples = report["samples"]
    assert isinstance(dns, dns_bench.Figures) and isinstance(samples, list)
    first, last = samples[0], samples[-1]
    print("\nsoak result")
    print(f"  DNS: {dns.sent:,} queries sent, {dns.lost:,} lost, {dns.qps:,.0f} qps, "
          f"average {dns.latency_ms:.3f} ms")
    print(f"  proxy, kept-alive requests: answers by status {report['proxy']}; errors: "
          f"{report['proxy_errors'] or 'none'}")
    print(f"  proxy, new TLS connections: answers by status {report['tls']}; errors: {report['tls_errors'] or 'none'}")
    print(f"  memory (all Vigie processes): RSS {first[1]:.1f} MB at {first[0] / 60:.1f} min → {last[1]:.1f} MB at "
          f"{last[0] / 60:.1f} min ({last[1] - first[1]:+.1f} MB); PSS {first[2]:.1f} → {last[2]:.1f} MB")
    print(f"  Vigie's counters: {report['errors']}")
    print(f"  log: {log_text.count(' ERROR ')} ERROR line(s), {log_text.count('Traceback')} traceback(s); "
          f"service {'still running' if report['alive'] else 'STOPPED'}")
    for line in [line for line in log_text.splitlines() if " ERROR " in line or " WARNING " in line][:10]:
        print(f"    {line}")


if __name__ == "__main__":
    main()
