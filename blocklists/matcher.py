"""Domain → categories with subdomain matching, and host + path prefix → categories for URL lists.

Categories are bits of an int mask: a lookup ORs the masks of the name and of every parent, so a domain that is
in several categories names all of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from blocklists.formats import UrlEntry
from blocklists.names import parent_domains


class DomainMatcher:
    """Exact names with their category mask; `lookup` walks the parents of the name asked."""

    __slots__ = ("_masks",)

    def __init__(self, entries: Iterable[tuple[str, int]]) -> None:
        masks: dict[str, int] = {}
        for name, mask in entries:
            masks[name] = masks.get(name, 0) | mask
        self._masks = masks

    def __len__(self) -> int:
        return len(self._masks)

    def lookup(self, name: str) -> int:
        masks = self._masks
        found = 0
        for suffix in parent_domains(name):
            found |= masks.get(suffix, 0)
        return found


@dataclass(frozen=True)
class UrlPrefix:
    path_prefix: str
    mask: int


class UrlMatcher:
    """URL-list entries keyed by host; a request matches an entry of its host or a parent with a path prefix."""

    __slots__ = ("_by_host",)

    def __init__(self, entries: Iterable[tuple[UrlEntry, int]]) -> None:
        by_host: dict[str, list[UrlPrefix]] = {}
        for entry, mask in entries:
            by_host.setdefault(entry.host, []).append(UrlPrefix(entry.path_prefix, mask))
        self._by_host = {host: tuple(prefixes) for host, prefixes in by_host.items()}

    def __len__(self) -> int:
        return sum(len(prefixes) for prefixes in self._by_host.values())

    def has_host(self, name: str) -> bool:
        """Whether any URL rule concerns `name` or a parent: the proxy must then see inside its requests."""
        return any(suffix in self._by_host for suffix in parent_domains(name))

    def lookup(self, host: str, path: str) -> int:
        found = 0
        for suffix in parent_domains(host):
            for prefix in self._by_host.get(suffix, ()):
                if path.startswith(prefix.path_prefix):
                    found |= prefix.mask
        return found
