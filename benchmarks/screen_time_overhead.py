"""What screen time costs the DNS resolver, one run: the same queries from a device whose profile has no budget
(answers shared by the group, the cached fast path) and from a device under a budget (every query decided for the
device and its minute marked), with the SQLite store and with a Redis store.

    .venv/bin/python benchmarks/screen_time_overhead.py [--seconds 10]

Needs dnsperf, unbound (the loopback upstream) and redis-server; installs them with apt-get when missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dns_vs_unbound import (
    ARCHIVE,
    DNSPERF,
    REPO,
    UPSTREAM_CONF,
    Figures,
    dnsperf,
    ensure_tools,
    serving,
    start,
    write_files,
)

from blocklists.ut1 import read_ut1
from tests.conftest import free_port
from tests.state_servers import RedisServer

RULES = """
server:
  dns: {{rate_limit: off}}
  state: {state}
lists:
  ut1: {{source: {archive}, format: ut1}}
categories:
  blocked: [{categories}]
devices:
  inventory: devices.csv
groups:
  bench: {{profile: {profile}}}
profiles:
  unmetered: {{block: [blocked], safe_search: "off"}}
  metered: {{block: [blocked], safe_search: "off", screen_time: 24h}}
"""


KINDS = ("cached", "mixed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    arguments = parser.parse_args()
    ensure_tools()
    if not shutil.which("redis-server"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True)
    results: dict[str, dict[str, Figures]] = {}
    with tempfile.TemporaryDirectory(prefix="vigie-screen-time-bench-") as temp:
        workdir = Path(temp)
        _, files = write_files(workdir, rounds=1)  # `mixed` to warm up, `mixed@1` (never-seen names unseen) to measure
        # Every category blocked, as in dns_vs_unbound.py: the upstream answers only *.example names.
        categories = ", ".join(f"ut1/{name}" for name in sorted(read_ut1(ARCHIVE).categories))
        upstream_port = free_port()
        (workdir / "upstream.conf").write_text(UPSTREAM_CONF.format(port=upstream_port, dir=workdir))
        upstream, _ = start(["unbound", "-d", "-c", str(workdir / "upstream.conf")], upstream_port,
                            workdir / "upstream.log", workdir)
        (workdir / "devices.csv").write_text("name,addresses,group,credential\nbench-tablet,127.0.0.1,bench,\n")
        try:
            with RedisServer(workdir / "redis") as redis_server:
                setups = {"no budget (shared answers)": ("unmetered", "sqlite:///var/state.sqlite3"),
                          "budget, SQLite store": ("metered", "sqlite:///var/state.sqlite3"),
                          "budget, Redis store": ("metered", redis_server.url)}
                for label, (profile, state) in setups.items():
                    rules = workdir / "rules.yaml"
                    rules.write_text(RULES.format(archive=ARCHIVE, state=state, profile=profile,
                                                  categories=categories))
                    port = free_port()
                    command = [sys.executable, "-m", "vigie", "dns", "--rules", str(rules), "--workers", "1",
                               "--dns-listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{upstream_port}",
                               "--metrics-listen", "off", "--api-listen", "off"]
                    with serving(command, port, workdir / "vigie.log", REPO):
                        results[label] = {}
                        for kind in KINDS:
                            dnsperf(port, files[kind], 2)
                            measured = files["mixed@1"] if kind == "mixed" else files[kind]
                            results[label][kind] = dnsperf(port, measured, arguments.seconds)
                    print(f"  measured {label}", file=sys.stderr, flush=True)
        finally:
            upstream.terminate()
            upstream.wait(15)
    print(f"Vigie 1 worker; dnsperf {' '.join(DNSPERF)}; {arguments.seconds:g} s per file after a 2 s warm-up\n")
    print(f"{'':28}" + "".join(f"{kind + ' qps':>13}{'ms':>7}{'lost':>6}{'ratio':>7}" for kind in KINDS))
    baseline = results["no budget (shared answers)"]
    for label, figures in results.items():
        print(f"{label:28}" + "".join(f"{f.qps:>13,.0f}{f.latency_ms:>7.2f}{f.lost:>6}"
                                       f"{f.qps / baseline[kind].qps:>7.2f}" for kind, f in figures.items()))


if __name__ == "__main__":
    main()
