"""Parsers for the list formats cities use. Each reads text lines and reports bad ones as `source:line`.

A parser tolerates a bounded number of bad lines (lists in the wild carry junk) and refuses the whole list past
that bound, so that a corrupted download never silently becomes a nearly empty category.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from blocklists.errors import ListError, NameRejected
from blocklists.names import is_plain_name, normalize_domain, normalize_path, standard_ip_literal

MAX_BAD_LINES = 1000
_HOSTS_IGNORED = frozenset({"localhost", "localhost.localdomain", "local", "broadcasthost", "ip6-localhost",
                            "ip6-loopback", "0.0.0.0"})


class ListFormat(enum.Enum):
    UT1 = "ut1"
    DOMAINS = "domains"
    HOSTS = "hosts"
    ADBLOCK = "adblock"
    URLS = "urls"


@dataclass(frozen=True)
class Problem:
    source: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.message}"


@dataclass(frozen=True)
class UrlEntry:
    """A host and a path prefix: blocks that host (and its subdomains) below that path."""

    host: str
    path_prefix: str


@dataclass
class ParsedList:
    """What one list file holds, sorted by kind. Built once by a parser, then only read."""

    source: str
    domains: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    urls: list[UrlEntry] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    expressions: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    skipped: int = 0

    def report(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.source, line, message))
        if len(self.problems) > MAX_BAD_LINES:
            raise ListError(f"{self.source}: more than {MAX_BAD_LINES} bad lines (last at line {line}: {message}); "
                            "the list is refused and the last good copy keeps serving")

    def add_domain_or_address(self, line: int, raw: str) -> None:
        address = standard_ip_literal(raw)
        if address is not None:
            self.addresses.append(address)
            return
        try:
            self.domains.append(normalize_domain(raw))
        except NameRejected as exc:
            self.report(line, str(exc))


def _content_lines(lines: Iterable[str], comment_prefixes: tuple[str, ...] = ("#",)) -> Iterable[tuple[int, str]]:
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if text and not text.startswith(comment_prefixes):
            yield number, text


def parse_domains(source: str, lines: Iterable[str]) -> ParsedList:
    """One domain (or IP address) per line; `#` comments; a domain covers its subdomains."""
    parsed = ParsedList(source)
    domains, plain = parsed.domains, is_plain_name
    for number, line in enumerate(lines, start=1):
        text = line.strip().lower()
        # Lists hold millions of lines that are already canonical names: take those without the full check.
        if plain(text):
            domains.append(text)
        elif text and not text.startswith("#"):
            parsed.add_domain_or_address(number, text.split("#", 1)[0].strip())
    return parsed


def parse_hosts(source: str, lines: Iterable[str]) -> ParsedList:
    """hosts-file lines, `0.0.0.0 ads.example.com tracker.example.com`: the names after the address."""
    parsed = ParsedList(source)
    for number, text in _content_lines(lines):
        fields = text.split("#", 1)[0].split()
        if len(fields) < 2 or standard_ip_literal(fields[0]) is None:
            parsed.report(number, f"{text!r} is not a hosts line (example: 0.0.0.0 ads.example.com)")
            continue
        for name in fields[1:]:
            if name.lower() not in _HOSTS_IGNORED:
                parsed.add_domain_or_address(number, name)
    return parsed


def parse_adblock(source: str, lines: Iterable[str]) -> ParsedList:
    """Adblock-style domain rules: `||example.com^` blocks, `@@||example.com^` excepts.

    Cosmetic and path rules cannot be enforced on domains; they are counted as skipped, not reported.
    """
    parsed = ParsedList(source)
    for number, text in _content_lines(lines, ("!", "[")):
        exception = text.startswith("@@")
        rule = text[2:] if exception else text
        if "##" in rule or "#@#" in rule or "#?#" in rule:
            parsed.skipped += 1
            continue
        if not rule.startswith("||"):
            parsed.skipped += 1
            continue
        body, _, options = rule[2:].partition("$")
        host = body.rstrip("^|")
        if options or "/" in host or "*" in host:
            parsed.skipped += 1
            continue
        try:
            name = normalize_domain(host)
        except NameRejected as exc:
            parsed.report(number, str(exc))
            continue
        (parsed.exceptions if exception else parsed.domains).append(name)
    return parsed


def parse_url_line(text: str) -> UrlEntry:
    """`example.com/path` (scheme optional) → UrlEntry; raises NameRejected when the host is not a name."""
    for scheme in ("http://", "https://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme):]
            break
    host, _, path = text.partition("/")
    host = host.rsplit("@", 1)[-1].split(":", 1)[0]
    address = standard_ip_literal(host)
    return UrlEntry(address if address is not None else normalize_domain(host), normalize_path("/" + path))


def parse_urls(source: str, lines: Iterable[str]) -> ParsedList:
    """One URL prefix per line, `host/path` as in UT1's `urls` files."""
    parsed = ParsedList(source)
    for number, text in _content_lines(lines):
        try:
            parsed.urls.append(parse_url_line(text))
        except NameRejected as exc:
            parsed.report(number, str(exc))
    return parsed


LINE_PARSERS = {
    ListFormat.DOMAINS: parse_domains,
    ListFormat.HOSTS: parse_hosts,
    ListFormat.ADBLOCK: parse_adblock,
    ListFormat.URLS: parse_urls,
}
