"""Vigie's DNS resolver against unbound, same machine, same list, same queries, one run.

    .venv/bin/python benchmarks/dns_vs_unbound.py [--seconds 5] [--rounds 3] [--steady-seconds 30] [--against REV]

Installs dnsperf and unbound with apt-get when missing. The upstream of both is a loopback unbound recursor in
front of a loopback unbound "zone" that answers every `*.example` name and 500 `*.alias` names, each a two-step
CNAME chain (`a7.alias` → `e7.edge.alias` → `site7.example`) that the recursor follows, as a real recursive resolver
answers a CDN-hosted site. Under test: unbound with 1 and 2 threads, every UT1 domain of ../shared/data as an
`always_nxdomain` local zone, forwarding the rest; Vigie with 1 and 2 workers blocking every UT1 category (so it
judges every name of each chain). Four query files: cached allowed names; blocked names (half with `www.`); mixed
(80 % repeated allowed, 15 % blocked, 5 % never seen); chains, the same mix where a third of the allowed names are
aliases. For each: qps, average latency and lost queries (dnsperf), peak RSS of all processes, and start-up time to
the first answer (Vigie with its compiled lists already on disk). Then Vigie at a steady 20,000 qps. With
`--against REV`, Vigie as of a git revision (2 workers, from a temporary worktree) takes the same turns, and this
code's ratio to it is printed: what a change costs, apart from the machine's state.

The four servers run side by side (idle but for the one measured) and take turns, file by file, for several
rounds: a shared machine's speed drifts by tens of percent over minutes, so a ratio is taken between runs seconds apart
(the median of the rounds), never between a server measured early and one measured minutes later. Every warm-up and
round of the mixed file has never-seen names of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from blocklists.names import is_plain_name  # noqa: E402
from blocklists.ut1 import read_ut1  # noqa: E402
from tests.conftest import UT1_ARCHIVE, free_port  # noqa: E402

ARCHIVE = UT1_ARCHIVE  # VIGIE_UT1_ARCHIVE, else ../shared/data/ut1-blacklists.tar.gz
# 32 source ports: with 8, the kernel's SO_REUSEPORT hash often gave one of unbound's two threads (each has its own
# socket) three quarters of the queries. Vigie's workers share one socket and do not depend on it.
DNSPERF = ["-c", "32", "-T", "2", "-q", "500"]


@dataclass
class Figures:
    qps: float
    latency_ms: float
    lost: int
    sent: int


def ensure_tools() -> None:
    missing = [package for tool, package in (("dnsperf", "dnsperf"), ("unbound", "unbound")) if not shutil.which(tool)]
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def ask(port: int, name: str = "probe.example") -> bool:
    """One A query over UDP; whether any answer came back within 0.2 s."""
    query = os.urandom(2) + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        sock.sendto(query, ("127.0.0.1", port))
        try:
            return sock.recv(4096)[:2] == query[:2]
        except TimeoutError:
            return False


def start(command: list[str], port: int, log: Path, cwd: Path) -> tuple[subprocess.Popen[bytes], float]:
    """Start a server; returns it and the seconds until it answered a first query."""
    started = time.monotonic()
    with open(log, "a") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    while not ask(port):
        if process.poll() is not None or time.monotonic() - started > 120:
            raise SystemExit(f"{command[0]} did not start:\n{log.read_text()[-2000:]}")
    return process, time.monotonic() - started


@contextlib.contextmanager
def serving(command: list[str], port: int, log: Path, cwd: Path) -> Iterator[tuple[subprocess.Popen[bytes], float]]:
    """A server started (see `start`) for the block's duration, then terminated."""
    process, startup = start(command, port, log, cwd)
    try:
        yield process, startup
    finally:
        process.terminate()
        process.wait(15)


def memory_mb(process: subprocess.Popen[bytes]) -> tuple[float, float]:
    """(sum of peak RSS, sum of PSS now) over the process and its children (Vigie's workers), in MB. Forked workers
    and memory-mapped lists share pages, which every RSS counts in full and PSS divides among the sharers."""
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    peak = proportional = 0
    for pid in [str(process.pid), *children]:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for text, pattern in ((status, r"VmHWM:\s+(\d+) kB"), (rollup, r"\nPss:\s+(\d+) kB")):
            match = re.search(pattern, text)
            value = int(match.group(1)) if match else 0
            if pattern.startswith("VmHWM"):
                peak += value
            else:
                proportional += value
    return peak / 1024, proportional / 1024


