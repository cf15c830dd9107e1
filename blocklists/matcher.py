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

    def save(self, directory: Path) -> None:
        self._trie.save(str(directory / _TRIE_FILE))
        _save_numbers(directory / _COMBINATIONS_FILE, self._combinations)
        (directory / _MASKS_FILE).write_text(json.dumps([[hex(b), hex(e)] for b, e in self._pairs]))

    @classmethod
    def open(cls, directory: Path) -> DomainTable:
        """Map a saved table; pages are read on demand and shared with every process mapping the same files."""
        try:
            trie = _map_trie(directory / _TRIE_FILE)
            pairs = tuple((int(b, 16), int(e, 16)) for b, e in json.loads((directory / _MASKS_FILE).read_text()))
        except (OSError, ValueError, RuntimeError) as exc:
            raise ListError(f"{directory}: compiled lists unreadable ({exc})") from None
        numbers, buffer = _map_numbers(directory / _COMBINATIONS_FILE, len(trie))
        return cls(trie, numbers, pairs, buffer)


def _numbered(values: list[int]) -> tuple[memoryview, tuple[int, ...]]:
    """`values` as an array of small numbers into a tuple of their distinct values (2 bytes each when they fit)."""
    distinct: dict[int, int] = {}
    numbers = [distinct.setdefault(value, len(distinct)) for value in values]
    width: _Width = "H" if len(distinct) <= 0xFFFF else "I"
    return memoryview(array.array(width, numbers).tobytes()).cast(width), tuple(distinct)


def _save_numbers(path: Path, numbers: memoryview) -> None:
    path.write_bytes(bytes([1 if numbers.format == "H" else 2]) + numbers.tobytes())


def _map_trie(path: Path) -> marisa_trie.Trie:
    trie = marisa_trie.Trie()
    trie.mmap(str(path))
    return trie


def _map_numbers(path: Path, count: int) -> tuple[memoryview, mmap.mmap]:
    """The array saved by `_save_numbers`, memory-mapped; it must hold `count` numbers (one per trie key)."""
    try:
        with open(path, "rb") as file:
            buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise ListError(f"{path.parent}: compiled lists unreadable ({exc})") from None
    marker = buffer[0] if len(buffer) else 0
    width: _Width = "H" if marker == 1 else "I"
    view = memoryview(buffer)[1:]
    if marker not in (1, 2) or len(view) != count * (2 if width == "H" else 4):
        view.release()
        buffer.close()
        raise ListError(f"{path.parent}: compiled lists truncated or of another version")
    return view.cast(width), buffer


