"""The addon's request hook on mitmproxy's own test flows: block page, safe search, URL rules, fronting, credentials."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from filter_proxy.addon import VigieAddon
from filter_proxy.block_page import preferred_language
from policy.snapshot import Snapshot
from policy.state import EMPTY_STATE, Override, OverrideKind, StateView
from tests.conftest import paris, snapshot_of

RULES = """
timezone: Europe/Paris
lists:
  games: {source: games.txt, format: domains}
  pages: {source: pages.txt, format: urls}
categories:
  games: [games]
  pages: [pages]
  bypass: [vigie/dns-bypass]
always_block: [bypass]
devices:
  unknown: refuse
  inventory: devices.csv
groups:
  school: {networks: [127.0.0.0/8], schedule: week}
  home: {networks: [10.50.0.0/16], profile: maison}
profiles:
  class:
    block: [games, pages]
    deny_urls: [wiki.example/forbidden]
    safe_search: strict
    message: Demande à ton enseignant si tu as besoin de ce site.
  maison:
    safe_search: moderate
    search_portal: www.qwantjunior.com
  nuit: {mode: block-all}
schedules:
  week:
    default: class
    rules:
      - {profile: nuit, time: "20:00-07:00"}
"""
FILES = {"rules.yaml": RULES, "games.txt": "roblox.com\n", "pages.txt": "pages.example/adult-section\n",
         "devices.csv": "name,addresses,group,credential\ntab-17,,home,tab17:s3cret\n"}
CLASS_TIME = paris("2026-11-24 10:00")


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    return snapshot_of(tmp_path_factory.mktemp("proxy"), FILES)


def request(snapshot: Snapshot, url: str, *, peer: str = "127.0.0.1", sni: str | None = None,
            headers: dict[str, str] | None = None, at: object = CLASS_TIME) -> http.HTTPFlow:
    """Run one request through the addon's hook as mitmproxy would, and return the flow."""
    scheme, _, rest = url.partition("://")
    host, _, path = rest.partition("/")
    client = tflow.tclient_conn()
    client.peername = (peer, 50000)
    client.sni = sni
    flow = tflow.tflow(client_conn=client, req=tutils.treq(
        scheme=scheme.encode(), host=host, port=443 if scheme == "https" else 80, authority=b"",
        path=f"/{path}".encode(), headers=http.Headers(Host=host, **(headers or {})), content=b""))
    addon = VigieAddon(lambda: snapshot, lambda: EMPTY_STATE, now=lambda: at)  # type: ignore[arg-type,return-value]

    async def hook() -> None:  # inside a running loop, which taddons then uses (and asyncio.run closes)
        with taddons.context(addon):
            addon.requestheaders(flow)

    asyncio.run(hook())
    return flow


def test_a_blocked_site_gets_the_french_page_with_its_category_and_reason(snapshot: Snapshot) -> None:
    flow = request(snapshot, "http://www.roblox.com/games")
    assert flow.response is not None and flow.response.status_code == 403
    assert flow.response.headers["Cache-Control"] == "no-store"
    page = flow.response.get_text()
    assert "Ce site est bloqué" in page and "www.roblox.com" in page
    assert "Ce site fait partie d'une catégorie bloquée." in page and "games" in page
    assert "Demande à ton enseignant" in page
    # Blocked by every profile, night included: the page promises no time (the next schedule change, 20:00, is
    # the night profile, which blocks it too).
    assert "Accessible de nouveau" not in page
    assert "<link" not in page and "src=" not in page  # nothing to fetch from elsewhere


def test_the_page_says_when_the_site_really_opens(snapshot: Snapshot) -> None:
    flow = request(snapshot, "http://wikipedia.org/", at=paris("2026-11-24 21:30"))  # the night profile
    assert flow.response is not None and flow.response.status_code == 403
    assert "Accessible de nouveau demain à 07:00." in flow.response.get_text()


def test_the_page_speaks_english_when_the_browser_prefers_it(snapshot: Snapshot) -> None:
    flow = request(snapshot, "http://roblox.com/", headers={"Accept-Language": "en-GB,en;q=0.9,fr;q=0.4"})
    assert flow.response is not None and "This site is blocked" in flow.response.get_text()
    assert flow.response.headers["Content-Language"] == "en"


@pytest.mark.parametrize(("header", "language"), [
    (None, "fr"), ("fr-FR,fr;q=0.9,en;q=0.8", "fr"), ("en-US", "en"), ("de-DE,en;q=0.5,fr;q=0.4", "en"),
    ("de", "fr"), ("en;q=bad,fr", "fr"),
])
def test_language_choice(header: str | None, language: str) -> None:
    assert preferred_language(header) == language


