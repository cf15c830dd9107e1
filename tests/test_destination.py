"""Where the proxy may connect, judged on the address it reaches: a table of (address, port) → refused or not."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from policy.clients import Client
from policy.decision import Action, Reason
from policy.destination import decide_destination, port_allowed
from policy.snapshot import Snapshot
from tests.conftest import paris, snapshot_of

RULES = """
timezone: Europe/Paris
lists:
  games: {source: games.txt, format: domains}
categories:
  games: [games]
  bypass: [vigie/dns-bypass]
always_block: [bypass]
server:
  proxy:
    internal_hosts: [10.20.0.5:443, 10.30.0.0/24]
groups:
  school: {networks: [10.20.1.0/24], profile: class}
profiles:
  class: {block: [games]}
"""
CLIENT = Client("school", None, "network 10.20.1.0/24")
OWN = frozenset({ipaddress.ip_address("203.0.113.7")})
AT = paris("2026-11-24 10:00")


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    return snapshot_of(tmp_path_factory.mktemp("destination"),
                       {"rules.yaml": RULES, "games.txt": "roblox.com\n198.51.100.9\n"})


@pytest.mark.parametrize(("address", "port", "refused_by"), [
    ("93.184.216.34", 443, None),
    ("127.0.0.1", 443, "server.proxy.deny_networks"),
    ("127.8.9.10", 6379, "server.proxy.deny_networks"),
    ("::1", 9180, "server.proxy.deny_networks"),
    ("::ffff:127.0.0.1", 6379, "server.proxy.deny_networks"),
    ("0.0.0.0", 80, "server.proxy.deny_networks"),
    ("169.254.169.254", 80, "server.proxy.deny_networks"),
    ("192.168.1.1", 80, "server.proxy.deny_networks"),
    ("fe80::1", 443, "server.proxy.deny_networks"),
    ("203.0.113.7", 6379, "server.proxy.deny_networks"),  # the server's own public address
    ("10.20.0.5", 443, None),  # an internal host, on its port
    ("10.20.0.5", 22, "server.proxy.deny_networks"),  # ... not on another
    ("10.30.0.77", 8080, None),  # an internal network, every port
    ("1.1.1.1", 443, "destination address"),  # a DoH resolver's address, whatever name led there
    ("198.51.100.9", 80, "destination address"),  # an address a blocked category lists
])
def test_an_address_is_reached_only_when_nothing_forbids_it(snapshot: Snapshot, address: str, port: int,
                                                           refused_by: str | None) -> None:
    decision = decide_destination(CLIENT, ipaddress.ip_address(address), port, AT, snapshot, OWN)
    if refused_by is None:
        assert decision is None
    else:
        assert decision is not None and (decision.action, decision.reason, decision.rule) == \
            (Action.BLOCK, Reason.DESTINATION, refused_by), decision


@pytest.mark.parametrize(("port", "allowed"), [(443, True), (8443, False), (22, False), (6379, False)])
def test_connect_ports_follow_squids_ssl_ports(snapshot: Snapshot, port: int, allowed: bool) -> None:
    reach = snapshot.rules.server.proxy_reach
    assert port_allowed(port, reach.connect_ports, reach) is allowed


def test_an_internal_hosts_port_is_allowed_for_connect(tmp_path: Path) -> None:
    snapshot = snapshot_of(tmp_path, {"rules.yaml": RULES.replace("10.20.0.5:443", "10.20.0.5:8443"),
                                      "games.txt": "roblox.com\n"})
    reach = snapshot.rules.server.proxy_reach
    assert port_allowed(8443, reach.connect_ports, reach)
