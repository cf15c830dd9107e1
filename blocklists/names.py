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
    """The canonical text of `raw` when it is an IP address in any spelling a browser or `inet_aton` accepts, else
    None: `2130706433`, `0x7f000001`, `0177.0.0.1` and `127.1` are all `127.0.0.1`; `[::ffff:7f00:1]` is
    `127.0.0.1` too (an IPv4-mapped address reaches the IPv4 host); an IPv6 zone (`%eth0`) is dropped."""
    address = parse_ip(raw)
    return None if address is None else str(address)


def standard_ip_literal(raw: str) -> str | None:
    """The canonical text of `raw` when it is an address written the standard way (dotted quad, RFC 4291 IPv6), as
    list files write them; else None."""
    text = raw.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text or not (text[0].isdigit() or ":" in text):
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def parse_ip(raw: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`raw` as an address (see ip_literal), or None when it is no address."""
    text = raw.strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            v6 = ipaddress.IPv6Address(text.partition("%")[0])
        except ValueError:
            return None
        return v6.ipv4_mapped or v6
    value = _ipv4_number(text)
    return None if value is None else ipaddress.IPv4Address(value)


def ends_in_number(name: str) -> bool:
    """Whether a browser reads `name` as an IPv4 address (WHATWG URL: its last label is a number, decimal or
    `0x` hex): such a name is an address or an error, never a domain."""
    last = name.rstrip(".").rpartition(".")[2]
    return bool(last) and (last.isdigit() or bool(_HEX_LABEL.match(last)))


_HEX_LABEL = re.compile(r"^0x[0-9a-f]*$")


def _ipv4_number(text: str) -> int | None:
    """The WHATWG URL IPv4 parser (as browsers and glibc's inet_aton read it): one to four parts, each decimal,
    `0x` hex or `0` octal, the last one filling the bytes left."""
    if not text or not ends_in_number(text):
        return None
    parts = text[:-1].split(".") if text.endswith(".") else text.split(".")
    if len(parts) > 4:
        return None
    numbers: list[int] = []
    for part in parts:
        try:
            if part[:2] == "0x":
                numbers.append(int(part[2:] or "0", 16))
            elif len(part) > 1 and part[0] == "0":
                numbers.append(int(part[1:], 8))
            else:
                numbers.append(int(part, 10))
        except ValueError:
            return None
        if not part.replace("x", "").isalnum():
            return None  # int() also reads "+1", " 1" and "1_0"
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        return None
    value = last
    for index, number in enumerate(head):
        value += number << (8 * (3 - index))
    return value


def normalize_host(raw: str) -> str:
    """A host as every front and `vigie explain` decide on it: an address in canonical text, or a canonical name.

    Raises NameRejected when `raw` is neither, including a name a browser would read as a broken address
    (`1.2.3.256`, `example.0x`)."""
    literal = ip_literal(raw)
    if literal is not None:
        return literal
    name = normalize_domain(raw)
    if ends_in_number(name):
        raise NameRejected(f"{raw!r} is neither a domain name nor an IP address")
    return name


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
