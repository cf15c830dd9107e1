"""Snapshot builds: a rules-only edit reuses the compiled lists; a list edit recompiles them."""

from __future__ import annotations

import os
from pathlib import Path

from policy.snapshot import ListCache
from tests.conftest import write_tree
from tests.test_loader import BASE
from vigie.loading import load_snapshot


def test_a_rules_only_edit_reuses_the_lists_and_a_list_edit_reloads_them(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": BASE, "city.txt": "roblox.com\n"})
    cache = ListCache()
    first = load_snapshot(rules, cache).snapshot
    rules.write_text(rules.read_text().replace("screen_time: 90m", "screen_time: 2h"))
    second = load_snapshot(rules, cache, generation=2).snapshot
    assert second.rules.profiles["home"].screen_time_minutes == 120
    assert second.lists is first.lists
    city = tmp_path / "city.txt"
    city.write_text("roblox.com\nminecraft.net\n")
    os.utime(city, ns=(city.stat().st_atime_ns, city.stat().st_mtime_ns + 1_000_000_000))
    third = load_snapshot(rules, cache, generation=3).snapshot
    assert third.lists is not first.lists
    assert third.lists.lookup_domain("minecraft.net") and not first.lists.lookup_domain("minecraft.net")
