"""The compact domain table against the obvious set-based answer, and its compiled form on disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from blocklists.compiled import CompiledStore, compiled_key
from blocklists.errors import ListError
from blocklists.formats import UrlEntry
from blocklists.matcher import DomainListing, DomainTable, MaskedKeys, UrlMatcher
from blocklists.names import parent_domains
from policy.snapshot import ListCache
from tests.conftest import REPO, write_tree
from tests.test_loader import BASE
from vigie.loading import load_snapshot

LABELS = st.sampled_from(["a", "b", "ab", "example", "fr", "com", "www", "x-y", "0"])
NAMES = st.lists(LABELS, min_size=1, max_size=4).map(".".join)
LISTINGS = st.lists(st.tuples(st.lists(NAMES, max_size=12), st.integers(0, 5), st.booleans()), max_size=6)


def reference_lookup(listings: list[tuple[list[str], int, bool]], name: str) -> int:
    """What a list user expects: a listed name covers itself and its subdomains; exceptions remove their bit."""
    block = exception = 0
    for names, bit_index, is_exception in listings:
        if set(parent_domains(name)) & set(names):
            if is_exception:
                exception |= 1 << bit_index
            else:
                block |= 1 << bit_index
    return block & ~exception


@given(LISTINGS, st.lists(NAMES, min_size=1, max_size=10))
@example([(["example.com"], 0, False)], ["www.example.com", "myexample.com", "com", "example.com.fr"])
@example([(["example.com"], 0, False), (["www.example.com"], 0, True), (["example.com"], 1, False)],
         ["www.example.com", "a.www.example.com", "example.com"])
@settings(max_examples=300, deadline=None)
def test_the_table_answers_like_a_walk_over_a_set(listings: list[tuple[list[str], int, bool]],
                                                   queries: list[str]) -> None:
    table = DomainTable.build(DomainListing(names, 1 << bit, exception) for names, bit, exception in listings)
    for name in queries:
        assert table.lookup(name) == reference_lookup(listings, name), name


def test_a_saved_table_maps_back_with_the_same_answers(tmp_path: Path) -> None:
    names = [f"site{i}.example{i % 7}.fr" for i in range(5000)]
    table = DomainTable.build([DomainListing(names, 1), DomainListing(names[::3], 2),
                               DomainListing(["example3.fr"], 4), DomainListing([names[3]], 2, exception=True)])
    table.save(tmp_path)
    mapped = DomainTable.open(tmp_path)
    assert len(mapped) == len(table) == 5001
    for name in [*names[:50], "www.site3.example3.fr", "example3.fr", "nothing.fr", "site0.example0.fr.evil"]:
        assert mapped.lookup(name) == table.lookup(name), name
    assert mapped.lookup("www.site3.example3.fr") == 1 | 4  # bit 2 is excepted below site3.example3.fr
    assert mapped.lookup("site6.example6.fr") == 1 | 2


# Paths keep undecodable bytes as lone surrogates (see normalize_path).
SEGMENTS = st.sampled_from(["a", "b", "ab", "x y", "%20", "", "é", "\udc80", "\udcc3"])
PATHS = st.lists(SEGMENTS, max_size=3).map(lambda parts: "/" + "/".join(parts))
URL_ENTRIES = st.lists(st.tuples(NAMES, PATHS, st.integers(0, 5)), max_size=12)


@given(URL_ENTRIES, st.lists(st.tuples(NAMES, PATHS), min_size=1, max_size=10))
@example([("example.com", "/a", 0), ("example.com", "/a", 1), ("www.example.com", "/", 2)],
         [("www.example.com", "/ab"), ("example.com", "/b"), ("myexample.com", "/a"), ("example.com.fr", "/a")])
@settings(max_examples=200, deadline=None)
def test_url_lists_answer_like_a_walk_over_their_entries(tmp_path_factory: pytest.TempPathFactory,
                                                         entries: list[tuple[str, str, int]],
                                                         requests: list[tuple[str, str]]) -> None:
    built = UrlMatcher.build((UrlEntry(host, path), 1 << bit) for host, path, bit in entries)
    directory = tmp_path_factory.mktemp("urls")
    built.save(directory)
    for matcher in (built, UrlMatcher.open(directory)):
        for host, path in requests:
            expected = 0
            for entry_host, entry_path, bit in entries:
                if entry_host in parent_domains(host) and path.startswith(entry_path):
                    expected |= 1 << bit
            assert matcher.lookup(host, path) == expected, (host, path)
            assert matcher.has_host(host) == any(h in parent_domains(host) for h, _, _ in entries)
        assert sorted((e.host, e.path_prefix) for e, _ in matcher.entries()) == sorted({(h, p) for h, p, _ in entries})


def test_addresses_map_back_with_their_masks(tmp_path: Path) -> None:
    addresses = MaskedKeys.build([("192.0.2.1", 1), ("2001:db8::1", 2), ("192.0.2.1", 4)])
    addresses.save(tmp_path, "addresses")
    mapped = MaskedKeys.open(tmp_path, "addresses")
    assert (mapped.get("192.0.2.1"), mapped.get("2001:db8::1"), mapped.get("192.0.2.2")) == (5, 2, 0)
    assert dict(mapped.items()) == {"192.0.2.1": 5, "2001:db8::1": 2} and len(mapped) == 2
    (tmp_path / "addresses.bin").write_bytes((tmp_path / "addresses.bin").read_bytes()[:-2])
    with pytest.raises(ListError, match="truncated"):
        MaskedKeys.open(tmp_path, "addresses")


def test_a_truncated_compiled_table_is_refused_not_misread(tmp_path: Path) -> None:
    DomainTable.build([DomainListing(["a.fr", "b.fr"], 1)]).save(tmp_path)
    combinations = tmp_path / "combinations.bin"
    combinations.write_bytes(combinations.read_bytes()[:-1])
    with pytest.raises(ListError, match="truncated"):
        DomainTable.open(tmp_path)


def test_a_restart_maps_the_compiled_lists_instead_of_parsing(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": BASE, "city.txt": "roblox.com\n"})
    first = load_snapshot(rules, ListCache()).snapshot.lists
    assert first.mapped_from is not None and first.mapped_from.parent == tmp_path / "var" / "compiled"
    # A new cache, as in a restarted or another process: same files, same compiled directory.
    again = load_snapshot(rules, ListCache()).snapshot.lists
    assert again.mapped_from == first.mapped_from
    assert again.lookup_domain("www.roblox.com") == first.lookup_domain("www.roblox.com") != 0
    # The same content under a new mtime is still the same lists; new content is compiled anew.
    city = tmp_path / "city.txt"
    os.utime(city, ns=(city.stat().st_atime_ns, city.stat().st_mtime_ns + 10**9))
    assert load_snapshot(rules, ListCache()).snapshot.lists.mapped_from == first.mapped_from
    city.write_text("roblox.com\nminecraft.net\n")
    changed = load_snapshot(rules, ListCache()).snapshot.lists
    assert changed.mapped_from != first.mapped_from and changed.lookup_domain("minecraft.net")


def test_another_process_reads_the_same_compiled_lists(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": BASE, "city.txt": "roblox.com\n"})
    mapped = load_snapshot(rules, ListCache()).snapshot.lists.mapped_from
    script = ("import sys, pathlib; from policy.snapshot import ListCache; from vigie.loading import load_snapshot; "
              "lists = load_snapshot(pathlib.Path(sys.argv[1]), ListCache()).snapshot.lists; "
              "print(lists.mapped_from, lists.lookup_domain('a.roblox.com') != 0)")
    out = subprocess.run([sys.executable, "-c", script, str(rules)], capture_output=True, text=True, cwd=REPO,
                         check=True, timeout=60).stdout.split()
    assert out == [str(mapped), "True"]


def test_only_the_most_recently_used_compiled_lists_are_kept(tmp_path: Path) -> None:
    store = CompiledStore(tmp_path)
    lists = load_snapshot(write_tree(tmp_path, {"rules.yaml": BASE, "city.txt": "roblox.com\n"}),
                          ListCache()).snapshot.lists
    keys = [compiled_key([f"ref{i}"], {}) for i in range(6)]
    for index, key in enumerate(keys[:5]):
        store.save(key, lists)
        os.utime(store.directory / key, (index, index))
    assert sorted(p.name for p in store.directory.iterdir()) == sorted(keys[2:5])
    assert store.open(keys[2]) is not None  # used now: kept over keys[3], the least recently used
    store.save(keys[5], lists)
    assert sorted(p.name for p in store.directory.iterdir()) == sorted([keys[2], keys[4], keys[5]])
