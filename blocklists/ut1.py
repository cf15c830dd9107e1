"""The UT1 Toulouse lists, from the official archive (`blacklists.tar.gz`) or an unpacked directory.

Layout: `blacklists/<category>/{domains,urls,expressions,usage}`, `blacklists/global_usage` (names and descriptions),
and categories that are symbolic links to others (`porn -> adult`): those become aliases.
"""

from __future__ import annotations

import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from blocklists.errors import ListError
from blocklists.formats import ParsedList, parse_domains, parse_urls

_LIST_FILES = ("domains", "urls", "expressions", "usage")
MAX_MEMBER_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class CategoryInfo:
    """What global_usage says of a category: its names and descriptions by language (`fr`, `en`)."""

    name: str
    default_type: str = "black"
    titles: dict[str, str] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)


@dataclass
class Ut1Collection:
    source: str
    categories: dict[str, ParsedList] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    info: dict[str, CategoryInfo] = field(default_factory=dict)

    def resolve(self, category: str) -> str | None:
        """The real category behind `category` (following aliases), or None when there is none."""
        real = self.aliases.get(category, category)
        return real if real in self.categories else None


def parse_global_usage(text: str) -> dict[str, CategoryInfo]:
    """Blocks of `KEY: value` lines separated by blank lines; `NAME:` opens a block."""
    infos: dict[str, CategoryInfo] = {}
    current: CategoryInfo | None = None
    for line in text.splitlines():
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        key, value = key.strip().upper(), value.strip()
        if key == "NAME":
            current = CategoryInfo(value)
            infos[value] = current
        elif current is None:
            continue
        elif key == "DEFAULT_TYPE":
            current = CategoryInfo(current.name, value, current.titles, current.descriptions)
            infos[current.name] = current
        elif key.startswith("NAME "):
            current.titles[key[5:].lower()] = value
        elif key.startswith("DESC "):
            current.descriptions[key[5:].lower()] = value
    return infos


def _add_file(collection: Ut1Collection, category: str, kind: str, source: str, text: str) -> None:
    parsed = collection.categories.setdefault(category, ParsedList(f"{collection.source}:{category}"))
    lines = text.splitlines()
    if kind == "domains":
        found = parse_domains(source, lines)
        parsed.domains.extend(found.domains)
        parsed.addresses.extend(found.addresses)
    elif kind == "urls":
        found = parse_urls(source, lines)
        parsed.urls.extend(found.urls)
    elif kind == "expressions":
        parsed.expressions.extend(line.strip() for line in lines if line.strip() and not line.startswith("#"))
        return
    else:
        return
    parsed.problems.extend(found.problems)


def _member_category(name: str) -> tuple[str, str] | None:
    """`blacklists/adult/domains` → (`adult`, `domains`); None for anything else."""
    parts = name.strip("/").split("/")
    if parts and parts[0] in ("blacklists", "."):
        parts = parts[1:]
    if len(parts) == 2 and parts[1] in _LIST_FILES:
        return parts[0], parts[1]
    return None


def _check_member(member: tarfile.TarInfo, archive: str) -> None:
    name = member.name
    normalized = posixpath.normpath(name)
    if name.startswith("/") or normalized.startswith("..") or "/../" in f"/{name}/":
        raise ListError(f"{archive}: member {name!r} leaves the archive; the archive is refused")
    if member.issym() or member.islnk():
        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), member.linkname))
        if member.linkname.startswith("/") or target.startswith(".."):
            raise ListError(f"{archive}: link {name!r} -> {member.linkname!r} leaves the archive; "
                            "the archive is refused")
    if member.isfile() and member.size > MAX_MEMBER_BYTES:
        raise ListError(f"{archive}: member {name!r} is {member.size} bytes, over the {MAX_MEMBER_BYTES} limit")
    if member.isdev() or member.isfifo():
        raise ListError(f"{archive}: member {name!r} is a device or FIFO; the archive is refused")


def read_ut1_archive(path: Path) -> Ut1Collection:
    """Read `blacklists.tar.gz` without extracting it; refuses archives with members that leave it."""
    collection = Ut1Collection(str(path))
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                _check_member(member, str(path))
                parts = member.name.strip("/").split("/")
                if parts and parts[0] == "blacklists":
                    parts = parts[1:]
                if member.issym() and len(parts) == 1:
                    collection.aliases[parts[0]] = posixpath.basename(member.linkname.rstrip("/"))
                    continue
                if not member.isfile():
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                text = handle.read().decode("utf-8", errors="replace")
                if parts == ["global_usage"]:
                    collection.info = parse_global_usage(text)
                    continue
                found = _member_category(member.name)
                if found is not None:
                    _add_file(collection, found[0], found[1], f"{path}:{member.name}", text)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ListError(f"{path}: cannot read the UT1 archive ({exc})") from None
    if not collection.categories:
        raise ListError(f"{path}: no UT1 category found (expected blacklists/<category>/domains)")
    return collection


def read_ut1_directory(path: Path) -> Ut1Collection:
    """Read an unpacked UT1 tree (the directory that holds the category folders, or its parent)."""
    root = path / "blacklists" if (path / "blacklists").is_dir() else path
    collection = Ut1Collection(str(path))
    try:
        for entry in sorted(root.iterdir()):
            if entry.is_symlink() and entry.is_dir():
                collection.aliases[entry.name] = Path(entry.readlink()).name
            elif entry.is_dir():
                for kind in _LIST_FILES:
                    file = entry / kind
                    if file.is_file():
                        _add_file(collection, entry.name, kind, str(file),
                                  file.read_text(encoding="utf-8", errors="replace"))
            elif entry.name == "global_usage":
                collection.info = parse_global_usage(entry.read_text(encoding="utf-8", errors="replace"))
    except OSError as exc:
        raise ListError(f"{path}: cannot read the UT1 directory ({exc})") from None
    if not collection.categories:
        raise ListError(f"{path}: no UT1 category found (expected <category>/domains)")
    return collection


def read_ut1(path: Path) -> Ut1Collection:
    return read_ut1_directory(path) if path.is_dir() else read_ut1_archive(path)
