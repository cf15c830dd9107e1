"""The `vigie` command line: check, explain, run, dns, proxy, lists, override, usage, devices. It wires the layers
and holds no filtering logic."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from dnslib import QTYPE, RCODE, DNSError, DNSRecord

from blocklists.errors import NameRejected, VigieError
from blocklists.names import normalize_domain, normalize_host, normalize_path
from policy.clients import Client
from policy.decision import Action, Query
from policy.destination import listed_address
from policy.engine import OPENING_HORIZON, decide, next_allowed
from policy.errors import ConfigError, ConfigProblem, Severity
from policy.model import SocketAddress
from policy.snapshot import Snapshot
from policy.state import EMPTY_STATE, StateView
from policy.state_store import StoreUnavailable, open_store
from vigie.loading import load_snapshot
from vigie.teachers import load_teachers

DEFAULT_RULES = Path("rules.yaml")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        result: int = args.handler(args)
        sys.stdout.flush()  # here, where a reader that has gone (`| head`) is caught below, not at exit
        return result
    except VigieError as exc:
        print(f"vigie: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `vigie explain ... | head`: the reader has gone; what it took is all it wanted. Python would print a
        # traceback when it flushes stdout at exit, so stdout is pointed at nothing first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command a pipe closed on


_CONTROL_CHARACTERS = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)} | {0x2028: "\\u2028",
                                                                                  0x2029: "\\u2029"}
_OUR_PACKAGES = ("vigie", "policy", "dns_resolver", "filter_proxy", "blocklists")


class EscapeControlCharacters(logging.Filter):
    """Host names, SNI and paths come from children's devices: a newline in one must not forge a log line. Our own
    messages keep their layout (a refused reload lists its problems line by line) and have their string arguments
    escaped; other libraries' messages (mitmproxy's, which put hosts in the text) are escaped whole."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] in _OUR_PACKAGES:
            if isinstance(record.args, tuple):
                record.args = tuple(arg.translate(_CONTROL_CHARACTERS) if isinstance(arg, str) else arg
                                    for arg in record.args)
        else:
            record.msg, record.args = record.getMessage().translate(_CONTROL_CHARACTERS), None
        return True