def dnsperf(port: int, queries: Path, seconds: float, rate: int | None = None) -> Figures:
    command = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-l", str(seconds), *DNSPERF]
    if rate:
        command += ["-Q", str(rate)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60).stdout

    def number(pattern: str) -> float:
        match = re.search(pattern, out)
        if not match:
            raise SystemExit(f"unexpected dnsperf output:\n{out}")
        return float(match.group(1))

    return Figures(number(r"Queries per second:\s+([\d.]+)"), number(r"Average Latency \(s\):\s+([\d.]+)") * 1000,
                   int(number(r"Queries lost:\s+(\d+)")), int(number(r"Queries sent:\s+(\d+)")))


ALIASES = 500


def write_files(workdir: Path, rounds: int = 0) -> tuple[list[str], dict[str, Path]]:
    """The query files: `cached`, `blocked`, `mixed` and `chains`, and `mixed@1`… `mixed@{rounds}` (`chains@…`
    likewise), copies whose never-seen names are their own (the same sequence otherwise)."""
    collection = read_ut1(ARCHIVE)
    blocked = sorted({name for parsed in collection.categories.values() for name in parsed.domains
                      if is_plain_name(name) and "_" not in name})
    rng = random.Random(3)
    allowed = [f"site{i}.example" for i in range(1000)]
    aliased = allowed + [f"a{i}.alias" for i in range(ALIASES)]  # a third of them answered through a chain
    sample = rng.sample(blocked, 1000)
    blocked_queries = [("www." + name if index % 2 else name) for index, name in enumerate(sample)]
    paths = {}
    for label, names in (("cached", allowed), ("blocked", blocked_queries)):
        paths[label] = workdir / f"{label}.txt"
        paths[label].write_text("".join(f"{name} A\n" for name in names))
    for kind, pool in (("mixed", allowed), ("chains", aliased)):
        mix = mixed_queries(rng, pool, blocked_queries)
        for variant in range(rounds + 1):
            label = f"{kind}@{variant}" if variant else kind
            tag = f"{kind}{variant}"  # never seen in any other file either
            paths[label] = workdir / f"{label}.txt"
            paths[label].write_text("".join(f"{name or f'new{index}{tag}.example'} A\n"
                                            for index, name in enumerate(mix)))
    return blocked, paths


def mixed_queries(rng: random.Random, allowed: list[str], blocked: list[str]) -> list[str | None]:
    """80 % repeated allowed names, 15 % blocked, 5 % never seen (None: named by its line and file). Long enough that
    dnsperf does not loop back to the start: the names never seen stay never seen."""
    mix: list[str | None] = []
    for _ in range(1_500_000):
        roll = rng.random()
        if roll < 0.80:
            mix.append(rng.choice(allowed))
        elif roll < 0.95:
            mix.append(rng.choice(blocked))
        else:
            mix.append(None)
    return mix


def alias_zone() -> str:
    """The zone's local data for the `*.alias` names: two CNAME steps to an `*.example` site."""
    return "".join(f'  local-data: "a{i}.alias. 300 IN CNAME e{i}.edge.alias."\n'
                   f'  local-data: "e{i}.edge.alias. 300 IN CNAME site{i}.example."\n' for i in range(ALIASES))


