"""`vigie devices enroll|list|show|revoke` as an admin runs them: real processes, the real `wg` and `zbarimg`, and
a running resolver that recognises an enrolled tablet without a restart."""

from __future__ import annotations

import configparser
import json
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, write_tree
from tests.dns_servers import UpstreamServer, VigieProcess, dig
from tests.test_state_end_to_end import wait_until
from vigie.wireguard import generate_keypair, public_key_of

SERVER_KEY = "l6INoJdgFbmrtqacnGTjPukNKCi4lEpGimzNgArZ0mc="
RULES = f"""
    vpn:
      network: 127.99.0.0/16
      address: 127.99.0.1
      endpoint: vpn.ville.example:51820
      public_key: {SERVER_KEY}
      route: vigie
    lists:
      games: {{source: games.txt, format: domains}}
    categories:
      games: [games]
    devices:
      inventory: devices.csv
      unknown: refuse
    groups:
      cm2-a:
        networks: [127.20.3.0/24, 127.99.1.128/29]
        profile: maison
      cp-a:
        networks: [127.99.1.0/30]
        profile: maison
      personnel:
        networks: [127.40.0.0/24]
        profile: maison
    profiles:
      maison: {{block: [games], screen_time: 2h}}
    """
# An MDM export as Excel writes it: a byte-order mark, `;`, columns in its own order, a device already there.
INVENTORY = "\ufeffgroup;name;addresses;credential\ncm2-a;tab-cm2a-01;127.99.1.129;\ncp-a;tab-cpa-01;127.20.9.9;\n"


