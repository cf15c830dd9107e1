"""The compiled lists on disk: `<data_dir>/compiled/<key>/`, keyed by the sources' content and the categories used.

A restart, another worker or another service on the same server finds the lists already compiled and maps them
(≈ milliseconds) instead of parsing millions of lines. A directory is written beside its final name and renamed
into place, so a reader never sees half of one; old ones are pruned (a process still mapping one keeps its pages).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from blocklists.errors import ListError
from blocklists.formats import Problem
from blocklists.matcher import DomainTable, MaskedKeys, UrlMatcher
from blocklists.sources import CategoryStats, CompiledLists, compile_expressions
from blocklists.ut1 import CategoryInfo

log = logging.getLogger(__name__)

# Bump when the layout of a compiled directory changes: older ones are then never read, only pruned.
FORMAT_VERSION = 3  # 2: URL prefixes in normalize_path's form; 3: URL prefixes and addresses in tries
KEEP_COMPILED = 3
_META_FILE = "lists.json"


def content_digest(path: Path) -> str:
    """SHA-256 of a list file, or of a directory tree (relative names, link targets and contents)."""
    digest = hashlib.sha256()
    if path.is_dir():
        for entry in sorted(path.rglob("*")):
            digest.update(str(entry.relative_to(path)).encode() + b"\0")
            if entry.is_symlink():
                digest.update(b"->" + os.readlink(entry).encode() + b"\0")
            elif entry.is_file():
                _digest_file(digest, entry)
    else:
        _digest_file(digest, path)
    return digest.hexdigest()


def _digest_file(digest: hashlib._Hash, path: Path) -> None:
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)


def compiled_key(used_refs: list[str], digests: Mapping[str, str]) -> str:
    """The name of the compiled directory for these categories of these source contents."""
    text = json.dumps([FORMAT_VERSION, sorted(used_refs), sorted(digests.items())])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class CompiledStore:
    """`<data_dir>/compiled`: save, open and prune compiled lists."""

    def __init__(self, data_dir: str | Path) -> None:
        self.directory = Path(data_dir) / "compiled"

    def open(self, key: str) -> CompiledLists | None:
        """The compiled lists saved under `key`, or None when there are none (or they are unreadable)."""
        directory = self.directory / key
        if not (directory / _META_FILE).exists():
            return None
        try:
            compiled = _read(directory)
        except ListError as exc:
            log.warning("%s; compiling the lists again", exc)
            return None
        os.utime(directory)  # most recently used: pruned last
        return compiled

    def save(self, key: str, compiled: CompiledLists) -> CompiledLists:
        """Write `compiled` under `key` and return it mapped from there; on a write failure (read-only or full
        disk) log it and return `compiled` as it is, still in memory."""
        final = self.directory / key
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.directory))
            try:
                _write(compiled, staging)
                os.replace(staging, final)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
                if not (final / _META_FILE).exists():  # else another process saved the same lists first
                    raise
            self.prune(keep=key)
            return _read(final)
        except (OSError, ListError) as exc:
            log.warning("cannot save the compiled lists in %s (%s); they stay in memory for this process",
                        self.directory, exc)
            return compiled

    def prune(self, keep: str) -> None:
        """Remove all but the KEEP_COMPILED most recently used directories, and staging left by a crash."""
        entries = [p for p in self.directory.iterdir() if p.is_dir()]
        finished = sorted((p for p in entries if not p.name.startswith(".") and p.name != keep),
                          key=_mtime, reverse=True)
        abandoned = [p for p in entries if p.name.startswith(".") and time.time() - _mtime(p) > 3600]
        for entry in finished[KEEP_COMPILED - 1:] + abandoned:
            shutil.rmtree(entry, ignore_errors=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _write(compiled: CompiledLists, directory: Path) -> None:
    compiled.domains.save(directory)
    compiled.urls.save(directory)
    compiled.addresses.save(directory, "addresses")
    meta = {
        "bits": {ref: bit.bit_length() - 1 for ref, bit in compiled.bits.items()},
        "aliases": dict(compiled.aliases),
        "expressions": [[pattern.pattern, hex(bit)] for pattern, bit in compiled.expressions],
        "stats": [[s.ref, s.domains, s.urls, s.addresses, s.expressions] for s in compiled.stats],
        "info": {ref: [i.name, i.default_type, i.titles, i.descriptions] for ref, i in compiled.info.items()},
        "problems": [[p.source, p.line, p.message] for p in compiled.problems],
    }
    (directory / _META_FILE).write_text(json.dumps(meta), encoding="utf-8")


def _read(directory: Path) -> CompiledLists:
    try:
        meta = json.loads((directory / _META_FILE).read_text(encoding="utf-8"))
        problems: list[Problem] = []
        expressions: list[tuple[re.Pattern[str], int]] = []
        for text, bit in meta["expressions"]:
            expressions.extend(compile_expressions("compiled", (text,), int(bit, 16), problems))
        return CompiledLists(
            bits={ref: 1 << index for ref, index in meta["bits"].items()},
            aliases=meta["aliases"],
            domains=DomainTable.open(directory),
            urls=UrlMatcher.open(directory),
            addresses=MaskedKeys.open(directory, "addresses"),
            expressions=tuple(expressions),
            stats=tuple(CategoryStats(*row) for row in meta["stats"]),
            info={ref: CategoryInfo(*row) for ref, row in meta["info"].items()},
            problems=tuple(Problem(*row) for row in meta["problems"]),
            mapped_from=directory,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ListError(f"{directory}: compiled lists unreadable ({exc})") from None
