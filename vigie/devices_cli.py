"""`vigie devices enroll|list|revoke|show`: tablets that go home over the city's WireGuard VPN."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from policy.model import Rules
from vigie.devices import DeviceLine, WireguardDirectory, enroll, listing, revoke
from vigie.loading import rules_or_report
from vigie.state_cli import login


def add_devices_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    devices = commands.add_parser("devices", help="enrol tablets in the home VPN, list them, revoke them")
    actions = devices.add_subparsers(required=True, metavar="ACTION")

    enrol = actions.add_parser("enroll", help="give a tablet a VPN address in its group's range and its WireGuard "
                                              "configuration; add it to the inventory")
    enrol.add_argument("name", help="the device's name, as in the MDM (e.g. tab-cm2a-07)")
    enrol.add_argument("--group", required=True, help="its class, e.g. cm2-a")
    enrol.add_argument("--by", default=login(), help=f"who enrols it (default: {login()})")
    _output_options(enrol)
    enrol.set_defaults(handler=run_enroll)

    show = actions.add_parser("show", help="print an enrolled tablet's WireGuard configuration again")
    show.add_argument("name")
    _output_options(show)
    show.set_defaults(handler=run_show)

    listed = actions.add_parser("list", help="the inventory's devices and their VPN enrolment")
    listed.add_argument("--rules", type=Path, default=Path("rules.yaml"))
    listed.add_argument("--json", action="store_true", help="machine-readable output")
    listed.set_defaults(handler=run_list)

    revoked = actions.add_parser("revoke", help="remove a tablet from the VPN (lost, stolen, leaving the school)")
    revoked.add_argument("name")
    revoked.add_argument("--rules", type=Path, default=Path("rules.yaml"))
    revoked.set_defaults(handler=run_revoke)


def _output_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--rules", type=Path, default=Path("rules.yaml"))
    command.add_argument("--qr", action="store_true", help="also print the configuration as a QR code (scan it "
                                                          "with the WireGuard app)")
    command.add_argument("--png", type=Path, metavar="FILE", help="also write the QR code as a PNG image")


def run_enroll(args: argparse.Namespace) -> int:
    rules = rules_or_report(args.rules)
    if rules is None:
        return 1
    enrolment = enroll(rules, args.name, args.group, args.by, datetime.now(UTC))
    peer = enrolment.peer
    vpn = rules.vpn
    assert vpn is not None  # enroll() refused otherwise
    print(f"{peer.name}: enrolled in {peer.group} with VPN address {peer.address}; "
          f"{'added to' if peer.added_to_inventory else 'address added in'} {rules.inventory}")
    print(f"tablet configuration: {enrolment.client_file} (its private key: install it, then keep it safe)")
    print("apply to the running WireGuard server now (the server reads peers.conf at its next start by itself):")
    print(f"  wg set {vpn.interface} peer {peer.public_key} allowed-ips {peer.address}/"
          f"{32 if ':' not in peer.address else 128}")
    _output(enrolment.client_config, args)
    return 0


def run_show(args: argparse.Namespace) -> int:
    rules = rules_or_report(args.rules)
    if rules is None:
        return 1
    path = WireguardDirectory(rules.server.data_dir).client_file(args.name)
    try:
        config = path.read_text()
    except OSError:
        print(f"vigie: no configuration for {args.name!r} in {path.parent} (`vigie devices list` shows who is "
              "enrolled; revoke and enrol again to make a new one)", file=sys.stderr)
        return 1
    print(config, end="")
    _output(config, args)
    return 0


def _output(config: str, args: argparse.Namespace) -> None:
    if not (args.qr or args.png):
        return
    import segno  # only for this: every `vigie` process loads this module with the CLI

    code = segno.make(config, error="l", micro=False)
    if args.qr:
        code.terminal(out=sys.stdout, compact=True)
    if args.png:
        code.save(str(args.png), kind="png", scale=6, border=4)
        args.png.chmod(0o600)
        print(f"QR code: {args.png} (it holds the private key)")


def run_list(args: argparse.Namespace) -> int:
    rules = rules_or_report(args.rules)
    if rules is None:
        return 1
    lines = listing(rules)
    if args.json:
        print(json.dumps([vars(line) for line in lines], ensure_ascii=False))
        return 0
    _print_table(rules, lines)
    return 0


def _print_table(rules: Rules, lines: list[DeviceLine]) -> None:
    print(f"{'device':<24} {'group':<16} {'VPN address':<16} {'enrolled':<26} addresses")
    for line in lines:
        note = "" if line.in_inventory else f"  (not in {rules.inventory}: revoke it, or add it back)"
        print(f"{line.name:<24} {line.group:<16} {line.vpn_address or '-':<16} {line.enrolled_at or '-':<26} "
              f"{' '.join(line.addresses) or '-'}{note}")
    enrolled = sum(1 for line in lines if line.vpn_address)
    print(f"{len(lines)} device(s), {enrolled} enrolled in the VPN")


def run_revoke(args: argparse.Namespace) -> int:
    rules = rules_or_report(args.rules)
    if rules is None:
        return 1
    peer = revoke(rules, args.name)
    interface = rules.vpn.interface if rules.vpn else "wg0"
    print(f"{peer.name}: revoked; {peer.address} is free again and the running services forget it at their next "
          "reload (within seconds)")
    print("remove it from the running WireGuard server now:")
    print(f"  wg set {interface} peer {peer.public_key} remove")
    return 0
