"""rules.yaml validation: every problem at once, each at its file:line:col, with a hint of what is right."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from blocklists.errors import VigieError
from policy.errors import ConfigError, Severity
from policy.loader import load_rules, parse_rules
from tests.conftest import REPO, write_tree

BASE = """
timezone: Europe/Paris
lists:
  city: {source: city.txt, format: domains}
categories:
  games: [city]
  bypass: [vigie/dns-bypass]
always_block: [bypass]
groups:
  cm2-a: {networks: [10.20.1.0/24], schedule: school}
  cm2-b: {networks: [10.20.2.0/24], schedule: school}
profiles:
  class: {block: [games]}
  home: {block: [games], screen_time: 90m}
schedules:
  school:
    default: home
    rules:
      - {profile: class, days: [mon-fri], time: "08:30-16:30"}
"""


VPN = ("timezone: Europe/Paris\nvpn: {network: 10.99.0.0/16, address: 10.99.0.1, endpoint: vpn.example:51820, "
       "public_key: l6INoJdgFbmrtqacnGTjPukNKCi4lEpGimzNgArZ0mc=}")


def problems_of(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "city.txt").write_text("roblox.com\n")
    path = write_tree(tmp_path, {"rules.yaml": text})
    try:
        load_rules(path)
    except ConfigError as exc:
        return [str(p) for p in exc.problems if p.severity is Severity.ERROR]
    return []


def test_the_base_rules_are_valid(tmp_path: Path) -> None:
    assert problems_of(tmp_path, BASE) == []


BAD = [
    ("an unknown key names the nearest known one", ("  cm2-a: {networks: [10.20.1.0/24], schedule: school}",
                                                    "  cm2-a: {networks: [10.20.1.0/24], schedul: school}"),
     r"rules.yaml:9:37: groups.cm2-a.schedul: unknown key 'schedul' \(did you mean 'schedule'\?\)"),
    ("a bad CIDR shows an example", ("10.20.2.0/24", "10.20.300.0/24"),
     r"rules.yaml:10:\d+: groups.cm2-b.networks\[0\]: '10.20.300.0/24': not a network \(example: 10.20.1.0/24\)"),
    ("host bits in a network are explained", ("10.20.2.0/24", "10.20.2.7/24"),
     r"groups.cm2-b.networks\[0\]: '10.20.2.7/24': host bits are set"),
    ("overlapping networks between groups are refused", ("10.20.2.0/24", "10.20.0.0/16"),
     r"rules.yaml:10:\d+: groups.cm2-b.networks\[0\]: 10.20.0.0/16 overlaps 10.20.1.0/24 of group 'cm2-a'"),
    ("an impossible time is refused", ("08:30-16:30", "08:30-25:00"),
     r"rules.yaml:18:\d+: schedules.school.rules\[0\].time: '08:30-25:00': impossible time of day"),
    ("an empty time range is refused", ("08:30-16:30", "08:30-08:30"),
     r"an empty range \(for the whole day, write 00:00-24:00\)"),
    ("an unknown day is refused", ("[mon-fri]", "[mon-fry]"), r"not a day \(mon tue wed"),
    ("an unknown category in a profile is refused", ("class: {block: [games]}", "class: {block: [gmaes]}"),
     r"rules.yaml:12:\d+: profiles.class.block\[0\]: unknown category 'gmaes' \(categories: games, bypass\)"),
    ("an unknown profile in a schedule is refused", ("default: home", "default: maison"),
     r"schedules.school.default: unknown profile 'maison'"),
    ("an unknown schedule in a group is refused", ("schedule: school}\n  cm2-b", "schedule: ecole}\n  cm2-b"),
     r"groups.cm2-a.schedule: unknown schedule 'ecole'"),
    ("a list member naming no source is refused", ("games: [city]", "games: [ut1/games]"),
     r"categories.games\[0\]: 'ut1/games' names no list source"),
    ("a missing local list file is refused", ("source: city.txt", "source: missing.txt"),
     r"lists.city.source: .*missing.txt does not exist"),
    ("a key written twice is refused", ("timezone: Europe/Paris", "timezone: Europe/Paris\ntimezone: UTC"),
     r"rules.yaml:2:1: timezone: 'timezone' is written twice"),
    ("an unknown time zone is refused", ("Europe/Paris", "Europe/Pariss"), r"unknown time zone"),
    ("a bad screen-time budget is refused", ("90m", "ninety"), r"profiles.home.screen_time: 'ninety': not a "
                                                                 r"duration \(example: 90m\)"),
    ("a bad mode is refused", ("class: {block: [games]}", "class: {mode: kiosk}"),
     r"profiles.class.mode: 'kiosk' is not one of: filtered, allowlist-only, block-all"),
    ("a bad list size limit is refused", ("timezone: Europe/Paris", "timezone: Europe/Paris\nserver:\n"
                                          "  lists: {max_size: lots}"),
     r"rules.yaml:3:\d+: server.lists.max_size: 'lots': not a size \(example: 512MB\)"),
    ("a reversed address range is explained", ("  cm2-b: {networks: [10.20.2.0/24], schedule: school}",
                                               "  cm2-b: {addresses: [10.30.0.20-10.30.0.10], schedule: school}"),
     r"rules.yaml:10:\d+: groups.cm2-b.addresses\[0\]: '10.30.0.20-10.30.0.10': a range goes from the lower"),
    ("an address range mixing families is refused", ("  cm2-b: {networks: [10.20.2.0/24], schedule: school}",
                                                     "  cm2-b: {addresses: ['10.30.0.1-::5'], schedule: school}"),
     r"groups.cm2-b.addresses\[0\]: .*both IPv4 or both IPv6"),
    ("a huge address range is a network", ("  cm2-b: {networks: [10.20.2.0/24], schedule: school}",
                                           "  cm2-b: {addresses: [10.30.0.0-10.31.0.0], schedule: school}"),
     r"more than 4096 addresses: write a network \(CIDR\)"),
    ("an address in two ranges belongs to one group", ("  cm2-b: {networks: [10.20.2.0/24], schedule: school}",
                                                       "  cm2-b: {addresses: [10.30.0.1-10.30.0.9, 10.30.0.5], "
                                                       "schedule: school}"),
     r"groups.cm2-b.addresses\[1\]: 10.30.0.5 is already a member of group 'cm2-b'"),
    ("a PAC mode is all or selective", ("timezone: Europe/Paris", "timezone: Europe/Paris\nserver:\n"
                                        "  proxy: {pac: some}"),
     r"rules.yaml:3:\d+: server.proxy.pac: 'some' is not one of: all, selective"),
    ("a group's PAC mode is checked too", ("  cm2-a: {networks: [10.20.1.0/24], schedule: school}",
                                           "  cm2-a: {networks: [10.20.1.0/24], schedule: school, pac: direct}"),
     r"rules.yaml:9:\d+: groups.cm2-a.pac: 'direct' is not one of: all, selective"),
    ("proxy workers are a number or auto", ("timezone: Europe/Paris", "timezone: Europe/Paris\nserver:\n"
                                            "  proxy: {workers: many}"),
     r"rules.yaml:3:\d+: server.proxy.workers: 'many': .* \(example: auto\)"),
    ("a DNS cache under 1MB is refused", ("timezone: Europe/Paris", "timezone: Europe/Paris\nserver:\n"
                                          "  dns: {cache_size: 100KB}"),
     r"rules.yaml:3:\d+: server.dns.cache_size: '100KB': less than 1MB \(example: 32MB\)"),
    ("a shrink over 100% is refused", ("timezone: Europe/Paris", "timezone: Europe/Paris\nserver:\n"
                                       "  lists: {max_shrink: 150%}"),
     r"server.lists.max_shrink: '150%': not between 0% and 100% \(example: 50%\)"),
    ("a zero refresh is refused", ("timezone: Europe/Paris", "timezone: Europe/Paris\nserver:\n"
                                   "  lists: {refresh: 0m}"),
     r"server.lists.refresh must be at least 1 minute"),
    ("a VPN key that is not one is refused", ("timezone: Europe/Paris", VPN.replace("l6INo", "l6IN")),
     r"rules.yaml:2:\d+: vpn.public_key: .*not a WireGuard key \(44 characters of base64\)"),
    ("Vigie's tunnel address outside the tunnel is refused", ("timezone: Europe/Paris", VPN.replace(
        "address: 10.99.0.1", "address: 10.98.0.1")), r"vpn.address: 10.98.0.1 is outside vpn.network 10.99.0.0/16"),
    ("Vigie's tunnel address inside a class's range is refused", ("timezone: Europe/Paris", VPN.replace(
        "network: 10.99.0.0/16, address: 10.99.0.1", "network: 10.20.0.0/16, address: 10.20.2.1")),
     r"vpn.address: 10.20.2.1 is inside group 'cm2-b''s network"),
    ("a VPN endpoint without a port is refused", ("timezone: Europe/Paris", VPN.replace(":51820", "")),
     r"vpn.endpoint: 'vpn.example': not host:port"),
    ("a VPN route is vigie or all", ("timezone: Europe/Paris", VPN.replace("}", ", route: some}")),
     r"vpn.route: 'some' is not one of: vigie, all"),
    ("an internal host that is not an address is refused", ("timezone: Europe/Paris", "timezone: Europe/Paris\n"
                                                             "server:\n  proxy: {internal_hosts: [ent.example:443]}"),
     r"rules.yaml:3:\d+: server.proxy.internal_hosts\[0\]: 'ent.example:443': not address\[:port\] or "
     r"network\[:port\] \(example: 10.20.0.5:443\)"),
    ("a port out of range is refused", ("timezone: Europe/Paris", "timezone: Europe/Paris\nserver:\n"
                                        "  proxy: {connect_ports: [443, 70000]}"),
     r"server.proxy.connect_ports\[1\]: '70000': not a port or a range of ports between 1 and 65535"),
    ("a deny network with host bits is refused", ("timezone: Europe/Paris", "timezone: Europe/Paris\nserver:\n"
                                                   "  proxy: {deny_networks: [10.0.0.1/8]}"),
     r"server.proxy.deny_networks\[0\]: '10.0.0.1/8': host bits are set"),
]


@pytest.mark.parametrize(("replace", "expected"), [(r, e) for _, r, e in BAD], ids=[i for i, _, _ in BAD])
def test_a_mistake_is_reported_where_it_is(tmp_path: Path, replace: tuple[str, str], expected: str) -> None:
    assert replace[0] in BASE
    problems = problems_of(tmp_path, BASE.replace(replace[0], replace[1], 1))
    assert any(re.search(expected, p) for p in problems), problems


def test_list_update_settings_are_read(tmp_path: Path) -> None:
    (tmp_path / "city.txt").write_text("roblox.com\n")
    text = BASE.replace("timezone: Europe/Paris", "timezone: Europe/Paris\nserver:\n  lists: {refresh: 6h, "
                        "timeout: 2m, max_size: 20 MiB, max_shrink: 0.2}")
    policy = load_rules(write_tree(tmp_path, {"rules.yaml": text})).rules.server.list_updates
    assert (policy.refresh_seconds, policy.timeout_seconds, policy.max_bytes, policy.max_shrink) == \
        (6 * 3600, 120, 20 * 2**20, 0.2)


def test_what_the_proxy_may_reach_is_read_and_has_squids_defaults(tmp_path: Path) -> None:
    (tmp_path / "city.txt").write_text("roblox.com\n")
    reach = load_rules(write_tree(tmp_path, {"rules.yaml": BASE})).rules.server.proxy_reach
    assert [str(r) for r in reach.connect_ports] == ["443"] and "127.0.0.0/8" in map(str, reach.deny_networks)
    text = BASE.replace("timezone: Europe/Paris", "timezone: Europe/Paris\nserver:\n  proxy:\n"
                        "    internal_hosts: [10.20.0.5:443, 10.30.0.0/24, '[2001:db8::5]:8443']\n"
                        "    connect_ports: [443, 8443-8445]\n    http_ports: [80]")
    reach = load_rules(write_tree(tmp_path, {"rules.yaml": text})).rules.server.proxy_reach
    assert [str(h) for h in reach.internal_hosts] == ["10.20.0.5:443", "10.30.0.0/24", "[2001:db8::5]:8443"]
    assert [str(r) for r in reach.connect_ports] == ["443", "8443-8445"] and [str(r) for r in reach.http_ports] == \
        ["80"]


def test_the_dns_cache_size_is_read_and_has_a_default(tmp_path: Path) -> None:
    (tmp_path / "city.txt").write_text("roblox.com\n")
    sized = BASE.replace("timezone: Europe/Paris", "timezone: Europe/Paris\nserver:\n  dns: {cache_size: 64 MiB}")
    assert load_rules(write_tree(tmp_path, {"rules.yaml": sized})).rules.server.dns.cache_bytes == 64 * 2**20
    assert load_rules(write_tree(tmp_path, {"rules.yaml": BASE})).rules.server.dns.cache_bytes == 32_000_000


def test_every_problem_is_reported_not_only_the_first(tmp_path: Path) -> None:
    text = BASE.replace("10.20.2.0/24", "10.20.300.0/24").replace("[games]}", "[gmaes]}").replace(
        "08:30-16:30", "08:30-25:00")
    assert len(problems_of(tmp_path, text)) == 3


def test_a_yaml_syntax_error_shows_its_line(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, BASE.replace("  class: {block: [games]}", "  class: {block: [games]"))
    assert len(problems) == 1 and re.match(r".*rules.yaml:\d+:\d+: YAML syntax: ", problems[0]), problems


def test_inventory_problems_name_the_csv_line(tmp_path: Path) -> None:
    (tmp_path / "devices.csv").write_text(
        "name;addresses;group\ntab-1;10.99.0.1;cm2-a\ntab-1;10.99.0.2;cm2-b\ntab-2;10.99.0.1;cm2-b\n"
        "tab-3;10.99.0.300;cm2-a\ntab-4;10.99.0.4;cm9\n")
    problems = problems_of(tmp_path, BASE + "devices:\n  inventory: devices.csv\n  unknown: refuse\n")
    joined = "\n".join(problems)
    assert "devices.csv:3:1: device 'tab-1' is already listed at line 2" in joined
    assert "devices.csv:4:1: device 'tab-2': 10.99.0.1 already belongs to device 'tab-1'" in joined
    assert "devices.csv:5:1: device 'tab-3': '10.99.0.300' is not an IP address" in joined
    assert "devices.csv:6:1: device 'tab-4': unknown group 'cm9'" in joined


def repository_rules_with(archive: Path, directory: Path) -> Path:
    """The repository's rules.yaml, devices and city lists, with the UT1 source pointing at `archive`."""
    for name in ("rules.yaml", "devices.csv"):
        shutil.copy(REPO / name, directory / name)
    shutil.copytree(REPO / "lists", directory / "lists")
    rules = (directory / "rules.yaml").read_text()
    (directory / "rules.yaml").write_text(re.sub(r"source: https://\S+", f"source: {archive}", rules))
    return directory / "rules.yaml"


