"""Load list sources (UT1, hosts, adblock, domains, URLs; local or downloaded) and compile the used categories."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from blocklists.bundled_data import BUNDLED_CATEGORIES, BUNDLED_SOURCE, read_bundled_list
from blocklists.errors import ListError
from blocklists.formats import LINE_PARSERS, ListFormat, ParsedList, Problem
from blocklists.matcher import DomainListing, DomainTable, MaskedKeys, UrlMatcher
from blocklists.ut1 import CategoryInfo, read_ut1


def is_remote(location: str) -> bool:
    return location.startswith(("http://", "https://"))


@dataclass(frozen=True)
class SourceSpec:
    """Where a list source is and how it is written; `local_path` is the file read (the download cache for URLs)."""

    name: str
    location: str
    format: ListFormat
    local_path: Path


@dataclass
class LoadedSource:
    """The categories of one source by their full reference (`ut1/adult`, `ville-deny`)."""

    spec: SourceSpec
    lists: dict[str, ParsedList] = field(default_factory=dict)
    info: dict[str, CategoryInfo] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def resolve(self, ref: str) -> str | None:
        """The real reference behind `ref` after aliases (`ut1/porn` → `ut1/adult`), or None if unknown."""
        name = ref.split("/", 1)[1] if "/" in ref else ""
        real = f"{self.spec.name}/{self.aliases.get(name, name)}" if name else ref
        return real if real in self.lists else None


def load_source(spec: SourceSpec) -> LoadedSource:
    """Read one source from disk. Raises ListError when the file is missing or unreadable."""
    if spec.name == BUNDLED_SOURCE:
        return LoadedSource(spec, {f"{BUNDLED_SOURCE}/{c}": read_bundled_list(c) for c in BUNDLED_CATEGORIES})
    path = spec.local_path
    if not path.exists():
        hint = "run `vigie lists update` to download it" if is_remote(spec.location) else "check the path"
        raise ListError(f"{path}: list source {spec.name!r} is not on disk ({hint})")
    if spec.format is ListFormat.UT1:
        collection = read_ut1(path)
        return LoadedSource(
            spec,
            {f"{spec.name}/{category}": parsed for category, parsed in collection.categories.items()},
            {f"{spec.name}/{category}": info for category, info in collection.info.items()},
            dict(collection.aliases),
        )
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ListError(f"{path}: cannot read list source {spec.name!r} ({exc})") from None
    return LoadedSource(spec, {spec.name: LINE_PARSERS[spec.format](str(path), text.splitlines())})


@dataclass(frozen=True)
class CategoryStats:
    ref: str
    domains: int
    urls: int
    addresses: int
    expressions: int


@dataclass(frozen=True)
class CompiledLists:
    """Every used list category as one bit; the matchers answer masks over those bits.

    `mapped_from` is the directory of the compiled form when the domain table is memory-mapped from disk.
    """

    bits: Mapping[str, int]
    aliases: Mapping[str, str]
    domains: DomainTable
    urls: UrlMatcher
    addresses: MaskedKeys
    expressions: tuple[tuple[re.Pattern[str], int], ...]
    stats: tuple[CategoryStats, ...]
    info: Mapping[str, CategoryInfo]
    problems: tuple[Problem, ...]
    mapped_from: Path | None = None

    def mask_of(self, refs: Iterable[str]) -> int:
        mask = 0
        for ref in refs:
            mask |= self.bits.get(self.aliases.get(ref, ref), 0)
        return mask

    def refs_in(self, mask: int) -> list[str]:
        if not mask:  # most names: no need to walk a hundred categories
            return []
        return [ref for ref, bit in self.bits.items() if mask & bit]

    def lookup_domain(self, name: str) -> int:
        """The list bits of a host: a name and its parents, or an IP literal (canonical form) listed as such —
        UT1's `domains` files list addresses too. No TLD ends in a digit, so only literals reach the dict."""
        if name[-1:].isdigit() or ":" in name:
            return self.addresses.get(name, 0)
        return self.domains.lookup(name)

    def lookup_url(self, host: str, path: str, url: str) -> int:
        mask = self.urls.lookup(host, path)
        for pattern, bit in self.expressions:
            if not mask & bit and pattern.search(url):
                mask |= bit
        return mask


def compile_expressions(ref: str, expressions: Iterable[str], bit: int,
                        problems: list[Problem]) -> list[tuple[re.Pattern[str], int]]:
    compiled = []
    for number, expression in enumerate(expressions, start=1):
        try:
            compiled.append((re.compile(expression, re.IGNORECASE), bit))
        except re.error as exc:
            problems.append(Problem(f"{ref}/expressions", number, f"not a regular expression ({exc})"))
    return compiled


def compile_lists(lists: Mapping[str, ParsedList], info: Mapping[str, CategoryInfo],
                  aliases: Mapping[str, str]) -> CompiledLists:
    """Build the matchers for exactly these list categories (`lists` keyed by real reference; `aliases` maps
    the names rules use, like `ut1/porn`, to those references)."""
    bits = {ref: 1 << index for index, ref in enumerate(sorted(lists))}
    expressions: list[tuple[re.Pattern[str], int]] = []
    problems: list[Problem] = []
    for ref, parsed in lists.items():
        problems.extend(parsed.problems)
        expressions.extend(compile_expressions(ref, parsed.expressions, bits[ref], problems))
    stats = tuple(
        CategoryStats(ref, len(p.domains), len(p.urls), len(p.addresses), len(p.expressions))
        for ref, p in sorted(lists.items())
    )
    listings = [DomainListing(p.domains, bits[ref]) for ref, p in lists.items()]
    listings += [DomainListing(p.exceptions, bits[ref], exception=True) for ref, p in lists.items() if p.exceptions]
    return CompiledLists(
        bits=bits,
        aliases=dict(aliases),
        domains=DomainTable.build(listings),
        urls=UrlMatcher.build((u, bits[ref]) for ref, p in lists.items() for u in p.urls),
        addresses=MaskedKeys.build((a, bits[ref]) for ref, p in lists.items() for a in p.addresses),
        expressions=tuple(expressions),
        stats=stats,
        info={ref: i for ref, i in info.items() if ref in lists},
        problems=tuple(problems),
    )