_UNBOUND_SERVER = """server:
  interface: 127.0.0.1@{port}
  do-daemonize: no
  use-syslog: no
  logfile: ""
  username: ""
  chroot: ""
  directory: "{dir}"
  pidfile: ""
  access-control: 127.0.0.0/8 allow
"""
# Answers every `*.example` name (the upstream of the other benchmarks). Here it is the zone behind a recursor: it
# answers each CNAME step alone, and the recursor follows the chain and answers it whole.
UPSTREAM_CONF = _UNBOUND_SERVER + """  num-threads: 1
  module-config: "iterator"
  local-zone: "example." redirect
  local-data: "example. 300 IN A 192.0.2.1"
  local-zone: "alias." static
"""
RECURSOR_CONF = _UNBOUND_SERVER + """  num-threads: 1
  do-not-query-localhost: no
  qname-minimisation: no
  module-config: "iterator"
forward-zone:
  name: "."
  forward-addr: 127.0.0.1@{zone}
"""
UNBOUND_CONF = _UNBOUND_SERVER + """  num-threads: {threads}
  so-reuseport: yes
  do-not-query-localhost: no
  qname-minimisation: no
  module-config: "iterator"
  include: "{dir}/blocked.conf"
forward-zone:
  name: "."
  forward-addr: 127.0.0.1@{upstream}
"""
# dnsperf sends everything from one address: the per-client rate limit (meant for tablets) is off, as unbound's is
# by default.
RULES = """
server:
  dns: {{rate_limit: off}}
lists:
  ut1: {{source: {archive}, format: ut1}}
categories:
  everything: [{categories}]
groups:
  bench: {{networks: [127.0.0.0/8], profile: strict}}
profiles:
  strict: {{block: [everything], safe_search: "off"}}
"""


@contextlib.contextmanager
def worktree(revision: str) -> Iterator[Path]:
    """The code as of `revision`, checked out in a temporary git worktree, removed on the way out."""
    path = Path(tempfile.mkdtemp(prefix="vigie-at-"))
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--force", "--detach", str(path), revision],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], capture_output=True)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


KINDS = ("cached", "blocked", "mixed", "chains")
ROUNDS_OF_THEIR_OWN = ("mixed", "chains")  # every round has never-seen names of its own
PAIRS = (("Vigie 1 worker", "unbound 1 thread"), ("Vigie 2 workers", "unbound 2 threads"))


