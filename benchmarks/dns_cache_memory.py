"""Does `dns.cache_size` hold? One run: Vigie's DNS resolver (one worker, no lists) with several cache sizes, each
filled with never-seen names each asked three times, a thousand names apart (the first fetches the answer, the second
makes its reply cache entry, the third indexes its exact bytes), then its RSS growth and its cache gauges against the
size it was given.

    .venv/bin/python benchmarks/dns_cache_memory.py [--names 150000]

The caches count their memory with costs per entry (`dns_resolver/budget.py`, `ENTRY_COST` in `fastpath.py` and
`forwarding.py`, passed to `bounded.py`'s `BoundedCache`); this checks those costs against the process's real
growth. Needs dnsperf and unbound (the loopback upstream); installs them with apt-get when missing.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dns_vs_unbound import REPO, UPSTREAM_CONF, ensure_tools, serving, start

from tests.conftest import free_port

RULES = """
server:
  dns: {{rate_limit: off, cache_size: {size}}}
groups:
  bench: {{networks: [127.0.0.0/8], profile: open}}
profiles:
  open: {{}}
"""
SIZES = ("4MB", "16MB", "32MB", "64MB")


def rss_mb(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else 0.0


def gauges(port: int) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(gauge, cache): float(value) for gauge, cache, value in
            re.findall(r'^vigie_dns_cache_(bytes|limit_bytes)\{cache="(\w+)"\} (\S+)$', text, re.MULTILINE)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", type=int, default=150_000)
    arguments = parser.parse_args()
    ensure_tools()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vigie-cache-bench-") as temp:
        workdir = Path(temp)
        names = workdir / "names.txt"
        # Blocks of 1,000 names, each block three times: a name comes back while its upstream answer is cached,
        # and never while its first query is still in flight.
        names.write_text("".join(f"new{index}.example A\n" for start in range(0, arguments.names, 1000)
                                 for _ in range(3) for index in range(start, min(start + 1000, arguments.names))))
        upstream_port = free_port()
        (workdir / "upstream.conf").write_text(UPSTREAM_CONF.format(port=upstream_port, dir=workdir))
        upstream, _ = start(["unbound", "-d", "-c", str(workdir / "upstream.conf")], upstream_port,
                            workdir / "upstream.log", workdir)
        try:
            for size in SIZES:
                (workdir / "rules.yaml").write_text(RULES.format(size=size))
                port, metrics = free_port(), free_port()
                command = [sys.executable, "-m", "vigie", "dns", "--rules", str(workdir / "rules.yaml"),
                           "--workers", "1", "--dns-listen", f"127.0.0.1:{port}", "--upstream",
                           f"127.0.0.1:{upstream_port}", "--metrics-listen", f"127.0.0.1:{metrics}",
                           "--api-listen", "off"]
                with serving(command, port, workdir / "vigie.log", REPO) as (process, _):
                    before = rss_mb(process.pid)
                    # Once through the file, at a rate the upstream keeps up with: every cache filled.
                    subprocess.run(["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(names), "-n", "1",
                                    "-Q", "20000", "-c", "8"], capture_output=True, check=True, timeout=600)
                    after = rss_mb(process.pid)
                    figures = gauges(metrics)
                used = sum(v for (kind, _), v in figures.items() if kind == "bytes") / 1e6
                limit = sum(v for (kind, _), v in figures.items() if kind == "limit_bytes") / 1e6
                rows.append((size, before, after, used, limit))
                print(f"  measured {size}", file=sys.stderr, flush=True)
        finally:
            upstream.terminate()
            upstream.wait(15)
    print(f"{arguments.names:,} never-seen names, each asked three times; one worker\n")
    print(f"{'cache_size':>10}{'RSS start MB':>14}{'RSS filled MB':>15}{'growth MB':>11}{'counted MB':>12}"
          f"{'limit MB':>10}{'growth/size':>13}")
    for size, before, after, used, limit in rows:
        size_mb = int(size.removesuffix("MB"))
        print(f"{size:>10}{before:>14.1f}{after:>15.1f}{after - before:>11.1f}{used:>12.1f}{limit:>10.1f}"
              f"{(after - before) / size_mb:>13.2f}")


if __name__ == "__main__":
    main()
