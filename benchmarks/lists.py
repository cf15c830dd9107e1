"""Blocklist matcher benchmark: build, load, memory, lookups and false positives, as one table.

    .venv/bin/python benchmarks/lists.py [--archive $VIGIE_UT1_ARCHIVE] [--generated 5000000]

Two data sets: every category of the UT1 snapshot, and a generated list of random names (random labels compress
worst in a trie, so this is the pessimistic case). Each measurement of memory or load time runs in a fresh
process, so one does not inherit the other's heap. The baseline is a Python `set` of `str` walked label by label,
measured in the same run.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from blocklists.formats import parse_domains  # noqa: E402
from blocklists.matcher import DomainListing, DomainTable, file_sizes  # noqa: E402
from blocklists.names import parent_domains  # noqa: E402
from blocklists.ut1 import read_ut1  # noqa: E402
from tests.conftest import UT1_ARCHIVE  # noqa: E402

Builder = Callable[[], tuple[DomainTable, list[str]]]
TLDS = ["fr", "com", "net", "org", "de", "info", "xyz", "io", "be", "eu"]
LOOKUPS = 300_000


def generated_names(count: int, seed: int = 7) -> list[str]:
    """Random base32 labels of 5–16 characters under common TLDs; one in five is a subdomain entry."""
    rng = random.Random(seed)
    letters = base64.b32encode(rng.randbytes(count * 12)).decode().lower()
    names, position = [], 0
    for index in range(count):
        length = 5 + (index * 7919) % 12
        label = letters[position:position + length]
        position += length
        if index % 5 == 0:
            label = f"{letters[position:position + 4]}.{label}"
            position += 4
        names.append(f"{label}.{TLDS[index % len(TLDS)]}")
    return names


def queries_for(names: list[str], count: int, seed: int = 11) -> list[str]:
    """Names of 3–5 labels: half under a listed name (a hit after the parent walk), half never listed."""
    rng = random.Random(seed)
    queries = []
    for index in range(count):
        depth = rng.choice(("www.", "cdn.img.", "a.b.c."))
        if index % 2:
            queries.append(depth + rng.choice(names))
        else:
            queries.append(f"{depth}absent{index}.example.{TLDS[index % len(TLDS)]}")
    return queries


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- measurements that run in a fresh process ---------------------------------------------------------------------

def child_table(directory: str, queries_file: str) -> dict[str, float]:
    queries = json.loads(Path(queries_file).read_text())
    before = rss_bytes()
    started = time.perf_counter()
    table = DomainTable.open(Path(directory))
    load_seconds = time.perf_counter() - started
    lookup = table.lookup
    started = time.perf_counter()
    hits = sum(1 for name in queries if lookup(name))
    lookups_per_second = len(queries) / (time.perf_counter() - started)
    after_lookups = rss_bytes()
    return {"load_seconds": load_seconds, "lookups_per_second": lookups_per_second, "hits": hits,
            "rss_after_lookups": after_lookups - before, "entries": len(table)}


def child_set(names_file: str, queries_file: str) -> dict[str, float]:
    queries = json.loads(Path(queries_file).read_text())
    before = rss_bytes()
    with open(names_file) as file:
        names = set(file.read().split())
    added = rss_bytes() - before
    started = time.perf_counter()
    hits = sum(1 for name in queries if any(suffix in names for suffix in parent_domains(name)))
    return {"rss_added": added, "lookups_per_second": len(queries) / (time.perf_counter() - started),
            "hits": hits}


def in_child(function: str, *args: str) -> dict[str, float]:
    output = subprocess.run([sys.executable, __file__, "--child", function, *args], capture_output=True,
                            text=True, check=True).stdout
    result: dict[str, float] = json.loads(output)
    return result


# -- one data set ---------------------------------------------------------------------------------------------------

def measure(label: str, names_text: Path, build: Builder, workdir: Path) -> dict[str, float]:
    started, cpu_started = time.perf_counter(), time.process_time()
    table, names = build()
    build_seconds, build_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    compiled = workdir / f"compiled-{label}"
    compiled.mkdir()
    table.save(compiled)
    queries = queries_for(names, LOOKUPS)
    queries_file = workdir / f"queries-{label}.json"
    queries_file.write_text(json.dumps(queries))
    expected_hits = sum(1 for i in range(LOOKUPS) if i % 2)
    table_figures = in_child("table", str(compiled), str(queries_file))
    set_figures = in_child("set", str(names_text), str(queries_file))
    # False positives: random names under the same TLDs, each checked against the set for the truth.
    listed = set(names)
    rng = random.Random(5)
    absent = [f"{rng.randbytes(6).hex()}.{TLDS[i % len(TLDS)]}" for i in range(1_000_000)]
    false_positives = sum(1 for name in absent
                          if table.lookup(name) and not any(s in listed for s in parent_domains(name)))
    domains = table_figures["entries"]
    return {
        "domains": domains,
        "build_seconds": build_seconds,
        "build_cpu_seconds": build_cpu,
        "disk_bytes_per_domain": file_sizes(compiled) / domains,
        "load_seconds": table_figures["load_seconds"],
        "rss_per_domain": table_figures["rss_after_lookups"] / domains,
        "set_rss_per_domain": set_figures["rss_added"] / domains,
        "lookups_per_second": table_figures["lookups_per_second"],
        "set_lookups_per_second": set_figures["lookups_per_second"],
        "wrong_hits": abs(table_figures["hits"] - expected_hits) + abs(set_figures["hits"] - expected_hits),
        "false_positives": false_positives,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def build_ut1(archive: Path, names_text: Path) -> Builder:
    def build() -> tuple[DomainTable, list[str]]:
        collection = read_ut1(archive)
        bits = {category: 1 << index for index, category in enumerate(sorted(collection.categories))}
        table = DomainTable.build(DomainListing(parsed.domains, bits[category])
                                  for category, parsed in collection.categories.items())
        names = sorted({name for parsed in collection.categories.values() for name in parsed.domains})
        names_text.write_text("\n".join(names))
        return table, names
    return build


def build_text(names_text: Path) -> Builder:
    def build() -> tuple[DomainTable, list[str]]:
        with open(names_text, encoding="utf-8") as file:
            parsed = parse_domains(str(names_text), file)
        return DomainTable.build([DomainListing(parsed.domains, 1)]), parsed.domains
    return build


ROWS = [
    # (label, key, format, target text)
    ("domains in the table", "domains", "{:,.0f}", ""),
    ("build from text (s, wall)", "build_seconds", "{:.1f}", "≤ 20 for 5 M"),
    ("build from text (s, CPU)", "build_cpu_seconds", "{:.1f}", ""),
    ("compiled size = RSS bound (B/domain)", "disk_bytes_per_domain", "{:.1f}", "≤ 16"),
    ("load compiled form, mmap (s)", "load_seconds", "{:.4f}", "≤ 1"),
    ("RSS added after lookups (B/domain)", "rss_per_domain", "{:.1f}", "≤ 16"),
    ("RSS added, set of str (B/domain)", "set_rss_per_domain", "{:.1f}", "baseline"),
    ("  ratio table / set", "rss_ratio", "{:.3f}", ""),
    ("lookups/s, table (3-5 labels)", "lookups_per_second", "{:,.0f}", "≥ 500,000"),
    ("lookups/s, set walk", "set_lookups_per_second", "{:,.0f}", "baseline"),
    ("  ratio table / set", "lookup_ratio", "{:.2f}", ""),
    ("wrong answers (of 300k, both)", "wrong_hits", "{:.0f}", "0"),
    ("false positives (of 1 M random)", "false_positives", "{:.0f}", "0 (exact keys)"),
    ("peak RSS of the build process (MB)", "peak_rss_mb", "{:,.0f}", ""),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=UT1_ARCHIVE)
    parser.add_argument("--generated", type=int, default=5_000_000, help="size of the generated list")
    arguments = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="vigie-bench-") as temp:
        workdir = Path(temp)
        ut1_names = workdir / "ut1-names.txt"
        results["UT1 snapshot"] = measure("ut1", ut1_names, build_ut1(arguments.archive, ut1_names), workdir)
        generated = workdir / "generated.txt"
        generated.write_text("\n".join(generated_names(arguments.generated)) + "\n")
        results[f"generated {arguments.generated:,}"] = measure("generated", generated, build_text(generated),
                                                                 workdir)
    for figures in results.values():
        figures["rss_ratio"] = figures["rss_per_domain"] / figures["set_rss_per_domain"]
        figures["lookup_ratio"] = figures["lookups_per_second"] / figures["set_lookups_per_second"]
    columns = list(results)
    print(f"{'':38} " + " ".join(f"{c:>20}" for c in columns) + f" {'target':>16}")
    for label, key, number_format, target in ROWS:
        cells = " ".join(f"{number_format.format(results[c][key]):>20}" for c in columns)
        print(f"{label:38} {cells} {target:>16}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps({"table": child_table, "set": child_set}[sys.argv[2]](*sys.argv[3:])))
    else:
        main()