def configure_logging(level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(EscapeControlCharacters())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vigie", description="DNS + HTTP(S) filtering for school tablets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    check = commands.add_parser("check", help="validate rules.yaml, the inventory and local lists")
    check.add_argument("rules", nargs="?", type=Path, default=None)
    # `--rules` as every other command takes it, so an admin's habit works here too.
    check.add_argument("--rules", dest="rules_option", type=Path, metavar="RULES")
    check.set_defaults(handler=run_check)

    explain = commands.add_parser("explain", help="show what Vigie decides for a client, a name or URL, a time")
    explain.add_argument("target", help="a domain (tiktok.com) or a URL (https://www.youtube.com/shorts/x)")
    explain.add_argument("--client", required=True, help="the client's address (e.g. 10.20.1.17)")
    explain.add_argument("--at", help="local time in the rules' time zone, e.g. 2026-11-23T14:05 (default: now)")
    explain.add_argument("--rules", type=Path, default=DEFAULT_RULES)
    explain.add_argument("--no-state", action="store_true",
                         help="ignore overrides and screen time (the rules alone)")
    explain.add_argument("--resolve", action="store_true",
                         help="also ask the upstream resolver and judge the answer's chain (aliases, addresses) as "
                              "the DNS front does")
    explain.add_argument("--upstream", help="address:port to ask with --resolve (default: server.dns.upstreams)")
    explain.set_defaults(handler=run_explain)

    from vigie.devices_cli import add_devices_commands
    from vigie.lists_cli import add_lists_commands
    from vigie.runner import add_run_commands
    from vigie.state_cli import add_state_commands
    from vigie.teachers_cli import add_teachers_commands

    add_run_commands(commands)
    add_lists_commands(commands)
    add_state_commands(commands)
    add_devices_commands(commands)
    add_teachers_commands(commands)
    return parser


def print_problems(problems: Sequence[ConfigProblem]) -> None:
    for problem in sorted(problems, key=lambda p: (p.file, p.line, p.column)):
        print(problem, file=sys.stderr)


def run_check(args: argparse.Namespace) -> int:
    if args.rules is not None and args.rules_option is not None and args.rules != args.rules_option:
        raise VigieError(f"two rules files named ({args.rules} and --rules {args.rules_option}): name one")
    args.rules = args.rules or args.rules_option or DEFAULT_RULES
    try:
        loaded = load_snapshot(args.rules)
    except ConfigError as exc:
        print_problems(exc.problems)
        errors, warnings = len(exc.errors), len(exc.problems) - len(exc.errors)
        print(f"{args.rules}: {errors} error(s), {warnings} warning(s); nothing was changed", file=sys.stderr)
        return 1
    print_problems(loaded.warnings)
    teacher = loaded.snapshot.rules.server.teacher
    accounts = Path(teacher.accounts)
    count = None
    if teacher.listen is not None or accounts.exists():  # the teachers' page is on, or its accounts are there
        try:
            count = len(load_teachers(accounts, loaded.snapshot.rules))
        except ConfigError as exc:
            print_problems(exc.problems)
            print(f"{accounts}: {len(exc.errors)} error(s); nothing was changed", file=sys.stderr)
            return 1
    print(summary(loaded.snapshot, sum(p.severity is Severity.WARNING for p in loaded.warnings)))
    if count is not None:
        print(f"teachers' page: {'on ' + str(teacher.listen) if teacher.listen else 'off'}; {count} account(s) "
              f"in {accounts}")
    return 0


def summary(snapshot: Snapshot, warnings: int) -> str:
    rules = snapshot.rules
    lines = [f"{rules.source}: OK ({warnings} warning(s)); time zone {rules.timezone}"]
    members = {name: 0 for name in rules.groups}
    for device in rules.devices:
        members[device.group] += 1
    lines.append(f"groups ({len(rules.groups)}):")
    for group in rules.groups.values():
        how = f"schedule {group.schedule}" if group.schedule else f"profile {group.profile}"
        where = [", ".join(str(n) for n in group.networks)] if group.networks else []
        if group.addresses:
            where.append(f"{len(group.addresses)} address(es)")
        lines.append(f"  {group.name:<20} {how:<24} {'; '.join(where) or 'no network or address'}; "
                     f"{members[group.name]} device(s)")
    lines.append(f"profiles ({len(rules.profiles)}): " + ", ".join(
        f"{p.name} ({p.mode.value})" for p in rules.profiles.values()))
    lines.append(f"categories ({len(rules.categories)}):")
    stats = {s.ref: s for s in snapshot.lists.stats}
    for category in rules.categories.values():
        domains = urls = 0
        for ref in category.members:
            real = snapshot.lists.aliases.get(ref, ref)
            if real in stats:
                domains += stats[real].domains
                urls += stats[real].urls
        lines.append(f"  {category.name:<20} {domains:>9} domains {urls:>7} URLs  ← {', '.join(category.members)}")
    for ref, info in sorted(snapshot.lists.info.items()):
        description = info.descriptions.get("fr") or info.descriptions.get("en")
        if description:
            lines.append(f"    {ref}: {description}")
    lines.append(f"lists: {len(snapshot.lists.domains)} domains, {len(snapshot.lists.urls)} URL prefixes, "
                 f"{len(snapshot.lists.addresses)} addresses, {len(snapshot.lists.expressions)} expressions")
    return "\n".join(lines)


def parse_target(raw: str) -> tuple[str, str | None, str | None]:
    """`tiktok.com` → (host, None, None); a URL → (host, path with query, the URL)."""
    if "://" not in raw and "/" not in raw:
        return normalize_host(raw), None, None
    url = raw if "://" in raw else f"http://{raw}"
    parts = urlsplit(url)
    host = parts.hostname or ""
    path = normalize_path((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    return normalize_host(host), path, url


def parse_local_time(text: str | None, snapshot: Snapshot) -> tuple[datetime, str | None]:
    """`--at` as an instant, and a note when its local time happens twice that day. A local time that does not
    exist (inside the hour clocks skip) is refused, saying so; an explicit offset (`+01:00`) is taken as written."""
    zone = snapshot.clock.zone
    if text is None:
        return datetime.now(zone), None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise VigieError(f"--at {text!r} is not a date and time (example: 2026-11-23T14:05)") from None
    if moment.tzinfo is not None:
        return moment, None
    passes = snapshot.clock.instants(moment.date(), moment.hour * 60 + moment.minute)
    wall = f"{moment:%H:%M} on {moment:%Y-%m-%d}"
    if not passes:
        before, after = (moment.replace(minute=0) + timedelta(hours=h) for h in (0, 1))
        raise VigieError(f"--at {text!r}: {wall} does not exist in {zone.key}: clocks go from {before:%H:%M} to "
                         f"{after:%H:%M} that day (write another time, or an offset: {moment:%Y-%m-%dT%H:%M}"
                         f"{_offset(before.replace(tzinfo=zone))})")
    first = passes[0].astimezone(zone).replace(second=moment.second, microsecond=moment.microsecond)
    if len(passes) == 1:
        return first, None
    second = passes[1].astimezone(zone)
    return first, (f"{wall} happens twice (clocks go back one hour): this is the first pass, {first:%H:%M %Z} "
                   f"({_offset(first)}); for the second, write --at {moment:%Y-%m-%dT%H:%M}{_offset(second)}")


def _offset(moment: datetime) -> str:
    text = f"{moment:%z}"
    return f"{text[:3]}:{text[3:]}"


def _stored_state(snapshot: Snapshot, local: datetime) -> tuple[StateView, str]:
    """The overrides in force at `local` and that day's minutes, from the state store; empty if it is away."""
    address = snapshot.rules.server.state
    try:
        store = open_store(address)
        try:
            view = StateView(overrides=store.overrides(local), minutes_used_today=store.usage(local.date()),
                             day=local.date())
        finally:
            store.close()
    except StoreUnavailable as exc:
        return EMPTY_STATE, f"WITHOUT overrides and screen time ({exc})"
    return view, f"with the overrides and screen time in {address}"


def run_explain(args: argparse.Namespace) -> int:
    try:
        loaded = load_snapshot(args.rules)
    except ConfigError as exc:
        print_problems(exc.problems)
        return 1
    snapshot = loaded.snapshot
    try:
        host, path, url = parse_target(args.target)
    except NameRejected as exc:
        raise VigieError(f"{args.target!r}: {exc}") from None
    at, at_note = parse_local_time(args.at, snapshot)
    client = snapshot.identify(args.client)
    local = at.astimezone(snapshot.clock.zone)
    state, state_note = (EMPTY_STATE, "without overrides and screen time (--no-state)") if args.no_state else \
        _stored_state(snapshot, local)
    decision = decide(Query(client, host, at, path, url), snapshot, state)
    print(f"{args.target} for {args.client} at {local:%A %Y-%m-%d %H:%M %Z}, {state_note}")
    if at_note:
        print(f"note: {at_note}")
    print(f"decision: {decision.action.value.upper()} ({decision.reason.value})")
    for step in decision.trail or (decision.explanation,):
        print(f"  - {step}")
    for ref in decision.lists:
        info = snapshot.lists.info.get(ref)
        description = info and (info.descriptions.get("en") or info.descriptions.get("fr"))
        if description:
            print(f"  ({ref}: {description})")
    if decision.until is not None:
        print(f"holds until: {decision.until.astimezone(snapshot.clock.zone):%Y-%m-%d %H:%M}")
    if decision.action in (Action.BLOCK, Action.REFUSE) and client is not None:
        opens = next_allowed(Query(client, host, at, path, url), snapshot, state)
        print("allowed again: " + (f"{opens.astimezone(snapshot.clock.zone):%Y-%m-%d %H:%M}" if opens else
                                   f"not in the next {OPENING_HORIZON.days} days"))
    if args.resolve and client is not None and decision.action is Action.ALLOW:
        print_resolution(host, client, at, snapshot, state, args.upstream)
    return 0


def print_resolution(host: str, client: Client, at: datetime, snapshot: Snapshot, state: StateView,
                     upstream_text: str | None) -> None:
    """What the upstream answers for `host` (A), and each name and address of that answer judged for `client`:
    the DNS front blocks the question when one of them is blocked (an alias of a game, a listed resolver)."""
    try:
        upstream = SocketAddress.parse(upstream_text, 53) if upstream_text else snapshot.rules.server.dns.upstreams[0]
    except ValueError as exc:
        raise VigieError(f"--upstream {upstream_text!r}: {exc}") from None
    try:
        wire = DNSRecord.question(host, "A").send(upstream.host, upstream.port, timeout=3)
        answer = DNSRecord.parse(wire)
    except (OSError, DNSError) as exc:
        print(f"resolve: no answer from {upstream} ({exc or type(exc).__name__}); the decision above stands alone")
        return
    targets = [str(rr.rdata).rstrip(".").lower() for rr in answer.rr if rr.rtype in (QTYPE.CNAME, QTYPE.DNAME)]
    addresses = [str(rr.rdata) for rr in answer.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA)]
    print(f"resolve: {upstream} answers {RCODE[answer.header.rcode]}: "
          f"{' → '.join([host, *targets]) + (' → ' + ', '.join(addresses) if addresses else '')}")
    blocked_by = None
    for target in targets:
        try:
            judged = decide(Query(client, normalize_domain(target), at), snapshot, state)
        except NameRejected:
            continue
        print(f"  - {target}: {judged.action.value.upper()} ({judged.reason.value}"
              f"{': ' + ', '.join(judged.categories) if judged.categories else ''})")
        if judged.action in (Action.BLOCK, Action.REFUSE) and blocked_by is None:
            blocked_by = target
    for address in addresses:
        listed = listed_address(client, address, at, snapshot)
        print(f"  - {address}: {'BLOCK (' + listed.explanation + ')' if listed else 'in no blocking address list'}")
        if listed is not None and blocked_by is None:
            blocked_by = address
    print(f"DNS answer: {'BLOCK, via ' + blocked_by if blocked_by else 'ALLOW'}")
