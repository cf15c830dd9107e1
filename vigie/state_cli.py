"""`vigie override allow|block|lock|list|clear` and `vigie usage`: the teachers' levers and the screen-time report.

They talk to the state store named by `server.state` directly; running services see a change within 2 seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from policy.model import Rules
from policy.state import Override, OverrideKind
from policy.state_store import StateStore, open_store, override_to_json
from vigie.loading import rules_or_report
from vigie.overrides import (
    OverrideRequest,
    UsageReport,
    budgets_now,
    make_override,
    report_to_json,
    usage_report,
)


def add_state_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    override = commands.add_parser("override", help="allow or block a domain, or lock a class, for a while")
    actions = override.add_subparsers(required=True, metavar="ACTION")
    for kind, help_text in ((OverrideKind.ALLOW, "allow a domain (and its subdomains) for a group or a device"),
                            (OverrideKind.BLOCK, "block a domain (and its subdomains) for a group or a device"),
                            (OverrideKind.LOCK, "block everything but the profile's allow list")):
        command = actions.add_parser(kind.value, help=help_text)
        command.add_argument("--group", help="the group, e.g. cm2-a")
        command.add_argument("--device", help="one device of the inventory instead of the whole group")
        if kind is not OverrideKind.LOCK:
            command.add_argument("--domain", required=True, help="e.g. youtube.com")
        command.add_argument("--for", dest="duration", required=True, metavar="DURATION",
                             help="how long: 45m, 2h, 1h30 (at most 7 days)")
        command.add_argument("--note", required=True, help="why, shown with the override (e.g. \"exposé CM2\")")
        command.add_argument("--by", default=login(), help=f"who asks (default: {login()})")
        _common(command)
        command.set_defaults(handler=run_override_add, kind=kind)
    listing = actions.add_parser("list", help="the overrides in force")
    _common(listing)
    listing.set_defaults(handler=run_override_list)
    clear = actions.add_parser("clear", help="end an override now")
    clear.add_argument("id", help="as shown by `vigie override list`, e.g. o-3f9a2c")
    _common(clear)
    clear.set_defaults(handler=run_override_clear)

    usage = commands.add_parser("usage", help="screen time used today (or another day), per group")
    usage.add_argument("--day", type=date.fromisoformat, help="YYYY-MM-DD in the rules' time zone (default: today)")
    usage.add_argument("--devices", action="store_true",
                       help="also each device's minutes (an admin's question about one tablet; not kept anywhere)")
    _common(usage)
    usage.set_defaults(handler=run_usage)


def _common(command: argparse.ArgumentParser) -> None:
    command.add_argument("--rules", type=Path, default=Path("rules.yaml"))
    command.add_argument("--json", action="store_true", help="machine-readable output")


def login() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


@contextlib.contextmanager
def _store_of(rules: Rules) -> Iterator[StateStore]:
    store = open_store(rules.server.state)
    try:
        yield store
    finally:
        store.close()


def run_override_add(args: argparse.Namespace) -> int:
    rules = rules_or_report(args.rules)
    if rules is None:
        return 1
    request = OverrideRequest(args.kind, args.group, args.device, getattr(args, "domain", None), args.duration,
                              args.note, args.by)
    override = make_override(request, rules, datetime.now(UTC))
    with _store_of(rules) as store:
        store.add_override(override)
    if args.json:
        print(json.dumps(override_to_json(override), ensure_ascii=False))
    else:
        print(f"{override.id}: {describe(override, ZoneInfo(rules.timezone))}; running services apply it within "
              "2 seconds")
    return 0


def describe(override: Override, zone: ZoneInfo) -> str:
    until = override.expires_at.astimezone(zone)
    return f"{override.describe()} until {until:%Y-%m-%d %H:%M}, by {override.author}: {override.note}"


def run_override_list(args: argparse.Namespace) -> int:
    rules = rules_or_report(args.rules)
    if rules is None:
        return 1
    with _store_of(rules) as store:
        overrides = store.overrides(datetime.now(UTC))
    if args.json:
        print(json.dumps([override_to_json(o) for o in overrides], ensure_ascii=False))
    elif not overrides:
        print("no override in force")
    for override in overrides if not args.json else ():
        print(f"{override.id}  {describe(override, ZoneInfo(rules.timezone))}")
    return 0


def run_override_clear(args: argparse.Namespace) -> int:
    rules = rules_or_report(args.rules)
    if rules is None:
        return 1
    with _store_of(rules) as store:
        cleared = store.clear_override(args.id)
    if args.json:
        print(json.dumps(override_to_json(cleared), ensure_ascii=False))
    else:
        print(f"{cleared.id} cleared ({cleared.describe()}); running services apply it within 2 seconds")
    return 0


def run_usage(args: argparse.Namespace) -> int:
    rules = rules_or_report(args.rules)
    if rules is None:
        return 1
    now = datetime.now(UTC)
    day = args.day or now.astimezone(ZoneInfo(rules.timezone)).date()
    with _store_of(rules) as store:
        minutes = store.usage(day)
    report = usage_report(rules, minutes, day, budgets_now(rules, now), with_devices=args.devices)
    print(json.dumps(report_to_json(report)) if args.json else format_report(report))
    return 0


def format_report(report: UsageReport) -> str:
    lines = [f"screen time on {report.day:%Y-%m-%d} (active minutes: a minute counts once whatever the tablet did)",
             f"{'group':<22} {'devices':>7} {'active':>6} {'minutes':>8} {'average':>7} {'most':>5} "
             f"{'budget now':>10} {'spent':>5}"]
    for group in report.groups:
        average = f"{group.total_minutes / group.active:.0f}" if group.active else "-"
        budget = f"{group.budget_now} min" if group.budget_now is not None else "none"
        lines.append(f"{group.group:<22} {group.devices:>7} {group.active:>6} {group.total_minutes:>8} "
                     f"{average:>7} {group.most_minutes:>5} {budget:>10} {group.spent:>5}")
    if report.devices:
        lines += ["", f"{'group':<22} {'device':<24} {'minutes':>7}"]
        lines += [f"{group:<22} {device:<24} {minutes:>7}" for group, device, minutes in report.devices]
    return "\n".join(lines)