def test_at_night_the_page_says_when_it_opens_again(snapshot: Snapshot) -> None:
    flow = request(snapshot, "http://wikipedia.org/", at=paris("2026-11-24 21:00"))
    assert flow.response is not None and flow.response.status_code == 403
    assert "Internet est fermé à cette heure-ci." in flow.response.get_text()
    assert "demain à 07:00" in flow.response.get_text()


@pytest.mark.parametrize(("url", "expected"), [
    ("https://www.google.com/search?q=chat&safe=off", ("safe", "active")),
    ("https://www.google.fr/search?q=chat", ("safe", "active")),
    ("https://www.bing.com/search?q=chat&adlt=off", ("adlt", "strict")),
    ("https://duckduckgo.com/?q=chat&kp=-2", ("kp", "1")),
])
def test_search_engines_get_their_safe_search_parameter(snapshot: Snapshot, url: str,
                                                        expected: tuple[str, str]) -> None:
    flow = request(snapshot, url, sni=url.split("/")[2])
    assert flow.response is None
    assert flow.request.query[expected[0]] == expected[1] and flow.request.query["q"] == "chat"


def test_youtube_gets_the_restrict_header(snapshot: Snapshot) -> None:
    flow = request(snapshot, "https://www.youtube.com/watch?v=x", sni="www.youtube.com")
    assert flow.response is None and flow.request.headers["YouTube-Restrict"] == "Strict"


def test_the_home_profile_sends_searches_to_the_portal(snapshot: Snapshot) -> None:
    flow = request(snapshot, "https://www.bing.com/search?q=dinosaures%20volants", peer="10.50.0.9",
                   sni="www.bing.com")
    assert flow.response is not None and flow.response.status_code == 302
    assert flow.response.headers["Location"] == "https://www.qwantjunior.com/?q=dinosaures%20volants"
    images = request(snapshot, "https://www.bing.com/images/x", peer="10.50.0.9", sni="www.bing.com")
    assert images.response is None and images.request.query["adlt"] == "moderate"


@pytest.mark.parametrize("url", [
    "https://www.google.com/search/?q=x", "https://www.google.com//search?q=x", "https://www.google.com/SEARCH?q=x",
    "https://www.google.com/%73earch?q=x", "https://www.google.com/webhp?q=x", "https://www.google.com/?q=x",
    "https://www.google.fr/search?q=x", "https://ipv4.google.com/search?q=x", "https://images.google.com/images?q=x",
    "https://html.duckduckgo.com/html/?q=x", "https://lite.duckduckgo.com/lite/?q=x", "https://duckduckgo.com/?q=x",
    "https://cn.bing.com/search?q=x", "https://www.bing.com/images/search?q=x",
])
def test_every_spelling_of_a_search_goes_to_the_portal(snapshot: Snapshot, url: str) -> None:
    flow = request(snapshot, url, peer="10.50.0.9", sni=url.split("/")[2])
    assert flow.response is not None and flow.response.status_code == 302, url
    assert flow.response.headers["Location"] == "https://www.qwantjunior.com/?q=x"


@pytest.mark.parametrize(("url", "blocked"), [
    ("https://pages.example/adult-section/page1", True),
    ("https://sub.pages.example/adult-section", True),
    ("https://pages.example/other", False),
    ("https://wiki.example/forbidden/x", True),
    ("https://m.wiki.example/forbidden/x", True),  # a URL rule covers the host's subdomains, as domain rules do
    ("https://notwiki.example/forbidden/x", False),
    ("https://wiki.example/allowed", False),
])
def test_url_lists_and_path_rules(snapshot: Snapshot, url: str, blocked: bool) -> None:
    flow = request(snapshot, url, sni=url.split("/")[2])
    assert (flow.response is not None and flow.response.status_code == 403) is blocked


def test_a_host_that_differs_from_the_tls_name_is_refused(snapshot: Snapshot) -> None:
    flow = request(snapshot, "https://wikipedia.org/", sni="www.google.com")
    assert flow.response is not None and flow.response.status_code == 421
    assert "Le nom demandé ne correspond pas à la connexion ouverte." in flow.response.get_text()


def test_a_blocked_host_behind_an_allowed_tls_name_gets_its_block_page(snapshot: Snapshot) -> None:
    flow = request(snapshot, "https://roblox.com/", sni="www.google.com")
    assert flow.response is not None and flow.response.status_code == 403 and "roblox.com" in flow.response.text


def test_a_blocked_tls_name_under_an_allowed_host_gets_its_block_page(snapshot: Snapshot) -> None:
    flow = request(snapshot, "https://wikipedia.org/", sni="roblox.com")
    assert flow.response is not None and flow.response.status_code == 403 and "roblox.com" in flow.response.text