class MaskedKeys:
    """Exact text keys, each with a mask: a MARISA trie, and per key id the number of its mask among the distinct
    masks. Saved, both are memory-mapped like `DomainTable`, so tens of thousands of URL prefixes or addresses
    cost each process a few pages instead of megabytes of Python objects."""

    __slots__ = ("_buffer", "_masks", "_numbers", "_trie")

    def __init__(self, trie: marisa_trie.Trie, numbers: memoryview, masks: tuple[int, ...],
                 buffer: mmap.mmap | None = None) -> None:
        self._trie = trie
        self._numbers = numbers
        self._masks = masks
        self._buffer = buffer  # keeps the mapping of `numbers` open

    @classmethod
    def build(cls, items: Iterable[tuple[str, int]]) -> MaskedKeys:
        """A key given several times carries all its masks."""
        merged: dict[str, int] = {}
        for key, mask in items:
            merged[key] = merged.get(key, 0) | mask
        trie = marisa_trie.Trie(merged)
        masks = [0] * len(trie)
        for key, mask in merged.items():
            masks[trie.key_id(key)] = mask
        numbers, distinct = _numbered(masks)
        return cls(trie, numbers, distinct)

    def __len__(self) -> int:
        return len(self._trie)

    def get(self, key: str, default: int = 0) -> int:
        key_id = self._trie.get(key)
        return default if key_id is None else self._masks[self._numbers[key_id]]

    def prefixes_mask(self, text: str) -> int:
        """The masks of every key that `text` starts with, together."""
        found = 0
        for _, key_id in self._trie.iter_prefixes_with_ids(text):
            found |= self._masks[self._numbers[key_id]]
        return found

    def has_keys_starting(self, prefix: str) -> bool:
        return next(self._trie.iterkeys(prefix), None) is not None

    def items(self) -> Iterator[tuple[str, int]]:
        for key, key_id in self._trie.iteritems():
            yield key, self._masks[self._numbers[key_id]]

    def save(self, directory: Path, stem: str) -> None:
        self._trie.save(str(directory / f"{stem}.marisa"))
        _save_numbers(directory / f"{stem}.bin", self._numbers)
        (directory / f"{stem}.json").write_text(json.dumps([hex(mask) for mask in self._masks]))

    @classmethod
    def open(cls, directory: Path, stem: str) -> MaskedKeys:
        try:
            trie = _map_trie(directory / f"{stem}.marisa")
            masks = tuple(int(mask, 16) for mask in json.loads((directory / f"{stem}.json").read_text()))
        except (OSError, ValueError, RuntimeError) as exc:
            raise ListError(f"{directory}: compiled lists unreadable ({exc})") from None
        numbers, buffer = _map_numbers(directory / f"{stem}.bin", len(trie))
        if any(number >= len(masks) for number in numbers):
            raise ListError(f"{directory}: compiled lists truncated or of another version")
        return cls(trie, numbers, masks, buffer)


def file_sizes(directory: Path) -> int:
    """Bytes a saved table takes on disk (and at most in memory, when every page has been read)."""
    return sum(os.path.getsize(directory / name) for name in (_TRIE_FILE, _COMBINATIONS_FILE, _MASKS_FILE))


def _storable(text: str) -> str:
    """A path may hold undecodable bytes (kept as lone surrogates), which the trie cannot encode: the text's bytes
    as Latin-1 characters instead, one per byte, so a prefix stays a prefix."""
    return text if text.isascii() else text.encode("utf-8", "surrogateescape").decode("latin-1")


def _readable(key: str) -> str:
    return key if key.isascii() else key.encode("latin-1").decode("utf-8", "surrogateescape")


class UrlMatcher:
    """URL-list entries by host; a request matches an entry of its host or a parent whose path prefix starts its
    path. Keys are `host path-prefix`: a space never occurs in a host, so the trie's prefixes of `host path` are
    exactly that host's entries whose path prefix starts the path."""

    __slots__ = ("_keys",)

    def __init__(self, keys: MaskedKeys) -> None:
        self._keys = keys

    @classmethod
    def build(cls, entries: Iterable[tuple[UrlEntry, int]]) -> UrlMatcher:
        return cls(MaskedKeys.build((_storable(f"{entry.host} {entry.path_prefix}"), mask)
                                    for entry, mask in entries))

    def __len__(self) -> int:
        return len(self._keys)

    def entries(self) -> Iterator[tuple[UrlEntry, int]]:
        for key, mask in self._keys.items():
            host, _, path_prefix = _readable(key).partition(" ")
            yield UrlEntry(host, path_prefix), mask

    def has_host(self, name: str) -> bool:
        """Whether any URL rule concerns `name` or a parent: the proxy must then see inside its requests."""
        return any(self._keys.has_keys_starting(suffix + " ") for suffix in parent_domains(name))

    def lookup(self, host: str, path: str) -> int:
        found = 0
        for suffix in parent_domains(host):
            found |= self._keys.prefixes_mask(_storable(f"{suffix} {path}"))
        return found

    def save(self, directory: Path) -> None:
        self._keys.save(directory, "urls")

    @classmethod
    def open(cls, directory: Path) -> UrlMatcher:
        return cls(MaskedKeys.open(directory, "urls"))