def test_the_repository_rules_are_valid_with_a_ut1_archive(tmp_path: Path, ut1_archive: Path) -> None:
    """Every UT1 category rules.yaml names exists in the official layout; `vigie check` says so."""
    rules = repository_rules_with(ut1_archive, tmp_path)
    from vigie.loading import load_snapshot

    loaded = load_snapshot(rules)
    assert [p for p in loaded.warnings if p.severity is Severity.ERROR] == []
    assert loaded.snapshot.rules.groups["bureaux-de-vote"].profile == "kiosque"
    result = subprocess.run([sys.executable, "-m", "vigie", "check", str(rules)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "tiktok.com" not in result.stderr, result.stderr


def test_the_repository_rules_are_valid_with_the_real_ut1_snapshot(tmp_path: Path, real_ut1_archive: Path) -> None:
    from vigie.loading import load_snapshot

    loaded = load_snapshot(repository_rules_with(real_ut1_archive, tmp_path))
    assert [p for p in loaded.warnings if p.severity is Severity.ERROR] == []
    assert len(loaded.snapshot.lists.domains) > 400_000


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12)
    | st.sampled_from(["10.0.0.0/8", "08:30-16:30", "mon-fri", "games", "class", "90m", "2026-12-19"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["groups", "profiles", "schedules", "networks", "block", "rules", "profile", "time",
                         "default", "mode", "lists", "categories", "source", "format", "days", "x"]),
        inner, max_size=5),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=yaml_values)