def vigie(rules: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vigie", *args, "--rules", str(rules)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def check(rules: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vigie", "check", str(rules)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    (tmp_path / "devices.csv").write_bytes(INVENTORY.encode())
    return path


def wireguard(config: str) -> configparser.ConfigParser:
    parsed = configparser.ConfigParser()
    parsed.optionxform = str  # type: ignore[assignment,method-assign]
    parsed.read_string(config)
    return parsed


def test_enrolment_gives_the_next_free_address_a_working_configuration_and_an_inventory_row(rules: Path) -> None:
    before = (rules.parent / "devices.csv").read_bytes()
    result = vigie(rules, "devices", "enroll", "tab-cm2a-07", "--group", "cm2-a", "--by", "m.durand")
    assert result.returncode == 0, result.stderr
    # 127.99.1.129 belongs to tab-cm2a-01: the next host of cm2-a's VPN range is .130.
    assert "VPN address 127.99.1.130" in result.stdout

    client_file = rules.parent / "var" / "wireguard" / "clients" / "tab-cm2a-07.conf"
    assert stat.S_IMODE(client_file.stat().st_mode) == 0o600, "it holds the tablet's private key"
    assert stat.S_IMODE(client_file.parent.parent.stat().st_mode) == 0o700
    config = wireguard(client_file.read_text())
    assert config["Interface"]["Address"] == "127.99.1.130/32"
    assert config["Interface"]["DNS"] == "127.99.0.1"
    assert config["Peer"]["PublicKey"] == SERVER_KEY
    assert config["Peer"]["Endpoint"] == "vpn.ville.example:51820"
    assert config["Peer"]["AllowedIPs"] == "127.99.0.1/32", "route: vigie sends only Vigie's address"

    # The server side: the peer's public key is the one of the private key the tablet got (checked by `wg`).
    registry = json.loads((rules.parent / "var" / "wireguard" / "peers.json").read_text())
    derived = subprocess.run(["wg", "pubkey"], input=config["Interface"]["PrivateKey"], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert registry["tab-cm2a-07"]["public_key"] == derived
    assert registry["tab-cm2a-07"]["by"] == "m.durand"
    server_peers = (rules.parent / "var" / "wireguard" / "peers.conf").read_text()
    assert f"PublicKey = {derived}\nAllowedIPs = 127.99.1.130/32" in server_peers
    assert f"wg set wg0 peer {derived} allowed-ips 127.99.1.130/32" in result.stdout

    # The inventory keeps its bytes, separator and column order, with one row more; the rules still load.
    after = (rules.parent / "devices.csv").read_bytes()
    assert after == before + b"cm2-a;tab-cm2a-07;127.99.1.130;\n"
    assert check(rules).returncode == 0, check(rules).stderr

    listed = json.loads(vigie(rules, "devices", "list", "--json").stdout)
    assert {line["name"]: line["vpn_address"] for line in listed} == {
        "tab-cm2a-01": None, "tab-cpa-01": None, "tab-cm2a-07": "127.99.1.130"}
    shown = vigie(rules, "devices", "show", "tab-cm2a-07")
    assert shown.stdout == client_file.read_text()


def test_a_device_already_in_the_inventory_gets_the_vpn_address_beside_its_school_one(rules: Path) -> None:
    result = vigie(rules, "devices", "enroll", "tab-cpa-01", "--group", "cp-a")
    assert result.returncode == 0, result.stderr
    assert "cp-a;tab-cpa-01;127.20.9.9 127.99.1.1;" in (rules.parent / "devices.csv").read_text()
    revoked = vigie(rules, "devices", "revoke", "tab-cpa-01")
    assert revoked.returncode == 0, revoked.stderr
    assert "cp-a;tab-cpa-01;127.20.9.9;" in (rules.parent / "devices.csv").read_text(), "the MDM's row stays"


def test_revoking_frees_the_address_and_removes_every_trace(rules: Path) -> None:
    assert vigie(rules, "devices", "enroll", "tab-cm2a-07", "--group", "cm2-a").returncode == 0
    result = vigie(rules, "devices", "revoke", "tab-cm2a-07")
    assert result.returncode == 0, result.stderr
    assert "wg set wg0 peer " in result.stdout and result.stdout.rstrip().endswith(" remove")
    assert (rules.parent / "devices.csv").read_bytes() == INVENTORY.encode()
    assert not (rules.parent / "var" / "wireguard" / "clients" / "tab-cm2a-07.conf").exists()
    assert json.loads((rules.parent / "var" / "wireguard" / "peers.json").read_text()) == {}
    assert "[Peer]" not in (rules.parent / "var" / "wireguard" / "peers.conf").read_text()
    again = vigie(rules, "devices", "enroll", "tab-cm2a-08", "--group", "cm2-a")
    assert "VPN address 127.99.1.130" in again.stdout, "the freed address is the next free one again"


def test_the_qr_code_holds_the_configuration(rules: Path, tmp_path: Path) -> None:
    assert shutil.which("zbarimg"), "zbarimg is needed (make test installs Debian's zbar-tools)"
    png = tmp_path / "tab.png"
    result = vigie(rules, "devices", "enroll", "tab-cm2a-07", "--group", "cm2-a", "--qr", "--png", str(png))
    assert result.returncode == 0, result.stderr
    assert "█" in result.stdout or "▀" in result.stdout, "a QR code drawn in the terminal"
    assert stat.S_IMODE(png.stat().st_mode) == 0o600
    decoded = subprocess.run(["zbarimg", "--raw", "-q", str(png)], capture_output=True, text=True, timeout=30)
    client_file = rules.parent / "var" / "wireguard" / "clients" / "tab-cm2a-07.conf"
    assert decoded.stdout.rstrip("\n") == client_file.read_text().rstrip("\n")


@pytest.mark.parametrize(("args", "message"), [
    (("x-1", "--group", "cm2-b"), "no group 'cm2-b' in the rules (did you mean 'cm2-a'?)"),
    (("x-1", "--group", "personnel"), "group 'personnel' has no network inside vpn.network 127.99.0.0/16"),
    (("../../etc/passwd", "--group", "cm2-a"), "is not a device name"),
    (("tab-cpa-01", "--group", "cm2-a"), "'tab-cpa-01' is in group 'cp-a'"),
], ids=["unknown group", "group without a VPN range", "a name that is a path", "device of another group"])
def test_enrolments_that_cannot_be_done_say_why_and_change_nothing(rules: Path, args: tuple[str, ...],
                                                                    message: str) -> None:
    result = vigie(rules, "devices", "enroll", *args)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert (rules.parent / "devices.csv").read_bytes() == INVENTORY.encode()
    assert not (rules.parent / "var" / "wireguard" / "peers.json").exists()


def test_a_full_range_and_a_second_enrolment_are_refused(rules: Path) -> None:
    # cp-a's VPN range 127.99.1.0/30 has two hosts.
    for name in ("tab-cpa-02", "tab-cpa-03"):
        assert vigie(rules, "devices", "enroll", name, "--group", "cp-a").returncode == 0
    full = vigie(rules, "devices", "enroll", "tab-cpa-04", "--group", "cp-a")
    assert full.returncode == 1 and "no free VPN address left in 127.99.1.0/30 (4 addresses)" in full.stderr
    twice = vigie(rules, "devices", "enroll", "tab-cpa-02", "--group", "cp-a")
    assert twice.returncode == 1 and "already enrolled (127.99.1.1" in twice.stderr
    assert vigie(rules, "devices", "revoke", "tab-cpa-09").stderr.strip().endswith("shows who is)")


def test_without_a_vpn_section_the_command_says_what_to_add(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": "    lists:" + RULES.split("    lists:", 1)[1],
                                  "games.txt": "roblox.com\n"})
    (tmp_path / "devices.csv").write_text("name,addresses,group\n")
    result = vigie(rules, "devices", "enroll", "tab-1", "--group", "cm2-a")
    assert result.returncode == 1 and "has no `vpn:` section" in result.stderr


def test_admins_enrolling_at_once_never_get_the_same_address(rules: Path) -> None:
    names = [f"tab-cm2a-{n:02d}" for n in range(10, 15)]
    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda name: vigie(rules, "devices", "enroll", name, "--group", "cm2-a"), names))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    registry = json.loads((rules.parent / "var" / "wireguard" / "peers.json").read_text())
    assert sorted(peer["address"] for peer in registry.values()) == [f"127.99.1.{n}" for n in range(130, 135)]
    assert check(rules).returncode == 0, check(rules).stderr
    rows = (rules.parent / "devices.csv").read_text().splitlines()
    assert sorted(row.split(";")[1] for row in rows[3:]) == names


