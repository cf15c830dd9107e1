"""Domain names as the engine sees them: lower-case IDNA (punycode) `str`, no trailing dot, normalised once."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import unquote

from blocklists.errors import NameRejected

MAX_NAME_LENGTH = 253
# Underscores appear in real names (_dmarc, service records, some CDNs), so they are accepted.
_ASCII_NAME = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))*$")


def normalize_domain(raw: str) -> str:
    """Return the canonical form of `raw` (case folded, trailing dot removed, IDN to punycode).

    Raises NameRejected when `raw` cannot be a host name.
    """
    name = raw.strip().rstrip(".").lower()
    if name.startswith("*."):
        name = name[2:]
    if name.startswith("."):
        name = name[1:]
    if not name:
        raise NameRejected(f"{raw!r} is empty")
    if not name.isascii():
        try:
            name = ".".join(label.encode("idna").decode("ascii") for label in name.split("."))
        except UnicodeError as exc:
            raise NameRejected(f"{raw!r} is not a valid international domain name ({exc})") from None
    if len(name) > MAX_NAME_LENGTH or not _ASCII_NAME.match(name):
        raise NameRejected(f"{raw!r} is not a domain name (example: www.example.fr)")
    return name


def is_plain_name(text: str) -> bool:
    """Whether `text` is already a canonical name (and not an IPv4 address, whose last label is all digits)."""
    return (len(text) <= MAX_NAME_LENGTH and _ASCII_NAME.match(text) is not None
            and not text[text.rfind(".") + 1:].isdigit())


def parent_domains(name: str) -> list[str]:
    """`a.b.example.fr` → [`a.b.example.fr`, `b.example.fr`, `example.fr`, `fr`]: the suffixes a rule may match."""
    suffixes = [name]
    index = name.find(".")
    while index != -1:
        suffixes.append(name[index + 1 :])
        index = name.find(".", index + 1)
    return suffixes


def ip_literal(raw: str) -> str | None:
    """The canonical text of `raw` when it is an IPv4 or IPv6 address (brackets allowed), else None."""
    text = raw.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text or not (text[0].isdigit() or ":" in text):
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def normalize_path(raw: str) -> str:
    """A URL path (with its query) in the one form URL lists are matched in, so that spellings a web server reads
    alike match alike: `%61dult`, `/./adult`, `/x/../adult`, `//adult`, `\\adult` and `/ADULT` all become `/adult`.

    Percent-escapes are decoded once (as servers do; `%252e` stays the literal `%2e`), backslashes read as slashes,
    repeated slashes collapse, dot segments resolve (RFC 3986 §5.2.4), and the whole is lower-cased — as squidGuard
    does for the UT1 lists: a list entry matches every case of its path. The fragment never reaches a server."""
    path, _, query = raw.partition("#")[0].partition("?")
    path = unquote(path, errors="replace").replace("\\", "/")
    segments: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    trailing = "/" if path.endswith(("/", "/.", "/..")) and segments else ""
    normalized = "/" + "/".join(segments) + trailing
    if query or raw.partition("#")[0].endswith("?"):
        normalized += "?" + unquote(query, errors="replace")
    return normalized.lower()