@example(document={"groups": None, "profiles": None})
@example(document={"groups": {"a": {"networks": "10.0.0.0/8", "profile": "p"}}, "profiles": {"p": {}}})
@example(document=[1, 2])
def test_any_yaml_gives_rules_or_our_own_error(tmp_path: Path, document: object) -> None:
    text = yaml.safe_dump(document)
    with contextlib.suppress(VigieError):
        parse_rules(text, "rules.yaml", tmp_path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
@example(text="groups: [\n")
@example(text="\x00")
@example(text="a: &x [*x]")
def test_any_text_gives_rules_or_our_own_error(tmp_path: Path, text: str) -> None:
    with contextlib.suppress(VigieError):
        parse_rules(text, "rules.yaml", tmp_path)


def test_time_ranges_whole_day_and_past_midnight() -> None:
    from policy.loader import parse_time_range

    whole_day = parse_time_range("00:00-24:00")
    assert (whole_day.start, whole_day.end, whole_day.crosses_midnight) == (0, 1440, False)
    night = parse_time_range("22:00-02:00")
    assert night.crosses_midnight and str(night) == "22:00-02:00"
    with pytest.raises(ValueError, match="empty range"):
        parse_time_range("08:00-08:00")


def test_an_address_range_lists_every_address_of_a_kiosk(tmp_path: Path) -> None:
    (tmp_path / "city.txt").write_text("roblox.com\n")
    text = BASE.replace("  cm2-b: {networks: [10.20.2.0/24], schedule: school}",
                        "  cm2-b: {addresses: [10.30.0.10-10.30.0.20, '2001:db8::1-2001:db8::3'], schedule: school}")
    loaded = load_rules(write_tree(tmp_path, {"rules.yaml": text})).rules
    addresses = [str(a) for a in loaded.groups["cm2-b"].addresses]
    assert addresses == [f"10.30.0.{n}" for n in range(10, 21)] + ["2001:db8::1", "2001:db8::2", "2001:db8::3"]
