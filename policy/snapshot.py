"""Rules + lists → the immutable `Snapshot` both fronts decide with. A reload builds a new one and swaps it.

Compiled lists are kept between builds, keyed by the sources' fingerprints, so an edit of rules.yaml alone does
not re-read a single list and shares the lists in memory with the snapshot it replaces; on disk, by the sources'
content digests, so restarts and other processes map them instead of parsing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from blocklists.bundled_data import BUNDLED_SOURCE, SafeSearchTarget, bundled_digest, safe_search_hosts
from blocklists.compiled import CompiledStore, compiled_key, content_digest
from blocklists.errors import ListError
from blocklists.formats import ParsedList
from blocklists.sources import CompiledLists, LoadedSource, SourceSpec, compile_lists, is_remote, load_source
from blocklists.ut1 import CategoryInfo
from policy.clients import Client, ClientDirectory
from policy.errors import ConfigError, ConfigProblem, Severity
from policy.model import DomainRule, ListSource, Origin, Profile, Rules, UrlRule
from policy.schedule import ProfileInForce, ScheduleClock

log = logging.getLogger(__name__)


def download_path(data_dir: str, source: ListSource) -> Path:
    """Where `vigie lists update` keeps the last good copy of a remote source."""
    return Path(data_dir) / "lists" / source.name


def source_spec(rules: Rules, source: ListSource) -> SourceSpec:
    local = download_path(rules.server.data_dir, source) if is_remote(source.location) else Path(source.location)
    return SourceSpec(source.name, source.location, source.format, local)


def fingerprint(spec: SourceSpec) -> tuple[str, int, int]:
    """Cheap change detection for a source on disk (path, size, mtime); the updater swaps files atomically."""
    if spec.name == BUNDLED_SOURCE:
        return (spec.name, 0, 0)
    try:
        stat = spec.local_path.stat()
    except OSError:
        return (str(spec.local_path), -1, -1)
    return (str(spec.local_path), stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class CompiledProfile:
    profile: Profile
    block_mask: int
    blocked_categories: tuple[tuple[str, int], ...]
    allow: dict[str, DomainRule]
    deny: dict[str, DomainRule]
    allow_urls: dict[str, tuple[UrlRule, ...]]
    deny_urls: dict[str, tuple[UrlRule, ...]]


class ListCache:
    """The compiled lists of the last build, reused while the same categories of the same files are asked for.

    Between processes and restarts, compiled lists are found in `<data_dir>/compiled` by the sources' content
    digests and memory-mapped; only a real change of a list (or of the categories used) parses text again.
    """

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._compiled: CompiledLists | None = None
        self._digests: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def compiled(self, rules: Rules, problems: list[ConfigProblem]) -> CompiledLists:
        used = sorted({ref for category in rules.categories.values() for ref in category.members})
        specs = {s.name: source_spec(rules, s) for s in rules.lists}
        used_sources = sorted({ref.split("/", 1)[0] for ref in used})
        key = (tuple(used), tuple(fingerprint(specs[name]) for name in used_sources))
        with self._lock:
            if key == self._key and self._compiled is not None:
                return self._compiled
            store = CompiledStore(rules.server.data_dir)
            digests = self._content_digests([specs[name] for name in used_sources])
            disk_key = compiled_key(used, digests) if len(digests) == len(used_sources) else None
            found = store.open(disk_key) if disk_key else None
            if found is not None:
                self._key, self._compiled = key, found
                return found
            first_new_problem = len(problems)
            compiled = self._compile(rules, used_sources, specs, problems)
            if any(p.severity is Severity.ERROR for p in problems[first_new_problem:]):
                return compiled
            if disk_key and len(problems) == first_new_problem:
                compiled = store.save(disk_key, compiled)
            self._key, self._compiled = key, compiled
            return compiled

    def _content_digests(self, specs: list[SourceSpec]) -> dict[str, str]:
        """Digest of each source on disk (remembered while its size and mtime stay); absent sources are left out."""
        digests: dict[str, str] = {}
        for spec in specs:
            if spec.name == BUNDLED_SOURCE:
                digests[spec.name] = bundled_digest()
                continue
            stamp = fingerprint(spec)
            if stamp[1] < 0:
                continue
            if stamp not in self._digests:
                try:
                    self._digests[stamp] = content_digest(spec.local_path)
                except OSError:
                    continue
            digests[spec.name] = self._digests[stamp]
        return digests

    def _compile(self, rules: Rules, used_sources: list[str], specs: dict[str, SourceSpec],
                 problems: list[ConfigProblem]) -> CompiledLists:
        origins = {s.name: s.origin for s in rules.lists}
        loaded: dict[str, LoadedSource] = {}
        for name in used_sources:
            try:
                loaded[name] = load_source(specs[name])
            except ListError as exc:
                severity = Severity.WARNING if is_remote(specs[name].location) else Severity.ERROR
                origin = origins[name]
                problems.append(ConfigProblem(origin.file, origin.line, origin.column, f"lists.{name}",
                                              str(exc), severity))
        resolved = self._resolve_refs(rules, loaded, problems)
        lists: dict[str, ParsedList] = {}
        info: dict[str, CategoryInfo] = {}
        for real in set(resolved.values()):
            source = loaded[real.split("/", 1)[0]]
            lists[real] = source.lists[real]
            if real in source.info:
                info[real] = source.info[real]
        # Let go of the old tables before building: the snapshot still serving keeps them (mapped from disk,
        # so shared and cheap) until the swap.
        self._key, self._compiled = None, None
        return compile_lists(lists, info, {ref: real for ref, real in resolved.items() if ref != real})

    @staticmethod
    def _resolve_refs(rules: Rules, loaded: dict[str, LoadedSource],
                      problems: list[ConfigProblem]) -> dict[str, str]:
        """Each category member → its real list (aliases followed); members no source has are reported."""
        resolved: dict[str, str] = {}
        for category in rules.categories.values():
            for ref in category.members:
                source = loaded.get(ref.split("/", 1)[0])
                if source is None:
                    continue  # the source failed to load; already reported
                real = source.resolve(ref)
                if real is None:
                    known = sorted(r.split("/", 1)[-1] for r in source.lists)
                    problems.append(ConfigProblem(
                        category.origin.file, category.origin.line, category.origin.column,
                        f"categories.{category.name}",
                        f"{ref!r} is not in list source {source.spec.name!r} (it has: {', '.join(known[:80])})"))
                else:
                    resolved[ref] = real
        return resolved


class Snapshot:
    """Everything a decision needs, compiled once. Never mutated after construction (but for its memo caches)."""

    def __init__(self, rules: Rules, lists: CompiledLists, generation: int, built_at: datetime) -> None:
        self.rules = rules
        self.lists = lists
        self.generation = generation
        self.built_at = built_at
        self.clients = ClientDirectory(rules)
        self.clock = ScheduleClock(rules.timezone, rules.holidays)
        self.safe_search: dict[str, SafeSearchTarget] = safe_search_hosts()
        self.category_masks = {name: lists.mask_of(c.members) for name, c in rules.categories.items()}
        self.always_block = tuple((name, self.category_masks[name]) for name in rules.always_block)
        self.always_block_mask = _or(mask for _, mask in self.always_block)
        self.background_mask = _or(self.category_masks[name] for name in rules.background)
        self.profiles = {name: self._compile_profile(p) for name, p in rules.profiles.items()}
        # Every domain on an allow or deny list of any profile (the search portals included): a name under none of
        # them is decided by its list bits alone (see `policy.engine.bits_deciding`).
        self.listed_domains = frozenset(domain for compiled in self.profiles.values()
                                        for domain in (*compiled.allow, *compiled.deny))
        self._profile_memo: dict[str, ProfileInForce] = {}
        self._memo_from: dict[str, datetime] = {}

    def _compile_profile(self, profile: Profile) -> CompiledProfile:
        allow = {rule.domain: rule for rule in profile.allow}
        if profile.search_portal and profile.search_portal not in allow:
            allow[profile.search_portal] = DomainRule(
                profile.search_portal,
                Origin(profile.origin.file, profile.origin.line, profile.origin.column,
                       f"profiles.{profile.name}.search_portal"))
        blocked = tuple((name, self.category_masks[name]) for name in profile.block)
        return CompiledProfile(
            profile=profile,
            block_mask=_or(mask for _, mask in blocked),
            blocked_categories=blocked,
            allow=allow,
            deny={rule.domain: rule for rule in profile.deny},
            allow_urls=_by_host(profile.allow_urls),
            deny_urls=_by_host(profile.deny_urls),
        )

    def identify(self, address: str) -> Client | None:
        return self.clients.identify(address)

    def profile_in_force(self, group: str, at: datetime) -> ProfileInForce:
        """Memoised per group until the next schedule change: most calls are one dict probe."""
        memo = self._profile_memo.get(group)
        if memo is not None and self._memo_from[group] <= at and (memo.until is None or at < memo.until):
            return memo
        found = self.clock.profile_for(self.rules.groups[group], self.rules.schedules, at)
        self._profile_memo[group], self._memo_from[group] = found, at
        return found

def _or(masks: Iterable[int]) -> int:
    result = 0
    for mask in masks:
        result |= mask
    return result


def _by_host(rules: tuple[UrlRule, ...]) -> dict[str, tuple[UrlRule, ...]]:
    grouped: dict[str, list[UrlRule]] = {}
    for rule in rules:
        grouped.setdefault(rule.host, []).append(rule)
    return {host: tuple(items) for host, items in grouped.items()}


def build_snapshot(rules: Rules, cache: ListCache, generation: int, now: datetime,
                   warnings: tuple[ConfigProblem, ...] = ()) -> tuple[Snapshot, tuple[ConfigProblem, ...]]:
    """Compile `rules` with their lists. Raises ConfigError when a list problem is an error (a local file missing,
    a category naming no list); returns the snapshot with every warning otherwise."""
    problems: list[ConfigProblem] = list(warnings)
    lists = cache.compiled(rules, problems)
    if any(p.severity is Severity.ERROR for p in problems):
        raise ConfigError(problems)
    return Snapshot(rules, lists, generation, now), tuple(problems)
