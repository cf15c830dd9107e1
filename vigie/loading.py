"""Load rules.yaml and everything it names into a Snapshot: the one path `check`, `explain` and the runner share."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from policy.errors import ConfigError, ConfigProblem
from policy.loader import load_rules
from policy.model import Rules
from policy.snapshot import ListCache, Snapshot, build_snapshot


@dataclass(frozen=True)
class Loaded:
    snapshot: Snapshot
    warnings: tuple[ConfigProblem, ...]


def load_snapshot(rules_path: Path, cache: ListCache | None = None, generation: int = 1) -> Loaded:
    """Raises policy.errors.ConfigError with every problem when the rules cannot be used."""
    loaded = load_rules(rules_path)
    snapshot, problems = build_snapshot(loaded.rules, cache or ListCache(), generation, datetime.now(UTC),
                                        loaded.warnings)
    return Loaded(snapshot, problems)


def rules_or_report(path: Path) -> Rules | None:
    """The validated rules, or None after printing every problem (for commands that only need the rules)."""
    try:
        return load_rules(path).rules
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{path}: fix the rules first (`vigie check {path}`)", file=sys.stderr)
        return None


def watched_files(snapshot: Snapshot) -> list[Path]:
    """The files whose change means a reload: the rules, the inventory, local list files and downloaded lists."""
    from policy.snapshot import source_spec

    rules = snapshot.rules
    files = [Path(rules.source)]
    if rules.inventory:
        files.append(Path(rules.inventory))
    files.extend(source_spec(rules, s).local_path for s in rules.lists if s.location != "(bundled)")
    return files