def test_keys_from_cryptography_are_the_ones_wg_would_make(monkeypatch: pytest.MonkeyPatch) -> None:
    assert shutil.which("wg"), "wg is needed (make test installs Debian's wireguard-tools)"
    with_wg = generate_keypair()
    assert public_key_of(with_wg.private) == with_wg.public
    monkeypatch.setenv("PATH", "")  # no `wg`: the cryptography package makes them
    without_wg = generate_keypair()
    monkeypatch.undo()
    assert subprocess.run(["wg", "pubkey"], input=without_wg.private, capture_output=True, text=True,
                          check=True).stdout.strip() == without_wg.public


def test_a_running_resolver_knows_an_enrolled_tablet_within_seconds(rules: Path) -> None:
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port) as dns:
        enrolled = vigie(rules, "devices", "enroll", "tab-cm2a-07", "--group", "cm2-a")
        assert enrolled.returncode == 0, enrolled.stderr

        def counted() -> bool:
            dig(dns.dns_port, "example.org", "-b", "127.99.1.130")
            result = vigie(rules, "usage", "--devices", "--json")
            return any(row["device"] == "tab-cm2a-07" for row in json.loads(result.stdout).get("devices", []))

        # Its screen time counts: the resolver reloaded the inventory and knows the device by its VPN address.
        assert wait_until(counted, 15) is not None, dns.output()
        assert "NXDOMAIN" in dig(dns.dns_port, "roblox.com", "-b", "127.99.1.130")


def test_route_all_sends_every_address_through_the_tunnel(rules: Path) -> None:
    rules.write_text(rules.read_text().replace("route: vigie", "route: all"))
    assert vigie(rules, "devices", "enroll", "tab-cm2a-07", "--group", "cm2-a").returncode == 0
    config = wireguard((rules.parent / "var" / "wireguard" / "clients" / "tab-cm2a-07.conf").read_text())
    assert config["Peer"]["AllowedIPs"] == "0.0.0.0/0, ::/0"
    assert config["Interface"]["DNS"] == "127.99.0.1"