def credentials(user: str, password: str) -> dict[str, str]:
    return {"Proxy-Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_proxy_credentials_identify_a_device_and_are_not_forwarded(snapshot: Snapshot) -> None:
    flow = request(snapshot, "https://www.bing.com/images/x", peer="192.0.2.7", sni="www.bing.com",
                   headers=credentials("tab17", "s3cret"))
    assert flow.response is None and flow.request.query["adlt"] == "moderate"  # the home profile
    assert "Proxy-Authorization" not in flow.request.headers


@pytest.mark.parametrize("headers", [credentials("tab17", "wrong"), credentials("nobody", "x"),
                                     {"Proxy-Authorization": "Basic !!!"}, {}])
def test_unknown_clients_are_asked_for_credentials(snapshot: Snapshot, headers: dict[str, str]) -> None:
    flow = request(snapshot, "http://wikipedia.org/", peer="192.0.2.7", headers=headers)
    assert flow.response is not None and flow.response.status_code == 407
    assert flow.response.headers["Proxy-Authenticate"] == 'Basic realm="Vigie"'


def test_an_unknown_client_without_credentials_configured_is_refused(tmp_path: Path) -> None:
    files = {**FILES, "rules.yaml": RULES.replace("  inventory: devices.csv\n", "")}
    flow = request(snapshot_of(tmp_path, files), "http://wikipedia.org/", peer="192.0.2.7")
    assert flow.response is not None and flow.response.status_code == 403


def test_a_reload_that_moves_a_network_applies_to_open_connections(tmp_path: Path) -> None:
    from policy.snapshot import ListCache
    from tests.conftest import write_tree
    from vigie.loading import load_snapshot

    rules = write_tree(tmp_path, FILES)
    snapshots = [load_snapshot(rules, ListCache()).snapshot]
    addon = VigieAddon(lambda: snapshots[-1], lambda: EMPTY_STATE, now=lambda: CLASS_TIME)
    client = tflow.tclient_conn()
    client.peername = ("127.0.0.1", 50000)

    def roblox() -> int:
        flow = tflow.tflow(client_conn=client, req=tutils.treq(
            scheme=b"http", host="roblox.com", port=80, authority=b"", path=b"/",
            headers=http.Headers(Host="roblox.com"), content=b""))

        async def hook() -> None:
            with taddons.context(addon):
                addon.requestheaders(flow)

        asyncio.run(hook())
        return flow.response.status_code if flow.response else 200

    assert roblox() == 403  # the school group blocks games
    rules.write_text(RULES.replace("school: {networks: [127.0.0.0/8]", "school: {networks: [10.40.0.0/16]")
                     .replace("home: {networks: [10.50.0.0/16]", "home: {networks: [127.0.0.0/8]"))
    snapshots.append(load_snapshot(rules, ListCache(), generation=2).snapshot)
    assert roblox() == 200  # same connection, now the home group, which does not block games


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(host=st.text(max_size=70), path=st.binary(max_size=160), accept=st.text(max_size=40))
@example(host="roblox.com.", path=b"/%2e%2e/%00", accept="")
@example(host="[::1]", path=b"//\\..\\x", accept="*;q=x")
def test_any_host_path_and_language_get_a_decision_never_an_exception(snapshot: Snapshot, host: str, path: bytes,
                                                                        accept: str) -> None:
    client = tflow.tclient_conn()
    client.peername = ("127.0.0.1", 50000)
    headers = http.Headers([(b"Host", host.encode("utf-8", "surrogatepass")),
                            (b"Accept-Language", accept.encode("utf-8", "surrogatepass"))])
    flow = tflow.tflow(client_conn=client, req=tutils.treq(host="allowed.example", port=80, authority=b"",
                                                           path=b"/" + path, headers=headers, content=b""))
    addon = VigieAddon(lambda: snapshot, lambda: EMPTY_STATE, now=lambda: CLASS_TIME)

    async def hook() -> None:
        with taddons.context(addon):
            addon.requestheaders(flow)

    asyncio.run(hook())
    assert flow.response is None or flow.response.status_code in (200, 400, 403, 421)


def test_a_kept_host_decision_follows_the_state_and_the_clock(snapshot: Snapshot) -> None:
    """The addon keeps host decisions (a page opens many tunnels to one host): a teacher's block in a new state
    view applies to the next tunnel, and a decision ends at its `until` (the class profile at 20:00, night)."""
    views = [EMPTY_STATE]
    clock = [CLASS_TIME]
    addon = VigieAddon(lambda: snapshot, lambda: views[0], now=lambda: clock[0])

    def passes() -> bool:
        return addon.tunnel_passes_through("127.0.0.1", "allowed.example", 443, snapshot)

    assert passes() and passes()
    views[0] = StateView(overrides=(Override("o1", OverrideKind.BLOCK, "school", None, "allowed.example",
                                             paris("2026-11-24 12:00"), "Mme Martin"),), version=1)
    assert not passes()
    views[0] = EMPTY_STATE
    assert passes()
    clock[0] = paris("2026-11-24 20:30")
    assert not passes()
