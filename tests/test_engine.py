"""The decision engine as tables: (client, host, local time, state) → decision, one line per precedence rule."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

import pytest

from policy.decision import Action, Decision, Query, Reason
from policy.engine import bits_deciding, decide
from policy.snapshot import Snapshot
from policy.state import EMPTY_STATE, Override, OverrideKind, StateView
from tests.conftest import paris, snapshot_of

CITY = {
    "lists/social.txt": "tiktok.com\ninstagram.com\nfacebook.com\n",
    "lists/games.txt": "roblox.com\nminecraft.net\n203.0.113.66\n",
    "lists/bypass.txt": "nordvpn.com\n",
    "lists/updates.txt": "mesu.apple.com\n",
    "lists/urls.txt": "www.example-blog.fr/adult-section\n",
    "devices.csv": """
        name,addresses,group,credential
        tab-01,10.99.0.10,cm2-a,tab-01:secret
        tab-02,10.99.0.11,cm2-a,
        """,
    "rules.yaml": """
        timezone: Europe/Paris
        lists:
          social: {source: lists/social.txt, format: domains}
          games: {source: lists/games.txt, format: domains}
          bypass: {source: lists/bypass.txt, format: domains}
          updates: {source: lists/updates.txt, format: domains}
          urls: {source: lists/urls.txt, format: urls}
        categories:
          social: [social]
          games: [games]
          adult: [urls]
          bypass: [bypass, vigie/dns-bypass]
          background: [updates]
        always_block: [bypass]
        background: [background]
        holidays:
          - {name: Noël, from: 2026-12-19, to: 2027-01-03}
        devices:
          inventory: devices.csv
          unknown: invites
        groups:
          cm2-a: {networks: [10.20.1.0/24], schedule: elementaire}
          vote: {networks: [10.30.0.0/24], profile: kiosque}
          invites: {profile: invite}
        profiles:
          ecole:
            block: [social, games, adult]
            allow: [classroom.google.com, lumni.fr]
            deny: [google.com, youtube.com]
            allow_urls: [www.youtube.com/edu]
            safe_search: strict
            search_portal: junior.qwant.com
          maison:
            block: [social, adult]
            allow: [lumni.fr]
            safe_search: moderate
            screen_time: 90m
          nuit:
            mode: block-all
            allow: [lumni.fr]
          kiosque:
            mode: allowlist-only
            allow: [elections.interieur.gouv.fr]
          invite:
            block: [social, games]
            block_ip_literals: true
        schedules:
          elementaire:
            default: maison
            rules:
              - {profile: nuit, time: "20:30-07:00"}
              - {profile: ecole, days: [mon, tue, thu, fri], time: "08:20-16:40", holidays: false}
        """,
}

SCHOOL = "10.20.1.17"
TABLET = "10.99.0.10"
MONDAY_CLASS = "2026-11-23 14:05"


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    return snapshot_of(tmp_path_factory.mktemp("city"), CITY)


def in_one_hour(at: str) -> datetime:
    from datetime import timedelta

    return paris(at) + timedelta(hours=1)


@dataclass(frozen=True)
class Case:
    id: str
    client: str
    target: str
    at: str
    action: Action
    reason: Reason
    categories: tuple[str, ...] = ()
    until: str | None = None
    rewrite_to: str | None = None
    state: StateView = field(default=EMPTY_STATE)


LOCKED = StateView(overrides=(Override("o1", OverrideKind.LOCK, "cm2-a", None, None, in_one_hour(MONDAY_CLASS),
                                       "Mme Martin"),))
UNLOCK_ROBLOX = StateView(overrides=(
    Override("o2", OverrideKind.ALLOW, "cm2-a", None, "roblox.com", in_one_hour(MONDAY_CLASS), "M. Durand"),
    Override("o3", OverrideKind.BLOCK, "cm2-a", "tab-01", "roblox.com", in_one_hour(MONDAY_CLASS), "M. Durand"),
))
EXPIRED = StateView(overrides=(
    Override("o4", OverrideKind.ALLOW, "cm2-a", None, "roblox.com", paris("2026-11-23 13:00"), "M. Durand"),))
SPENT = StateView(minutes_used_today={"tab-01": 90})
NEARLY_SPENT = StateView(minutes_used_today={"tab-01": 89})
SPENT_YESTERDAY = StateView(minutes_used_today={"tab-01": 90}, day=date(2026, 11, 22))

CASES = [
    Case("a name on a blocked category list is blocked with its category", SCHOOL, "tiktok.com", MONDAY_CLASS,
         Action.BLOCK, Reason.CATEGORY, ("social",), until="2026-11-23 16:40"),
    Case("a subdomain of a listed domain is blocked too", SCHOOL, "www.m.tiktok.com", MONDAY_CLASS,
         Action.BLOCK, Reason.CATEGORY, ("social",)),
    Case("a name merely ending like a listed one is not", SCHOOL, "nottiktok.com", MONDAY_CLASS,
         Action.ALLOW, Reason.DEFAULT),
    Case("an explicit allow beats the profile's deny of a parent domain", SCHOOL, "classroom.google.com",
         MONDAY_CLASS, Action.ALLOW, Reason.ALLOW_LIST),
    Case("a denied domain is blocked with its subdomains", SCHOOL, "mail.google.com", MONDAY_CLASS,
         Action.BLOCK, Reason.DENY_LIST),
    Case("a URL allow rule is more specific than a domain deny", SCHOOL, "https://www.youtube.com/edu/maths",
         MONDAY_CLASS, Action.ALLOW, Reason.ALLOW_LIST),
    Case("the rest of a denied domain stays denied by URL", SCHOOL, "https://www.youtube.com/watch?v=x",
         MONDAY_CLASS, Action.BLOCK, Reason.DENY_LIST),
    Case("a URL-list entry blocks its path prefix", SCHOOL, "http://www.example-blog.fr/adult-section/page",
         MONDAY_CLASS, Action.BLOCK, Reason.URL_LIST, ("adult",)),
    Case("the same host outside the listed path is allowed", SCHOOL, "http://www.example-blog.fr/recettes",
         MONDAY_CLASS, Action.ALLOW, Reason.DEFAULT),
    Case("the search portal is reachable even when not listed", SCHOOL, "junior.qwant.com", MONDAY_CLASS,
         Action.ALLOW, Reason.ALLOW_LIST),
    Case("DNS-bypass services are always blocked", SCHOOL, "dns.google", MONDAY_CLASS, Action.BLOCK,
         Reason.BYPASS, ("bypass",)),
    Case("a DNS-over-HTTPS resolver reached by address is blocked too, at home", TABLET, "https://1.1.1.1/dns-query",
         "2026-11-23 18:00", Action.BLOCK, Reason.BYPASS, ("bypass",)),
    Case("an address a category list names is blocked like its names", SCHOOL, "http://203.0.113.66/play",
         MONDAY_CLASS, Action.BLOCK, Reason.CATEGORY, ("games",)),
    Case("the Firefox canary is blocked so Firefox keeps using our DNS", TABLET, "use-application-dns.net",
         "2026-11-23 18:00", Action.BLOCK, Reason.BYPASS, ("bypass",)),
    Case("VPN services from a city list are always blocked, at home too", TABLET, "nordvpn.com",
         "2026-11-23 18:00", Action.BLOCK, Reason.BYPASS, ("bypass",)),
    Case("safe search rewrites Google to its enforced endpoint", SCHOOL, "www.google.fr", "2026-11-23 18:00",
         Action.REWRITE, Reason.SAFE_SEARCH, rewrite_to="forcesafesearch.google.com"),
    Case("YouTube at home is restricted at the profile's moderate level", TABLET, "www.youtube.com",
         "2026-11-23 18:00", Action.REWRITE, Reason.SAFE_SEARCH, rewrite_to="restrictmoderate.youtube.com"),
    Case("games are blocked at school", SCHOOL, "roblox.com", MONDAY_CLASS, Action.BLOCK, Reason.CATEGORY,
         ("games",)),
    Case("games are allowed at home where the profile does not block them (until the 90 minutes could be spent)",
         TABLET, "roblox.com", "2026-11-23 18:00", Action.ALLOW, Reason.DEFAULT, until="2026-11-23 19:30"),
    # schedule edges
    Case("the last minute of class is still school", SCHOOL, "roblox.com", "2026-11-23 16:39", Action.BLOCK,
         Reason.CATEGORY, ("games",)),
    Case("the exact end minute of class is home", SCHOOL, "roblox.com", "2026-11-23 16:40", Action.ALLOW,
         Reason.DEFAULT),
    Case("the exact start minute of class is school", SCHOOL, "roblox.com", "2026-11-23 08:20", Action.BLOCK,
         Reason.CATEGORY),
    Case("Wednesday has no class", SCHOOL, "roblox.com", "2026-11-25 10:00", Action.ALLOW, Reason.DEFAULT),
    Case("school holidays have no class", SCHOOL, "roblox.com", "2026-12-21 10:00", Action.ALLOW,
         Reason.DEFAULT),
    Case("the night starts at 20:30", SCHOOL, "wikipedia.org", "2026-11-23 20:30", Action.BLOCK,
         Reason.BLOCK_ALL, until="2026-11-24 07:00"),
    Case("the night runs past midnight", SCHOOL, "wikipedia.org", "2026-11-24 03:00", Action.BLOCK,
         Reason.BLOCK_ALL, until="2026-11-24 07:00"),
    Case("the night ends at 07:00", SCHOOL, "wikipedia.org", "2026-11-24 07:00", Action.ALLOW, Reason.DEFAULT,
         until="2026-11-24 08:20"),
    Case("the night lets explicitly allowed sites through", SCHOOL, "lumni.fr", "2026-11-24 03:00",
         Action.ALLOW, Reason.ALLOW_LIST),
    Case("the night blocks even bypass services by its own mode", SCHOOL, "dns.google", "2026-11-24 03:00",
         Action.BLOCK, Reason.BLOCK_ALL),
    Case("on the spring DST day the night still ends at 07:00 local", SCHOOL, "wikipedia.org",
         "2027-03-28 03:30", Action.BLOCK, Reason.BLOCK_ALL, until="2027-03-28 07:00"),
    Case("on the autumn DST day the night still ends at 07:00 local", SCHOOL, "wikipedia.org",
         "2026-10-25 02:30", Action.BLOCK, Reason.BLOCK_ALL, until="2026-10-25 07:00"),
    # kiosk
    Case("a kiosk reaches its allowlist", "10.30.0.5", "elections.interieur.gouv.fr", MONDAY_CLASS,
         Action.ALLOW, Reason.ALLOW_LIST),
    Case("a kiosk reaches nothing else, even uncategorised", "10.30.0.5", "wikipedia.org", MONDAY_CLASS,
         Action.BLOCK, Reason.KIOSK),
    Case("a kiosk gets no safe-search rewrite but a block", "10.30.0.5", "www.google.fr", MONDAY_CLASS,
         Action.BLOCK, Reason.KIOSK),
    # unknown clients and IP literals
    Case("an unknown client falls into the default group", "192.0.2.1", "roblox.com", MONDAY_CLASS,
         Action.BLOCK, Reason.CATEGORY, ("games",)),
    Case("a profile with block_ip_literals blocks IP destinations", "192.0.2.1", "93.184.216.34", MONDAY_CLASS,
         Action.BLOCK, Reason.IP_LITERAL),
    Case("and IPv6 ones", "192.0.2.1", "2001:db8::7", MONDAY_CLASS, Action.BLOCK, Reason.IP_LITERAL),
    # state: overrides and screen time
    Case("a teacher's lock blocks everything but the allow list", SCHOOL, "wikipedia.org", MONDAY_CLASS,
         Action.BLOCK, Reason.OVERRIDE_LOCK, state=LOCKED),
    Case("a teacher's lock keeps the allow list reachable", SCHOOL, "lumni.fr", MONDAY_CLASS, Action.ALLOW,
         Reason.ALLOW_LIST, state=LOCKED),
    Case("a teacher's unlock beats the category", SCHOOL, "roblox.com", MONDAY_CLASS, Action.ALLOW,
         Reason.OVERRIDE_ALLOW, state=UNLOCK_ROBLOX),
    Case("a device-level override beats the group's", TABLET, "roblox.com", MONDAY_CLASS, Action.BLOCK,
         Reason.OVERRIDE_BLOCK, state=UNLOCK_ROBLOX),
    Case("an expired override has no effect", SCHOOL, "roblox.com", MONDAY_CLASS, Action.BLOCK,
         Reason.CATEGORY, ("games",), state=EXPIRED),
    Case("a spent screen-time budget blocks at home until the night profile starts", TABLET, "wikipedia.org",
         "2026-11-23 18:00", Action.BLOCK, Reason.SCREEN_TIME, until="2026-11-23 20:30", state=SPENT),
    Case("one minute left is still allowed, until the end of the minute", TABLET, "wikipedia.org",
         "2026-11-23 18:00:20", Action.ALLOW, Reason.DEFAULT, until="2026-11-23 18:01", state=NEARLY_SPENT),
    Case("yesterday's minutes do not count today", TABLET, "wikipedia.org", "2026-11-23 18:00", Action.ALLOW,
         Reason.DEFAULT, state=SPENT_YESTERDAY),
    Case("background services stay reachable when screen time is spent", TABLET, "mesu.apple.com",
         "2026-11-23 18:00", Action.ALLOW, Reason.DEFAULT, state=SPENT),
    Case("allowed school services stay reachable when screen time is spent", TABLET, "lumni.fr",
         "2026-11-23 18:00", Action.ALLOW, Reason.ALLOW_LIST, state=SPENT),
    Case("screen time does not apply at school", TABLET, "wikipedia.org", MONDAY_CLASS, Action.ALLOW,
         Reason.DEFAULT, state=SPENT),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decision(case: Case, city: Snapshot) -> None:
    from vigie.cli import parse_target

    host, path, url = parse_target(case.target)
    client = city.identify(case.client)
    decision = decide(Query(client, host, paris(case.at), path, url), city, case.state)
    assert (decision.action, decision.reason) == (case.action, case.reason), decision.explanation
    if case.categories:
        assert decision.categories == case.categories
    if case.until is not None:
        assert decision.until == paris(case.until)
    if case.rewrite_to is not None:
        assert decision.rewrite_to == case.rewrite_to
    assert decision.trail and decision.trail[-1] == decision.explanation


def test_unknown_clients_are_refused_when_rules_say_so(tmp_path: Path) -> None:
    files = dict(CITY)
    files["rules.yaml"] = files["rules.yaml"].replace("unknown: invites", "unknown: refuse")
    snapshot = snapshot_of(tmp_path, files)
    decision = decide(Query(snapshot.identify("192.0.2.1"), "example.com", paris(MONDAY_CLASS)), snapshot,
                      EMPTY_STATE)
    assert decision.action is Action.REFUSE


def test_only_foreground_use_under_a_budget_counts_for_screen_time(city: Snapshot) -> None:
    client = city.identify(TABLET)
    at = paris("2026-11-23 18:00")
    assert decide(Query(client, "wikipedia.org", at), city, EMPTY_STATE).counts_screen_time
    assert not decide(Query(client, "mesu.apple.com", at), city, EMPTY_STATE).counts_screen_time, "background"
    assert not decide(Query(client, "wikipedia.org", paris(MONDAY_CLASS)), city, EMPTY_STATE).counts_screen_time, \
        "the school profile has no budget: class time does not use up the evening's"
    assert not decide(Query(client, "wikipedia.org", at), city, SPENT).counts_screen_time, \
        "knocking at a spent budget is not screen time"


def test_device_identification_beats_the_network(city: Snapshot) -> None:
    client = city.identify(TABLET)
    assert client is not None and (client.group, client.device) == ("cm2-a", "tab-01")
    mapped = city.identify("::ffff:10.99.0.11")
    assert mapped is not None and mapped.device == "tab-02"
    assert city.clients.identify_credential("tab-01", "secret") == client
    assert city.clients.identify_credential("tab-01", "wrong") is None


# Hosts built from the city's listed names and their parents, subdomains and neighbours: names on category lists,
# on allow and deny lists (and under them), the search portal, safe-search hosts, IP literals, names on no list.
LISTED_BASES = ("tiktok.com", "roblox.com", "minecraft.net", "nordvpn.com", "mesu.apple.com", "apple.com",
                "lumni.fr", "classroom.google.com", "google.com", "youtube.com", "junior.qwant.com", "qwant.com",
                "bing.com", "duckduckgo.com", "www.example-blog.fr", "elections.interieur.gouv.fr", "gouv.fr",
                "wikipedia.org", "example.org", "dns.google")
HOSTS = (*(f"{prefix}{base}" for prefix in ("", "www.", "m.", "a.b.") for base in LISTED_BASES),
         "203.0.113.66", "10.1.2.3", "2001:db8::7")
ASKED_AT = ("2026-11-23 14:05", "2026-11-23 18:00", "2026-11-23 23:00", "2026-11-25 10:00", "2026-12-22 10:00")
CLIENTS = (SCHOOL, TABLET, "10.99.0.11", "10.30.0.5", "192.0.2.1")
STATES = (EMPTY_STATE, SPENT, NEARLY_SPENT, LOCKED, UNLOCK_ROBLOX, EXPIRED)


@pytest.mark.parametrize("state", STATES, ids=["none", "spent", "nearly spent", "locked", "unlock", "expired"])
def test_hosts_with_the_same_deciding_bits_get_the_same_decision(city: Snapshot, state: StateView) -> None:
    """What lets the DNS front keep one verdict per list bits instead of one per name: for every client and time,
    the hosts `bits_deciding` gives the same bits get the same decision from `decide`, but for its wording."""
    shared = 0
    for address, at in itertools.product(CLIENTS, ASKED_AT):
        client = city.identify(address)
        assert client is not None
        by_bits: dict[int, tuple[str, Decision]] = {}
        for host in HOSTS:
            bits = bits_deciding(host, client, city, state)
            if bits is None:
                continue
            decision = decide(Query(client, host, paris(at)), city, state)._replace(explanation="", trail=())
            first = by_bits.setdefault(bits, (host, decision))
            assert decision == first[1], (address, at, first[0], host)
            shared += first[0] != host
    assert shared > 100, "the table must give hosts that share their bits"


@pytest.mark.parametrize(("host", "why"), [
    ("lumni.fr", "on an allow list"), ("www.lumni.fr", "under an allow-list entry"),
    ("mail.google.com", "under a deny-list entry"), ("junior.qwant.com", "the search portal"),
    ("www.bing.com", "a safe-search host"), ("203.0.113.66", "an IPv4 literal"), ("2001:db8::7", "an IPv6 literal"),
    ("elections.interieur.gouv.fr", "on the kiosk's allow list, which other profiles do not have"),
])
def test_names_that_more_than_their_bits_decide_are_decided_one_by_one(city: Snapshot, host: str, why: str) -> None:
    client = city.identify(SCHOOL)
    assert client is not None
    assert bits_deciding(host, client, city, EMPTY_STATE) is None, why


def test_while_an_override_concerns_a_group_its_names_are_decided_one_by_one(city: Snapshot) -> None:
    school, guest = city.identify(SCHOOL), city.identify("192.0.2.1")
    assert school is not None and guest is not None
    assert bits_deciding("wikipedia.org", school, city, UNLOCK_ROBLOX) is None, "roblox.com's override is cm2-a's"
    assert bits_deciding("wikipedia.org", guest, city, UNLOCK_ROBLOX) == 0, "another group's override"
    assert bits_deciding("www.tiktok.com", school, city, EMPTY_STATE) == bits_deciding("tiktok.com", school, city,
                                                                                       EMPTY_STATE) != 0
