"""Vigie's proxy (1 and N workers) against e2guardian on the same box, in one run.

    .venv/bin/python benchmarks/proxy_vs_e2guardian.py [--seconds 4] [--rounds 3] [--concurrency 20]

e2guardian 5.3 (Debian's, installed with apt-get when missing, run from a copy of its configuration with the same
UT1 categories as Vigie's profile as its banned-site list) and `vigie proxy` with 1 worker and with one per core.
The same nginx origin on loopback (HTTP and HTTPS, addressed by IP: e2guardian resolves names itself, and the
origin has none), the same `hey -x`. Paths: plain HTTP with keep-alive, a CONNECT tunnel with keep-alive, a new
CONNECT per request, and a blocked host answered with the block page (no origin). The servers take turns, the order
reversed every round; a ratio is the median of per-round ratios. Printed: req/s, p99 latency, and the resident
memory of each proxy's processes at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.proxy_overhead import nginx_origin, start_proxy  # noqa: E402
from tests.conftest import UT1_ARCHIVE, free_port  # noqa: E402

CATEGORIES = ("adult", "mixed_adult", "games", "social_networks", "chat", "gambling")
BLOCKED_HOST = "www.roblox.com"  # in UT1's games: blocked by both
RULES = f"""
lists:
  ut1: {{source: {UT1_ARCHIVE}, format: ut1}}
categories:
  blocked: [{", ".join(f"ut1/{c}" for c in CATEGORIES)}]
server:
  proxy:
    internal_hosts: [127.0.0.1]  # the origin (nginx) is on loopback
    connect_ports: [443, 1025-65535]
groups:
  bench: {{networks: [127.0.0.0/8], profile: class}}
profiles:
  class: {{block: [blocked], block_ip_literals: false}}  # the origin is addressed by IP