def main() -> None:
    if not ARCHIVE.exists():
        sys.exit(f"no UT1 snapshot at {ARCHIVE} (set VIGIE_UT1_ARCHIVE): this benchmark loads the real lists")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5, help="per run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per server and file (default 3)")
    parser.add_argument("--steady-seconds", type=float, default=30)
    parser.add_argument("--against", metavar="REV", help="also run Vigie (2 workers) as of this git revision, in "
                        "the same turns: whether a change costs speed, whatever the machine's state")
    arguments = parser.parse_args()
    ensure_tools()
    runs: dict[str, dict[str, list[Figures]]] = {}
    rss: dict[str, tuple[float, float]] = {}
    startup: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="vigie-dns-bench-") as temp, contextlib.ExitStack() as running:
        workdir = Path(temp)
        blocked, files = write_files(workdir, arguments.rounds + 1)
        (workdir / "blocked.conf").write_text("".join(f'local-zone: "{name}." always_nxdomain\n' for name in blocked))
        zone_port, upstream_port = free_port(), free_port()
        (workdir / "zone.conf").write_text(UPSTREAM_CONF.format(port=zone_port, dir=workdir) + alias_zone())
        (workdir / "upstream.conf").write_text(RECURSOR_CONF.format(port=upstream_port, dir=workdir, zone=zone_port))
        for conf, port in (("zone.conf", zone_port), ("upstream.conf", upstream_port)):
            running.enter_context(serving(["unbound", "-d", "-c", str(workdir / conf)], port,
                                          workdir / "upstream.log", workdir))
        categories = ", ".join(f"ut1/{name}" for name in sorted(read_ut1(ARCHIVE).categories))
        (workdir / "rules.yaml").write_text(RULES.format(archive=ARCHIVE, categories=categories))
        # Compile the lists once, as `vigie lists update` or a first start would; the measured starts reuse them.
        subprocess.run([sys.executable, "-m", "vigie", "check", str(workdir / "rules.yaml")], check=True,
                       capture_output=True, cwd=REPO)
        vigie = [sys.executable, "-m", "vigie", "dns", "--rules", str(workdir / "rules.yaml"), "--upstream",
                 f"127.0.0.1:{upstream_port}", "--metrics-listen", "off", "--api-listen", "off"]
        servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        lineup = [("unbound 1 thread", 1, REPO), ("unbound 2 threads", 2, REPO), ("Vigie 1 worker", 1, REPO),
                  ("Vigie 2 workers", 2, REPO)]
        earlier = f"Vigie 2 workers @{arguments.against}"
        if arguments.against:
            lineup.append((earlier, 2, running.enter_context(worktree(arguments.against))))
        for label, threads, code in lineup:
            port = free_port()
            if label.startswith("unbound"):
                config = workdir / f"unbound{threads}.conf"
                config.write_text(UNBOUND_CONF.format(port=port, threads=threads, dir=workdir, upstream=upstream_port))
                command = ["unbound", "-d", "-c", str(config)]
            else:
                command = [*vigie, "--workers", str(threads), "--dns-listen", f"127.0.0.1:{port}"]
            process, startup[label] = running.enter_context(serving(command, port, workdir / "servers.log", code))
            servers[label] = (process, port)
            runs[label] = {kind: [] for kind in KINDS}
        turns = [label for pair in PAIRS for label in pair] + ([earlier] if arguments.against else [])
        for kind in KINDS:
            for _, port in servers.values():
                dnsperf(port, files[kind], 2)  # warm-up: the cache holds what a running server would
            for number in range(1, arguments.rounds + 1):
                queries = files[f"{kind}@{number}"] if kind in ROUNDS_OF_THEIR_OWN else files[kind]
                for label in turns if number % 2 else reversed(turns):  # no server always first
                    runs[label][kind].append(dnsperf(servers[label][1], queries, arguments.seconds))
            print(f"  measured the {kind} file", file=sys.stderr, flush=True)
        steady = dnsperf(servers["Vigie 2 workers"][1], files[f"mixed@{arguments.rounds + 1}"],
                         arguments.steady_seconds, rate=20_000)
        for label, (process, _) in servers.items():
            rss[label] = memory_mb(process)
    print(f"{len(blocked):,} UT1 domains; dnsperf {' '.join(DNSPERF)}; after a 2 s warm-up, {arguments.rounds} "
          f"rounds of {arguments.seconds:g} s per server and file, the servers taking turns\n")
    print("median of the rounds (lost: all rounds)")
    print(f"{'':20}" + "".join(f"{kind + ' qps':>13}{'ms':>7}{'lost':>6}" for kind in KINDS) +
          f"{'peak RSS':>9}{'PSS MB':>8}{'start s':>9}")
    for label, by_kind in runs.items():
        cells = "".join(f"{median([f.qps for f in figures]):>13,.0f}{median([f.latency_ms for f in figures]):>7.2f}"
                        f"{sum(f.lost for f in figures):>6}" for figures in by_kind.values())
        print(f"{label:20}{cells}{rss[label][0]:>9.0f}{rss[label][1]:>8.0f}{startup[label]:>9.2f}")
    print()
    for threads, (vigie_label, unbound_label) in enumerate(PAIRS, start=1):
        cells = []
        for kind in KINDS:
            ratios = [mine.qps / theirs.qps
                      for mine, theirs in zip(runs[vigie_label][kind], runs[unbound_label][kind], strict=True)]
            cells.append(f"{kind} {median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})")
        print(f"Vigie/unbound, {threads} core(s), median (range) of the rounds: {'  '.join(cells)}")
    print("  targets: mixed and chains ≥ 0.85, cached and blocked ≥ 0.6")
    if arguments.against:
        cells = []
        for kind in KINDS:
            ratios = [mine.qps / theirs.qps
                      for mine, theirs in zip(runs["Vigie 2 workers"][kind], runs[earlier][kind], strict=True)]
            cells.append(f"{kind} {median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})")
        print(f"this code / {arguments.against}, 2 workers, median (range) of the rounds: {'  '.join(cells)}")
    vigie_memory, unbound_memory = rss["Vigie 2 workers"], rss["unbound 2 threads"]
    print(f"memory Vigie 2 workers / unbound 2 threads: peak RSS summed {vigie_memory[0] / unbound_memory[0]:.2f}, "
          f"PSS {vigie_memory[1] / unbound_memory[1]:.2f}   (target ≤ 0.5)")
    print(f"Vigie 2 workers at a steady 20,000 qps for {arguments.steady_seconds:g} s (mixed): "
          f"{steady.sent:,} sent, {steady.lost} lost, average latency {steady.latency_ms:.3f} ms   "
          "(target: none lost, ≤ 1 ms)")


if __name__ == "__main__":
    main()
