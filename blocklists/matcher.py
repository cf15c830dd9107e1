"""Domain → categories with subdomain matching, and host + path prefix → categories for URL lists.

Categories are bits of an int mask: a lookup ORs the masks of the name and of every parent, so a domain that is
in several categories names all of them.

`DomainTable` holds millions of names in a few bytes each: a MARISA trie (compressed, static, exact — no false
positives) over the names written backwards with a leading dot, so `www.example.fr` asks for `rf.elpmaxe.www.` and
every prefix found ending at a dot (`rf.`, `rf.elpmaxe.`) is the name itself or a parent. Each key's id indexes an
array of "combination" numbers, and each combination is a (block mask, exception mask) pair: lists rarely combine,
so a few hundred pairs cover millions of names. Saved to disk, the trie and the array are memory-mapped, so a
restart does not re-parse and every worker process shares one copy in the page cache.
"""

from __future__ import annotations

import array
import json
import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import marisa_trie

from blocklists.errors import ListError
from blocklists.formats import UrlEntry
from blocklists.names import parent_domains

_TRIE_FILE = "domains.marisa"
_COMBINATIONS_FILE = "combinations.bin"
_MASKS_FILE = "masks.json"
_Width = Literal["H", "I"]  # array item of a combination number: 2 bytes, or 4 past 65,535 combinations


def _key(name: str) -> str:
    """`www.example.fr` → `rf.elpmaxe.www.`: the trie's prefixes ending at a dot are the name and its parents."""
    return ("." + name)[::-1]


@dataclass(frozen=True)
class DomainListing:
    """The names of one list category, with its bit; `exception` lists unblock their bit below those names."""

    names: Iterable[str]
    bit: int
    exception: bool = False


class _Combinations:
    """The distinct (block mask, exception mask) pairs, numbered; 0 is (0, 0)."""

    def __init__(self) -> None:
        self._pairs: list[tuple[int, int]] = [(0, 0)]
        self._numbers: dict[tuple[int, int], int] = {(0, 0): 0}
        self._added: dict[tuple[int, int], int] = {}  # (combination, listing bit + flag) → combination

    def __len__(self) -> int:
        return len(self._pairs)

    def add(self, combination: int, listing: DomainListing) -> int:
        """The combination of a name in `combination` that `listing` also names."""
        step = (combination, -listing.bit if listing.exception else listing.bit)
        found = self._added.get(step)
        if found is None:
            block, exception = self._pairs[combination]
            pair = (block, exception | listing.bit) if listing.exception else (block | listing.bit, exception)
            found = self._numbers.setdefault(pair, len(self._pairs))
            if found == len(self._pairs):
                self._pairs.append(pair)
            self._added[step] = found
        return found

    def pairs(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._pairs)


class DomainTable:
    """Exact names with their (block, exception) masks; `lookup` answers for a name and all its parents at once."""

    __slots__ = ("_buffer", "_combinations", "_pairs", "_prefixes", "_trie")

    def __init__(self, trie: marisa_trie.Trie, combinations: memoryview,
                 pairs: tuple[tuple[int, int], ...], buffer: mmap.mmap | None = None) -> None:
        self._trie = trie
        self._prefixes = trie.iter_prefixes_with_ids
        self._combinations = combinations
        self._pairs = pairs
        self._buffer = buffer  # keeps the mapping of `combinations` open

    @classmethod
    def build(cls, listings: Iterable[DomainListing]) -> DomainTable:
        """Compile the listings; a name in several listings carries all their bits."""
        materialised = [(listing, [_key(name) for name in listing.names]) for listing in listings]
        trie = marisa_trie.Trie(key for _, keys in materialised for key in keys)
        combinations = _Combinations()
        if not materialised:
            return cls(trie, memoryview(b"").cast("H"), combinations.pairs())
        # Finding a key's id costs ~1 µs, so the largest listing (UT1 `adult`: most of the names) is not looked
        # up at all: every id starts with its combination, and only names of the other listings are placed.
        largest = max(range(len(materialised)), key=lambda number: len(materialised[number][1]))
        others: dict[str, int] = {}
        for number, (listing, keys) in enumerate(materialised):
            if number != largest:
                for key in keys:
                    others[key] = combinations.add(others.get(key, 0), listing)
        largest_listing, largest_keys = materialised[largest]
        for key in largest_keys:
            if key in others:
                others[key] = combinations.add(others[key], largest_listing)
        ids = array.array("I", [combinations.add(0, largest_listing)]) * len(trie)
        for key, combination in others.items():
            ids[trie.key_id(key)] = combination
        width: _Width = "H" if len(combinations) <= 0xFFFF else "I"
        packed = array.array(width, ids).tobytes()
        return cls(trie, memoryview(packed).cast(width), combinations.pairs())

    def __len__(self) -> int:
        return len(self._trie)

    def lookup(self, name: str) -> int:
        """The bits of every listing naming `name` or a parent, less the bits excepted there."""
        block = exception = 0
        combinations, pairs = self._combinations, self._pairs
        for _, key_id in self._prefixes(("." + name)[::-1]):
            found_block, found_exception = pairs[combinations[key_id]]
            block |= found_block
            exception |= found_exception
        return block & ~exception

    def bits_of_names(self) -> Iterator[tuple[str, int, int]]:
        """Every name with its block and exception masks (for tests and `vigie lists stats`)."""
        for key in self._trie.iterkeys():
            block, exception = self._pairs[self._combinations[self._trie.key_id(key)]]
            yield key[::-1][1:], block, exception

    def save(self, directory: Path) -> None:
        self._trie.save(str(directory / _TRIE_FILE))
        (directory / _COMBINATIONS_FILE).write_bytes(
            bytes([1 if self._combinations.format == "H" else 2]) + self._combinations.tobytes())
        (directory / _MASKS_FILE).write_text(json.dumps([[hex(b), hex(e)] for b, e in self._pairs]))

    @classmethod
    def open(cls, directory: Path) -> DomainTable:
        """Map a saved table; pages are read on demand and shared with every process mapping the same files."""
        try:
            trie = marisa_trie.Trie()
            trie.mmap(str(directory / _TRIE_FILE))
            with open(directory / _COMBINATIONS_FILE, "rb") as file:
                buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            pairs = tuple((int(b, 16), int(e, 16)) for b, e in json.loads((directory / _MASKS_FILE).read_text()))
        except (OSError, ValueError, RuntimeError) as exc:
            raise ListError(f"{directory}: compiled lists unreadable ({exc})") from None
        marker = buffer[0] if len(buffer) else 0
        width: _Width = "H" if marker == 1 else "I"
        view = memoryview(buffer)[1:]
        if marker not in (1, 2) or len(view) != len(trie) * (2 if width == "H" else 4):
            view.release()
            buffer.close()
            raise ListError(f"{directory}: compiled lists truncated or of another version")
        return cls(trie, view.cast(width), pairs, buffer)


def file_sizes(directory: Path) -> int:
    """Bytes a saved table takes on disk (and at most in memory, when every page has been read)."""
    return sum(os.path.getsize(directory / name) for name in (_TRIE_FILE, _COMBINATIONS_FILE, _MASKS_FILE))


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

    def entries(self) -> Iterator[tuple[UrlEntry, int]]:
        for host, prefixes in self._by_host.items():
            for prefix in prefixes:
                yield UrlEntry(host, prefix.path_prefix), prefix.mask

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