"""


def ensure_tools() -> None:
    needed = (("nginx", "nginx-light"), ("hey", "hey"), ("e2guardian", "e2guardian"))
    missing = [package for tool, package in needed if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists()]
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def ut1_domains(categories: tuple[str, ...]) -> list[str]:
    names: set[str] = set()
    with tarfile.open(UT1_ARCHIVE) as archive:
        for member in archive:
            parts = member.name.split("/")
            if member.isfile() and parts[-1] == "domains" and parts[-2] in categories:
                extracted = archive.extractfile(member)
                assert extracted is not None
                names.update(line.strip().lower() for line in extracted.read().decode("utf-8", "replace").splitlines()
                             if line.strip() and not line.startswith("#"))
    return sorted(names)


def e2guardian_config(workdir: Path, port: int, domains: list[str]) -> Path:
    """A copy of Debian's configuration, on 127.0.0.1:port, in the foreground, no access log (Vigie keeps none),
    the UT1 domains as its banned sites."""
    config = workdir / "e2guardian"
    shutil.copytree("/etc/e2guardian", config)
    for path in config.rglob("*"):
        if path.is_file() and path.suffix in (".conf", ".story"):
            path.write_text(path.read_text(errors="replace").replace("/etc/e2guardian", str(config)))
    main = config / "e2guardian.conf"
    text = main.read_text()
    for key, value in (("filterip", "127.0.0.1"), ("filterports", str(port)), ("nodaemon", "on"),
                       ("nologger", "on"), ("logconnectionhandlingerrors", "off")):
        text, count = re.subn(rf"^{key}\s*=.*$", f"{key} = {value}", text, flags=re.MULTILINE)
        if not count:
            text += f"\n{key} = {value}\n"
    text = re.sub(r"^transparenthttpsport\s*=.*$", "", text, flags=re.MULTILINE)  # it would listen on 0.0.0.0
    text += f"\npidfilename = '{workdir}/e2guardian.pid'\ndaemonuser = 'root'\ndaemongroup = 'root'\n"
    main.write_text(text)
    (config / "lists" / "bannedsitelist").write_text("\n".join(domains) + "\n")
    return main


def hey(proxy_port: int, url: str, options: tuple[str, ...], seconds: float, concurrency: int,
        status: str) -> tuple[float, float]:
    """(req/s, p99 seconds); every answer must have `status`."""
    output = subprocess.run(["hey", "-z", f"{seconds}s", "-c", str(concurrency), *options,
                             "-x", f"http://127.0.0.1:{proxy_port}", url],
                            capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    statuses = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", output))
    if set(statuses) != {status}:
        raise SystemExit(f"{url} on port {proxy_port}: answers {statuses}, expected only {status}\n{output}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p99 = re.search(r"99%% in ([\d.]+) secs", output.replace("%", "%%"))
    assert rate and p99, output
    return float(rate.group(1)), float(p99.group(1))


def check_block_pages(ports: dict[str, int], url: str) -> None:
    """Each proxy answers the blocked host with its block page, not the origin's "ok"."""
    for name, port in ports.items():
        page = subprocess.run(["curl", "-s", "--max-time", "10", "-x", f"http://127.0.0.1:{port}", url],
                              capture_output=True, text=True).stdout
        marker = "E2 Guardian" if name == "e2guardian" else "Site bloqué"
        if marker not in page:
            raise SystemExit(f"{name} did not answer {url} with its block page: {page[:300]!r}")


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (the workers), MiB."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    total = 0
    for each in pids:
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def main() -> None:
    if not UT1_ARCHIVE.exists():
        sys.exit(f"no UT1 snapshot at {UT1_ARCHIVE} (set VIGIE_UT1_ARCHIVE): this benchmark loads the real lists")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=20)
    arguments = parser.parse_args()
    ensure_tools()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="vigie-e2g-bench-") as temp, \
            nginx_origin(Path(temp)) as (http_port, https_port, _):
        workdir = Path(temp)
        rules = workdir / "rules.yaml"
        rules.write_text(RULES)
        domains = ut1_domains(CATEGORIES)
        ports = {name: free_port() for name in ("e2guardian", "Vigie 1", f"Vigie {cores}")}
        vigie = [sys.executable, "-m", "vigie", "proxy", "--rules", str(rules), "--metrics-listen", "off",
                 "--api-listen", "off"]
        commands = {
            "e2guardian": ["e2guardian", "-N", "-c", str(e2guardian_config(workdir, ports["e2guardian"], domains))],
            "Vigie 1": [*vigie, "--proxy-listen", f"127.0.0.1:{ports['Vigie 1']}", "--proxy-workers", "1"],
            f"Vigie {cores}": [*vigie, "--proxy-listen", f"127.0.0.1:{ports[f'Vigie {cores}']}",
                               "--proxy-workers", str(cores)],
        }
        paths = [  # label, URL, hey options, the status each proxy answers with
            ("plain HTTP, keep-alive", f"http://127.0.0.1:{http_port}/", (), "200"),
            ("CONNECT tunnel, keep-alive", f"https://127.0.0.1:{https_port}/", (), "200"),
            ("CONNECT, new connection each time", f"https://127.0.0.1:{https_port}/", ("-disable-keepalive",), "200"),
            ("blocked host → block page", f"http://{BLOCKED_HOST}/", (), None),
        ]
        processes: dict[str, subprocess.Popen[bytes]] = {}
        results: dict[str, dict[str, list[tuple[float, float]]]] = {}
        memory: dict[str, float] = {}
        try:
            env = dict(os.environ)
            for name, command in commands.items():  # side by side, idle while the others are measured
                processes[name] = start_proxy(command, ports[name], env, workdir / f"{name}.log")
            time.sleep(2)  # e2guardian reads its lists after it listens
            check_block_pages(ports, f"http://{BLOCKED_HOST}/")
            for label, url, options, status in paths:
                # e2guardian sends its block page with 200, Vigie with 403
                statuses = {name: status or ("200" if name == "e2guardian" else "403") for name in ports}

                for name, port in ports.items():
                    hey(port, url, options, 1, arguments.concurrency, statuses[name])  # warm-up
                results[label] = {name: [] for name in ports}
                order = list(ports)
                for _ in range(arguments.rounds):
                    for name in order:
                        results[label][name].append(max(
                            (hey(ports[name], url, options, arguments.seconds, arguments.concurrency, statuses[name])
                             for _ in range(2)), key=lambda pair: pair[0]))
                    order.reverse()
                print(f"  measured {label}", file=sys.stderr, flush=True)
            memory = {name: rss_mib(process.pid) for name, process in processes.items()}
        finally:
            for process in processes.values():
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()

    def ratio(ours: list[tuple[float, float]], theirs: list[tuple[float, float]]) -> str:
        each = sorted(a[0] / b[0] for a, b in zip(ours, theirs, strict=True))
        return f"{statistics.median(each):.2f} ({each[0]:.2f}–{each[-1]:.2f})"

    many = f"Vigie {cores}"
    print(f"{arguments.rounds} rounds, each the best of two {arguments.seconds:g}-s runs of hey -c "
          f"{arguments.concurrency}; median req/s (p99 ms), ratio = median (range) of per-round ratios to e2guardian; "
          f"{len(domains):,} UT1 domains in each")
    print(f"| path | e2guardian | Vigie, 1 worker | Vigie, {cores} workers | ratio 1 | ratio {cores} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, by_server in results.items():
        cells = [f"{statistics.median(r for r, _ in runs):,.0f} ({statistics.median(p for _, p in runs) * 1000:.0f})"
                 for runs in by_server.values()]
        print(f"| {label} | {' | '.join(cells)} | {ratio(by_server['Vigie 1'], by_server['e2guardian'])} | "
              f"{ratio(by_server[many], by_server['e2guardian'])} |")
    print("| resident memory, MiB | " + " | ".join(f"{memory[name]:,.0f}" for name in ports) + " | | |")


if __name__ == "__main__":
    main()
