"""`vigie lists update` and `vigie lists stats`: the admin's view of the list sources."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from blocklists.errors import ListError
from blocklists.sources import LoadedSource, SourceSpec, is_remote, load_source
from blocklists.update import UpdateOutcome, UpdateResult, read_state, update_lock, update_source
from policy.errors import ConfigError
from policy.metrics import LIST_LAST_SUCCESS, LIST_UPDATES
from policy.model import Rules
from policy.snapshot import source_spec
from vigie.loading import load_snapshot, rules_or_report


def add_lists_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lists = commands.add_parser("lists", help="update the downloaded lists, or show every list's size and age")
    actions = lists.add_subparsers(required=True, metavar="ACTION")
    update = actions.add_parser("update", help="download the list sources that are URLs (only when changed)")
    update.add_argument("--rules", type=Path, default=Path("rules.yaml"))
    update.add_argument("--source", action="append", help="only this source (repeatable)")
    update.add_argument("--timeout", type=float, help="seconds for each download (overrides server.lists.timeout)")
    update.add_argument("--accept-shrink", action="store_true",
                        help="accept a list that shrank more than server.lists.max_shrink (after checking it)")
    update.add_argument("--force", action="store_true", help="download even if the server says not modified")
    update.set_defaults(handler=run_lists_update)
    stats = actions.add_parser("stats", help="each source's categories with their size, and the sources' age")
    stats.add_argument("--rules", type=Path, default=Path("rules.yaml"))
    stats.set_defaults(handler=run_lists_stats)


def remote_specs(rules: Rules, only: Sequence[str] | None = None) -> list[SourceSpec]:
    return [source_spec(rules, source) for source in rules.lists
            if is_remote(source.location) and (not only or source.name in only)]


def record(outcome: UpdateOutcome, spec: SourceSpec) -> None:
    """Count an outcome in the metrics (the services call this; the command line has no metrics endpoint)."""
    LIST_UPDATES.labels(outcome.source, outcome.result.value).inc()
    state = read_state(spec)
    if state.checked_at:
        LIST_LAST_SUCCESS.labels(outcome.source).set(state.checked_at)


def describe(outcome: UpdateOutcome) -> str:
    if outcome.result is UpdateResult.UPDATED and outcome.previous_entries is not None:
        return f"{outcome.source}: updated, {outcome.message} (was {outcome.previous_entries:,})"
    if outcome.result is UpdateResult.FAILED:
        return f"{outcome.source}: FAILED: {outcome.message}"
    return f"{outcome.source}: {outcome.result.value.replace('_', ' ')}, {outcome.message}"


def run_lists_update(args: argparse.Namespace) -> int:
    rules = rules_or_report(args.rules)
    if rules is None:
        return 1
    unknown = sorted(set(args.source or ()) - {s.name for s in rules.lists})
    if unknown:
        print(f"no list source named {', '.join(unknown)} in {args.rules}", file=sys.stderr)
        return 1
    specs = remote_specs(rules, args.source)
    if not specs:
        print(f"{args.rules}: no list source is a URL; nothing to download")
        return 0
    policy = rules.server.list_updates
    if args.timeout:
        policy = dataclasses.replace(policy, timeout_seconds=args.timeout)
    # The lock also holds back the running services' reload until the new lists are compiled below: they then
    # map the compiled form instead of each compiling it again.
    with update_lock(Path(rules.server.data_dir) / "lists", wait=True):
        outcomes = []
        for spec in specs:
            outcome = update_source(spec, policy, accept_shrink=args.accept_shrink, conditional=not args.force)
            outcomes.append(outcome)
            print(describe(outcome), flush=True)
        if any(o.result is UpdateResult.UPDATED for o in outcomes):
            started = time.monotonic()
            try:
                loaded = load_snapshot(args.rules)
            except ConfigError as exc:
                for problem in exc.problems:
                    print(problem, file=sys.stderr)
                return 1
            print(f"compiled: {len(loaded.snapshot.lists.domains):,} domains in "
                  f"{time.monotonic() - started:.1f} s; running services reload them within seconds")
    return 1 if any(o.result is UpdateResult.FAILED for o in outcomes) else 0


def _age(timestamp: float | None, zone: ZoneInfo, now: float) -> str:
    if timestamp is None:
        return "never"
    hours = (now - timestamp) / 3600
    ago = f"{hours * 60:.0f} min ago" if hours < 1 else f"{hours:.0f} h ago" if hours < 48 else \
        f"{hours / 24:.0f} days ago"
    return f"{datetime.fromtimestamp(timestamp, zone):%Y-%m-%d %H:%M} ({ago})"


def _source_heading(spec: SourceSpec, zone: ZoneInfo, now: float) -> str:
    heading = f"{spec.name} ({spec.format.value}, {spec.location})"
    if not is_remote(spec.location):
        try:
            return f"{heading}: file changed {_age(spec.local_path.stat().st_mtime, zone, now)}"
        except OSError:
            return heading
    state = read_state(spec)
    if not spec.local_path.exists():
        return f"{heading}: not downloaded yet (run `vigie lists update`)" + \
            (f"; last error: {state.last_error}" if state.last_error else "")
    text = f"{heading}: downloaded {_age(state.fetched_at, zone, now)}, checked {_age(state.checked_at, zone, now)}"
    return text + (f"; LAST ATTEMPT FAILED: {state.last_error}" if state.last_error else "")


def run_lists_stats(args: argparse.Namespace) -> int:
    rules = rules_or_report(args.rules)
    if rules is None:
        return 1
    zone, now = ZoneInfo(rules.timezone), time.time()
    used_by: dict[str, list[str]] = {}
    for category in rules.categories.values():
        for ref in category.members:
            used_by.setdefault(ref, []).append(category.name)
    status = 0
    for source in rules.lists:
        spec = source_spec(rules, source)
        print(_source_heading(spec, zone, now))
        try:
            loaded = load_source(spec)
        except ListError as exc:
            if spec.local_path.exists() or not is_remote(spec.location):
                print(f"  unreadable: {exc}")
                status = 1
            continue
        _print_categories(loaded, used_by)
    return status


def _print_categories(loaded: LoadedSource, used_by: dict[str, list[str]]) -> None:
    users: dict[str, set[str]] = {}
    for ref, categories in used_by.items():
        real = loaded.resolve(ref) if ref.split("/", 1)[0] == loaded.spec.name else None
        if real is not None:
            users.setdefault(real, set()).update(categories)
    print(f"  {'list':<28} {'domains':>10} {'URLs':>8} {'addresses':>9}  {'in categories':<16} description")
    for ref, parsed in sorted(loaded.lists.items()):
        info = loaded.info.get(ref)
        description = (info.titles.get("fr") or info.descriptions.get("fr") or "") if info else ""
        print(f"  {ref:<28} {len(parsed.domains):>10,} {len(parsed.urls):>8,} {len(parsed.addresses):>9,}  "
              f"{', '.join(sorted(users.get(ref, ()))) or '-':<16} {description}".rstrip())
    aliases = ", ".join(f"{alias} → {real}" for alias, real in sorted(loaded.aliases.items()))
    if aliases:
        print(f"  aliases: {aliases}")
