"""rules.yaml (and the device inventory it names) → a validated `Rules`, or every problem at once.

Cross-references (profiles, schedules, groups, categories) are checked here; whether a list category exists in
its source is checked when lists are loaded (`policy.snapshot`).
"""

from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import ipaddress
import os
import re
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import yaml

from blocklists.bundled_data import BUNDLED_CATEGORIES, BUNDLED_SOURCE, SafeSearchLevel
from blocklists.errors import NameRejected
from blocklists.formats import ListFormat, parse_url_line
from blocklists.names import normalize_domain
from blocklists.update import UpdatePolicy
from policy.errors import ConfigError, ConfigProblem, Severity
from policy.model import (
    ApiSettings,
    BlockAnswer,
    Category,
    DateRange,
    Device,
    DnsSettings,
    DomainRule,
    Group,
    Holiday,
    InternalHost,
    IPAddress,
    IPNetwork,
    ListSource,
    Mode,
    Origin,
    PacMode,
    PortRange,
    Profile,
    ProxyReach,
    Rules,
    Schedule,
    ScheduleRule,
    ServerSettings,
    SocketAddress,
    TeacherSettings,
    TimeRange,
    UrlRule,
    VpnSettings,
)
from policy.state_store import StoreAddress
from policy.yaml_reader import Field, Problems, T

WEEKDAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6,
            "lun": 0, "mar": 1, "mer": 2, "jeu": 3, "ven": 4, "sam": 5, "dim": 6}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_DURATION = re.compile(r"^(?:(\d+)\s*h)?\s*(?:(\d+)\s*(?:m|min)?)?$")
TOP_KEYS = ("timezone", "server", "lists", "categories", "always_block", "background", "holidays", "devices",
            "groups", "profiles", "schedules", "vpn")


@dataclass(frozen=True)
class LoadedRules:
    rules: Rules
    warnings: tuple[ConfigProblem, ...]


def load_rules(path: Path) -> LoadedRules:
    """Read and validate rules.yaml at `path`. Raises ConfigError listing every error (warnings included)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigProblem(str(path), 0, 0, "", f"cannot read the rules file ({exc})")]) from None
    return parse_rules(text, str(path), path.parent)


def parse_rules(text: str, file: str, base_dir: Path) -> LoadedRules:
    """Validate rules given as text; relative paths in it are taken from `base_dir`."""
    problems = Problems()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        raise ConfigError([ConfigProblem(file, line, column, "", f"YAML syntax: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem(file, 0, 0, "", f"YAML: {exc}")]) from None
    if root is None:
        raise ConfigError([ConfigProblem(file, 1, 1, "", "the file is empty (start from the repository's rules.yaml)")])
    rules = _RulesReader(Field(root, "", file, problems), base_dir).read()
    if problems.has_errors or rules is None:
        raise ConfigError(problems.items)
    return LoadedRules(rules, tuple(problems.items))


def parse_duration_minutes(text: str) -> int:
    """`90m`, `1h30`, `1h30m`, `45min`, `120` → minutes."""
    match = _DURATION.match(text.strip().lower())
    if not match or not any(match.groups()):
        raise ValueError("not a duration")
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?$")
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """`512MB`, `300 MiB`, `2GB`, `1000000` → bytes."""
    match = _SIZE.match(text.strip().lower())
    if not match:
        raise ValueError("not a size")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or "b"])


def parse_cache_size(text: str) -> int:
    """A DNS cache size: at least 1MB (below that, the popular names would not stay cached)."""
    size = parse_size(text)
    if size < 10**6:
        raise ValueError("less than 1MB")
    return size


def parse_rate(text: str) -> int:
    """`1000/s`, `1000`, or `off` (0) → queries per second."""
    text = text.strip().lower()
    if text in ("off", "0"):
        return 0
    value = int(text.removesuffix("/s"))
    if value < 1:
        raise ValueError("not a rate")
    return value


def parse_workers(text: str) -> int:
    """`2`, or `auto` for one per CPU core."""
    if text.strip() == "auto":
        return os.cpu_count() or 1
    value = int(text)
    if not 1 <= value <= 64:
        raise ValueError("not between 1 and 64")
    return value


def parse_fraction(text: str) -> float:
    """`50%` or `0.5` → 0.5, between 0 and 1."""
    text = text.strip()
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 <= value <= 1:
        raise ValueError("not between 0% and 100%")
    return value


def parse_clock(text: str, *, allow_24: bool) -> int:
    """`08:30` → minutes since midnight; `24:00` only as the end of a range."""
    match = re.fullmatch(r"(\d{1,2})[:hH](\d{2})", text.strip())
    if not match:
        raise ValueError("not a time of day")
    hours, minutes = int(match.group(1)), int(match.group(2))
    if minutes > 59 or hours > 24 or (hours == 24 and (minutes or not allow_24)):
        raise ValueError("impossible time of day")
    return hours * 60 + minutes


def parse_time_range(text: str) -> TimeRange:
    start_text, sep, end_text = text.partition("-")
    if not sep:
        raise ValueError("a time range is written start-end")
    start, end = parse_clock(start_text, allow_24=False), parse_clock(end_text, allow_24=True)
    if start == end % 1440 and end != 1440:
        raise ValueError("an empty range (for the whole day, write 00:00-24:00)")
    return TimeRange(start, end)


def parse_date_range(text: str) -> DateRange:
    first_text, sep, last_text = text.partition("..")
    first = date.fromisoformat(first_text.strip())
    last = date.fromisoformat(last_text.strip()) if sep else first
    if last < first:
        raise ValueError("the range ends before it starts")
    return DateRange(first, last)


def parse_weekdays(text: str) -> set[int]:
    """`mon`, `mon-fri`, `sam` (French abbreviations too)."""
    first, sep, last = text.strip().lower().partition("-")
    if first not in WEEKDAYS or (sep and last not in WEEKDAYS):
        raise ValueError("not a day (mon tue wed thu fri sat sun, or lun mar mer jeu ven sam dim)")
    if not sep:
        return {WEEKDAYS[first]}
    start, end = WEEKDAYS[first], WEEKDAYS[last]
    return {(start + offset) % 7 for offset in range((end - start) % 7 + 1)}


def parse_network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            raise ValueError("host bits are set; write the network address") from None
        raise ValueError("not a network") from None


def parse_address(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise ValueError("not an IP address") from None


MAX_ADDRESS_RANGE = 4096  # a kiosk range or a class's tablets; a larger span is a network (CIDR) to write as one


def parse_address_range(text: str) -> tuple[IPAddress, ...]:
    """`10.99.1.10`, or a range `10.30.0.10-10.30.0.20` (both ends included, same family, at most 4096)."""
    first_text, dash, last_text = text.strip().partition("-")
    first = parse_address(first_text)
    if not dash:
        return (first,)
    last = parse_address(last_text)
    if first.version != last.version:
        raise ValueError("a range's two ends are both IPv4 or both IPv6")
    if int(last) < int(first):
        raise ValueError("a range goes from the lower address to the higher")
    if int(last) - int(first) >= MAX_ADDRESS_RANGE:
        raise ValueError(f"more than {MAX_ADDRESS_RANGE} addresses: write a network (CIDR) in `networks:`")
    return tuple(type(first)(int(first) + offset) for offset in range(int(last) - int(first) + 1))


def parse_listen(text: str) -> SocketAddress:
    return SocketAddress.parse(text)


def parse_port_range(text: str) -> PortRange:
    first, sep, last = text.strip().partition("-")
    if not first.isdigit() or (sep and not last.isdigit()):
        raise ValueError("not a port or a range of ports")
    port_range = PortRange(int(first), int(last) if sep else int(first))
    if not 0 < port_range.first <= port_range.last < 65536:
        raise ValueError("not a port or a range of ports between 1 and 65535")
    return port_range


def parse_internal_host(text: str) -> InternalHost:
    """`10.20.0.5`, `10.20.0.5:443`, `10.20.0.0/24`, `10.20.0.0/24:80`, `[2001:db8::5]:443`."""
    text = text.strip()
    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else (None if not rest else "x")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError("not address[:port] or network[:port]")
    try:
        network = ipaddress.ip_network(host, strict=True)
    except ValueError:
        raise ValueError("not address[:port] or network[:port]") from None
    return InternalHost(network, int(port) if port is not None else None)


def parse_endpoint(text: str) -> str:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("not host:port")
    return text.strip()


def parse_wireguard_key(text: str) -> str:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != 32:
        raise ValueError("not a WireGuard key (44 characters of base64)")
    return text.strip()


def parse_seconds(text: str) -> int:
    if not text.strip().isdigit() or not 0 <= int(text) <= 3600:
        raise ValueError("not a number of seconds between 0 and 3600")
    return int(text)


def parse_interface(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", text.strip()):
        raise ValueError("not an interface name")
    return text.strip()


def _domain(text: str) -> str:
    try:
        return normalize_domain(text)
    except NameRejected as exc:
        raise ValueError(str(exc).split(" is ", 1)[-1]) from None


class _RulesReader:
    def __init__(self, root: Field, base_dir: Path) -> None:
        self.root = root
        self.base_dir = base_dir
        self.file = root.file

    def read(self) -> Rules | None:
        top = self.root.mapping(TOP_KEYS, required=("groups", "profiles"))
        if not isinstance(self.root.node, yaml.MappingNode):
            return None
        timezone = self._timezone(top.get("timezone"))
        server = self._server(top.get("server"))
        lists = self._lists(top.get("lists"))
        categories = self._categories(top.get("categories"), lists)
        always_block = self._category_refs(top.get("always_block"), categories)
        background = self._category_refs(top.get("background"), categories)
        if "always_block" not in top:
            self.root.warn("no `always_block` category: DNS-over-HTTPS resolvers and VPNs would let children "
                           f"bypass the filter (add `always_block: [bypass]` with `bypass: [{BUNDLED_SOURCE}/"
                           "dns-bypass]`)")
        holidays = self._holidays(top.get("holidays"))
        profiles = self._profiles(top.get("profiles"), categories)
        schedules = self._schedules(top.get("schedules"), profiles)
        groups = self._groups(top.get("groups"), profiles, schedules)
        devices_section = top["devices"].mapping(("inventory", "unknown")) if "devices" in top else {}
        unknown_group = self._unknown(devices_section.get("unknown"), groups)
        inventory, devices = self._inventory(devices_section.get("inventory"), groups)
        vpn = self._vpn(top["vpn"], groups) if "vpn" in top else None
        self._check_used(profiles, schedules, groups, categories, always_block, background, top)
        return Rules(
            source=self.file, timezone=timezone, lists=lists, categories=categories, always_block=always_block,
            background=background, holidays=holidays, groups=groups, devices=devices,
            unknown_group=unknown_group, profiles=profiles, schedules=schedules, server=server, inventory=inventory,
            vpn=vpn,
        )

    # -- sections -----------------------------------------------------------------------------------------------

    def _timezone(self, field: Field | None) -> str:
        if field is None:
            return "Europe/Paris"

        def check(name: str) -> str:
            try:
                zoneinfo.ZoneInfo(name)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise ValueError("unknown time zone") from None
            return name

        return field.converted(check, "Europe/Paris") or "Europe/Paris"

    def _server(self, field: Field | None) -> ServerSettings:
        """The server section; paths (data_dir, the SQLite state, the API token) are taken from rules.yaml's
        directory, also when the section is absent."""
        keys = field.mapping(("dns", "proxy", "metrics", "state", "state_password_file", "data_dir", "lists", "api",
                              "teacher")) if field else {}
        defaults = ServerSettings()
        dns = self._dns(keys["dns"]) if "dns" in keys else defaults.dns
        proxy = keys["proxy"].mapping(("listen", "mode", "workers", "pac", "pac_proxies", "https_block_page",
                                       "deny_networks", "internal_hosts", "connect_ports", "http_ports")) \
            if "proxy" in keys else {}
        pac = proxy["pac"].choice(tuple(m.value for m in PacMode)) if "pac" in proxy else None
        pac_proxies = proxy["pac_proxies"].converted_items(parse_listen, "10.99.0.1:8080") \
            if "pac_proxies" in proxy else ()
        proxy_workers = proxy["workers"].converted(parse_workers, "auto") if "workers" in proxy else None
        proxy_mode = proxy["mode"].choice(("regular", "transparent")) if "mode" in proxy else None
        https_block_page = proxy["https_block_page"].boolean() if "https_block_page" in proxy else None
        metrics = keys["metrics"].mapping(("listen",)) if "metrics" in keys else {}
        data_dir = keys["data_dir"].text("/var/lib/vigie") if "data_dir" in keys else None
        data_path = self.base_dir / (data_dir or defaults.data_dir)
        state = keys["state"].converted(lambda text: StoreAddress.parse(text, self.base_dir),
                                        "sqlite:///var/state.sqlite3, redis://127.0.0.1:6379/0") \
            if "state" in keys else None
        if "state_password_file" in keys:
            password_file = keys["state_password_file"].text("/run/secrets/redis_password")
            if state is None or state.scheme != "redis":
                keys["state_password_file"].error("a password file is for a Redis store (state: redis://…)")
            elif password_file is not None:
                state = dataclasses.replace(state, password_file=str(self.base_dir / password_file))
        return ServerSettings(
            dns=dns,
            proxy_listen=(proxy["listen"].converted(parse_listen, "127.0.0.1:8080") if "listen" in proxy else None)
            or defaults.proxy_listen,
            metrics_listen=(metrics["listen"].converted(parse_listen, "127.0.0.1:9108")
                            if "listen" in metrics else None) or defaults.metrics_listen,
            proxy_mode=proxy_mode or defaults.proxy_mode,
            proxy_workers=proxy_workers or defaults.proxy_workers,
            proxy_pac=PacMode(pac) if pac else defaults.proxy_pac,
            pac_proxies=pac_proxies,
            https_block_page=defaults.https_block_page if https_block_page is None else https_block_page,
            proxy_reach=self._proxy_reach(proxy),
            state=state or StoreAddress("sqlite", str(data_path / "state.sqlite3")),
            data_dir=str(data_path),
            api=self._api(keys["api"], data_path) if "api" in keys else ApiSettings(
                token_file=str(data_path / "api-token")),
            list_updates=self._list_updates(keys["lists"]) if "lists" in keys else defaults.list_updates,
            teacher=self._teacher(keys["teacher"]) if "teacher" in keys else TeacherSettings(
                accounts=str(self.base_dir / TeacherSettings.accounts)),
        )

    def _teacher(self, field: Field) -> TeacherSettings:
        keys = field.mapping(("listen", "accounts", "allow_networks", "certificate", "key"))
        listen = keys["listen"].converted(parse_listen, "0.0.0.0:8443") if "listen" in keys else None
        accounts = keys["accounts"].text("teachers.yaml") if "accounts" in keys else None
        networks = keys["allow_networks"].converted_items(parse_network, "10.20.0.0/24") \
            if "allow_networks" in keys else ()
        certificate = keys["certificate"].text("/etc/vigie/teacher.pem") if "certificate" in keys else None
        key = keys["key"].text("/etc/vigie/teacher.key") if "key" in keys else None
        if (certificate is None) != (key is None):
            field.error("give both `certificate` and `key` (PEM files), or neither for one from Vigie's CA")
        return TeacherSettings(listen, str(self.base_dir / (accounts or TeacherSettings.accounts)), networks,
                               str(self.base_dir / certificate) if certificate else None,
                               str(self.base_dir / key) if key else None)

    @staticmethod
    def _proxy_reach(keys: dict[str, Field]) -> ProxyReach:
        defaults = ProxyReach()

        def listed(key: str, convert: Callable[[str], T], example: str, default: tuple[T, ...]) -> tuple[T, ...]:
            return keys[key].converted_items(convert, example) if key in keys else default

        return ProxyReach(
            deny_networks=listed("deny_networks", parse_network, "169.254.0.0/16", defaults.deny_networks),
            internal_hosts=listed("internal_hosts", parse_internal_host, "10.20.0.5:443", ()),
            connect_ports=listed("connect_ports", parse_port_range, "443", defaults.connect_ports),
            http_ports=listed("http_ports", parse_port_range, "80", defaults.http_ports))

    def _api(self, field: Field, data_path: Path) -> ApiSettings:
        keys = field.mapping(("listen", "token_file"))
        listen = ApiSettings.listen
        if "listen" in keys:
            text = keys["listen"].text("127.0.0.1:9180")
            listen = None if text == "off" else keys["listen"].converted(parse_listen, "127.0.0.1:9180, or off")
        token_file = keys["token_file"].text("/etc/vigie/api-token") if "token_file" in keys else None
        return ApiSettings(listen=listen,
                           token_file=str(self.base_dir / token_file) if token_file else str(data_path / "api-token"))

    def _list_updates(self, field: Field) -> UpdatePolicy:
        keys = field.mapping(("refresh", "timeout", "max_size", "max_shrink"))
        defaults = UpdatePolicy()

        def minutes(name: str, example: str) -> int | None:
            return keys[name].converted(parse_duration_minutes, example) if name in keys else None

        refresh, timeout = minutes("refresh", "24h"), minutes("timeout", "5m")
        for name, value in (("refresh", refresh), ("timeout", timeout)):
            if value == 0:
                keys[name].error(f"server.lists.{name} must be at least 1 minute")
        max_size = keys["max_size"].converted(parse_size, "512MB") if "max_size" in keys else None
        max_shrink = keys["max_shrink"].converted(parse_fraction, "50%") if "max_shrink" in keys else None
        return UpdatePolicy(
            refresh_seconds=refresh * 60 if refresh else defaults.refresh_seconds,
            timeout_seconds=timeout * 60 if timeout else defaults.timeout_seconds,
            max_bytes=max_size or defaults.max_bytes,
            max_shrink=defaults.max_shrink if max_shrink is None else max_shrink,
        )

    def _dns(self, field: Field) -> DnsSettings:
        keys = field.mapping(("listen", "upstreams", "block_answer", "blockpage_address", "max_ttl", "workers",
                              "rate_limit", "cache_size"))
        defaults = DnsSettings()
        listen = tuple(v for f in keys["listen"].items() if (v := f.converted(parse_listen, "127.0.0.1:53")))\
            if "listen" in keys else defaults.listen

        def upstream(text: str) -> SocketAddress:
            return SocketAddress.parse(text, default_port=53)

        upstreams = tuple(v for f in keys["upstreams"].items() if (v := f.converted(upstream, "9.9.9.9")))\
            if "upstreams" in keys else defaults.upstreams
        answer_text = keys["block_answer"].choice(tuple(a.value for a in BlockAnswer))\
            if "block_answer" in keys else None
        answer = BlockAnswer(answer_text) if answer_text else defaults.block_answer
        ipv4 = ipv6 = None
        for item in keys["blockpage_address"].items() if "blockpage_address" in keys else []:
            address = item.converted(parse_address, "10.0.0.5")
            if address is not None and address.version == 4:
                ipv4 = str(address)
            elif address is not None:
                ipv6 = str(address)
        if answer is BlockAnswer.BLOCKPAGE and ipv4 is None and ipv6 is None:
            (keys.get("block_answer") or field).error(
                "block_answer: blockpage needs `blockpage_address` (the proxy's address, example: [10.0.0.5])")
        max_ttl = keys["max_ttl"].converted(lambda t: parse_duration_minutes(t) * 60, "1h") if "max_ttl" in keys \
            else None
        workers = keys["workers"].converted(parse_workers, "2") if "workers" in keys else None
        rate_limit = keys["rate_limit"].converted(parse_rate, "1000/s") if "rate_limit" in keys else None
        cache_bytes = keys["cache_size"].converted(parse_cache_size, "32MB") if "cache_size" in keys else None
        return DnsSettings(listen, upstreams, answer, ipv4, ipv6, max_ttl or defaults.max_ttl_seconds,
                           workers or defaults.workers, defaults.rate_limit if rate_limit is None else rate_limit,
                           cache_bytes or defaults.cache_bytes)

    def _lists(self, field: Field | None) -> tuple[ListSource, ...]:
        sources = [ListSource(BUNDLED_SOURCE, "(bundled)", ListFormat.DOMAINS,
                              Origin(self.file, 0, 0, "bundled lists"))]
        for name, entry in field.entries("a mapping of list sources") if field else []:
            if name == BUNDLED_SOURCE:
                entry.error(f"{name!r} is reserved for the lists Vigie ships; choose another name")
                continue
            if not _NAME.match(name) or "/" in name:
                entry.error(f"{name!r} is not a list name (lower-case letters, digits, - and _)")
                continue
            keys = entry.mapping(("source", "format"), required=("source", "format"))
            location = keys["source"].text("../shared/data/ut1-blacklists.tar.gz") if "source" in keys else None
            format_name = keys["format"].choice(tuple(f.value for f in ListFormat)) if "format" in keys else None
            if location is None or format_name is None:
                continue
            if not location.startswith(("http://", "https://")):
                location = str((self.base_dir / location).resolve())
                if not Path(location).exists():
                    keys["source"].error(f"{location} does not exist (a path relative to rules.yaml, or a URL)")
            sources.append(ListSource(name, location, ListFormat(format_name), entry.origin))
        return tuple(sources)

    def _categories(self, field: Field | None, lists: tuple[ListSource, ...]) -> dict[str, Category]:
        by_name = {source.name: source for source in lists}
        categories: dict[str, Category] = {}
        for name, entry in field.entries("a mapping of categories") if field else []:
            members: list[str] = []
            for item in entry.items():
                ref = item.text("ut1/adult")
                if ref is None:
                    continue
                source_name, slash, inner = ref.partition("/")
                source = by_name.get(source_name)
                if source is None:
                    known = ", ".join(s for s in by_name)
                    item.error(f"{ref!r} names no list source (sources: {known})")
                elif source.format is ListFormat.UT1 and not inner:
                    item.error(f"{ref!r}: say which UT1 category (example: {source_name}/adult)")
                elif source.name == BUNDLED_SOURCE and inner not in BUNDLED_CATEGORIES:
                    item.error(f"{ref!r}: the bundled lists are {', '.join(BUNDLED_CATEGORIES)}")
                elif source.format is not ListFormat.UT1 and source.name != BUNDLED_SOURCE and slash:
                    item.error(f"{ref!r}: {source_name} is a single list; write just {source_name!r}")
                else:
                    members.append(ref)
            categories[name] = Category(name, tuple(members), entry.origin)
        return categories

    def _category_refs(self, field: Field | None, categories: dict[str, Category]) -> tuple[str, ...]:
        names: list[str] = []
        for item in field.items() if field else []:
            name = item.text("adult")
            if name is None:
                continue
            if name not in categories:
                item.error(f"unknown category {name!r} (categories: {', '.join(categories) or 'none defined'})")
            else:
                names.append(name)
        return tuple(names)

    def _holidays(self, field: Field | None) -> tuple[Holiday, ...]:
        holidays: list[Holiday] = []
        for item in field.items(single_allowed=False) if field else []:
            keys = item.mapping(("name", "from", "to", "date"), required=("name",))
            name = keys["name"].text("Vacances de Noël") if "name" in keys else None
            if "date" in keys:
                dates = keys["date"].converted(parse_date_range, "2026-11-11")
            elif "from" in keys and "to" in keys:
                first = keys["from"].converted(date.fromisoformat, "2026-12-19")
                last = keys["to"].converted(date.fromisoformat, "2027-01-03")
                dates = None
                if first and last:
                    if last < first:
                        keys["to"].error("ends before it starts")
                    else:
                        dates = DateRange(first, last)
            else:
                item.error("a holiday has `date:` or `from:` and `to:`")
                continue
            if name and dates:
                holidays.append(Holiday(name, dates))
        return tuple(holidays)

    def _profiles(self, field: Field | None, categories: dict[str, Category]) -> dict[str, Profile]:
        profiles: dict[str, Profile] = {}
        known = ("mode", "block", "allow", "deny", "allow_urls", "deny_urls", "safe_search", "search_portal",
                 "block_ip_literals", "screen_time", "message")
        for name, entry in field.entries("a mapping of profiles") if field else []:
            keys = entry.mapping(known)
            mode_text = keys["mode"].choice(tuple(m.value for m in Mode)) if "mode" in keys else "filtered"
            safe_text = keys["safe_search"].choice(tuple(s.value for s in SafeSearchLevel)) \
                if "safe_search" in keys else "strict"
            portal = keys["search_portal"].converted(_domain, "junior.qwant.com") if "search_portal" in keys else None
            screen = keys["screen_time"].converted(parse_duration_minutes, "90m") if "screen_time" in keys else None
            ip_literals = keys["block_ip_literals"].boolean() if "block_ip_literals" in keys else None
            mode = Mode(mode_text) if mode_text else Mode.FILTERED
            if mode is not Mode.FILTERED and "block" in keys:
                keys["block"].warn(f"mode {mode.value} blocks everything not allowed: `block` has no effect")
            profiles[name] = Profile(
                name=name,
                mode=mode,
                block=self._category_refs(keys.get("block"), categories),
                allow=self._domain_rules(keys.get("allow")),
                deny=self._domain_rules(keys.get("deny")),
                allow_urls=self._url_rules(keys.get("allow_urls")),
                deny_urls=self._url_rules(keys.get("deny_urls")),
                safe_search=SafeSearchLevel(safe_text) if safe_text else SafeSearchLevel.STRICT,
                search_portal=portal,
                block_ip_literals=True if ip_literals is None else ip_literals,
                screen_time_minutes=screen,
                message=(keys["message"].text("Ce site n'est pas autorisé en classe.") or "") if "message" in keys
                else "",
                origin=entry.origin,
            )
        return profiles

    def _domain_rules(self, field: Field | None) -> tuple[DomainRule, ...]:
        rules = []
        for item in field.items() if field else []:
            domain = item.converted(_domain, "example.fr")
            if domain:
                rules.append(DomainRule(domain, item.origin))
        return tuple(rules)

    def _url_rules(self, field: Field | None) -> tuple[UrlRule, ...]:
        rules = []

        def url(text: str) -> UrlRule:
            try:
                entry = parse_url_line(text.strip())
            except NameRejected:
                raise ValueError("not a host/path prefix") from None
            return UrlRule(entry.host, entry.path_prefix, item.origin)

        for item in field.items() if field else []:
            rule = item.converted(url, "youtube.com/shorts")
            if rule:
                rules.append(rule)
        return tuple(rules)

    def _schedules(self, field: Field | None, profiles: dict[str, Profile]) -> dict[str, Schedule]:
        schedules: dict[str, Schedule] = {}
        for name, entry in field.entries("a mapping of schedules") if field else []:
            keys = entry.mapping(("default", "rules"), required=("default",))
            default = self._profile_ref(keys.get("default"), profiles)
            rules: list[ScheduleRule] = []
            for item in keys["rules"].items(single_allowed=False) if "rules" in keys else []:
                rule = self._schedule_rule(item, profiles)
                if rule:
                    rules.append(rule)
            if default:
                schedules[name] = Schedule(name, tuple(rules), default, entry.origin)
        return schedules

    def _schedule_rule(self, item: Field, profiles: dict[str, Profile]) -> ScheduleRule | None:
        keys = item.mapping(("profile", "days", "time", "dates", "holidays"), required=("profile",))
        profile = self._profile_ref(keys.get("profile"), profiles)
        weekdays: set[int] | None = None
        if "days" in keys:
            weekdays = set()
            for day in keys["days"].items():
                weekdays |= day.converted(parse_weekdays, "mon-fri") or set()
        times = tuple(t for f in keys["time"].items() if (t := f.converted(parse_time_range, "08:30-16:30"))) \
            if "time" in keys else ()
        dates = tuple(d for f in keys["dates"].items() if (d := f.converted(parse_date_range, "2026-12-24")))\
            if "dates" in keys else ()
        on_holidays = keys["holidays"].boolean() if "holidays" in keys else None
        if not profile:
            return None
        return ScheduleRule(profile, frozenset(weekdays) if weekdays is not None else None, times, dates,
                            on_holidays, item.origin)

    def _profile_ref(self, field: Field | None, profiles: dict[str, Profile]) -> str | None:
        if field is None:
            return None
        name = field.text("ecole")
        if name is not None and name not in profiles:
            field.error(f"unknown profile {name!r} (profiles: {', '.join(profiles) or 'none defined'})")
            return None
        return name

    def _groups(self, field: Field | None, profiles: dict[str, Profile],
                schedules: dict[str, Schedule]) -> dict[str, Group]:
        groups: dict[str, Group] = {}
        claimed: list[tuple[IPNetwork, str, Field]] = []
        addresses_seen: dict[IPAddress, str] = {}
        for name, entry in field.entries("a mapping of groups") if field else []:
            keys = entry.mapping(("networks", "addresses", "schedule", "profile", "pac"))
            pac = keys["pac"].choice(tuple(m.value for m in PacMode)) if "pac" in keys else None
            networks: list[IPNetwork] = []
            for item in keys["networks"].items() if "networks" in keys else []:
                network = item.converted(parse_network, "10.20.1.0/24")
                if network is None:
                    continue
                for other, other_group, _ in claimed:
                    if network.version == other.version and network.overlaps(other):
                        where = "this group" if other_group == name else f"group {other_group!r}"
                        item.error(f"{network} overlaps {other} of {where}: a client must belong to one group")
                        break
                else:
                    claimed.append((network, name, item))
                    networks.append(network)
            addresses: list[IPAddress] = []
            for item in keys["addresses"].items() if "addresses" in keys else []:
                for address in item.converted(parse_address_range, "10.99.1.10, or 10.30.0.10-10.30.0.20") or ():
                    if address in addresses_seen:
                        item.error(f"{address} is already a member of group {addresses_seen[address]!r}")
                        break
                    addresses_seen[address] = name
                    addresses.append(address)
            schedule = profile = None
            if "schedule" in keys and "profile" in keys:
                entry.error("a group has either `schedule:` or a fixed `profile:`, not both")
            elif "schedule" in keys:
                schedule = keys["schedule"].text("elementaire")
                if schedule is not None and schedule not in schedules:
                    keys["schedule"].error(f"unknown schedule {schedule!r} "
                                           f"(schedules: {', '.join(schedules) or 'none defined'})")
                    schedule = None
            elif "profile" in keys:
                profile = self._profile_ref(keys["profile"], profiles)
            else:
                entry.error("a group needs a `schedule:` or a fixed `profile:`")
            if schedule is None and profile is None:
                continue
            groups[name] = Group(name, tuple(networks), tuple(addresses), schedule, profile, entry.origin,
                                 PacMode(pac) if pac else None)
        return groups

    def _vpn(self, field: Field, groups: dict[str, Group]) -> VpnSettings | None:
        keys = field.mapping(("network", "address", "endpoint", "public_key", "route", "keepalive", "interface"),
                             required=("network", "address", "endpoint", "public_key"))
        network = keys["network"].converted(parse_network, "10.99.0.0/16") if "network" in keys else None
        address = keys["address"].converted(parse_address, "10.99.0.1") if "address" in keys else None
        endpoint = keys["endpoint"].converted(parse_endpoint, "vpn.ville.example:51820") \
            if "endpoint" in keys else None
        public_key = keys["public_key"].converted(parse_wireguard_key, "the output of `wg pubkey`") \
            if "public_key" in keys else None
        route = keys["route"].choice(("vigie", "all")) if "route" in keys else "vigie"
        keepalive = keys["keepalive"].converted(parse_seconds, "25") if "keepalive" in keys else 25
        interface = keys["interface"].converted(parse_interface, "wg0") if "interface" in keys else "wg0"
        if network is not None and address is not None and address not in network:
            keys["address"].error(f"{address} is outside vpn.network {network}: Vigie's tunnel address is one of "
                                  "the tunnel's")
        if network is None or address is None or endpoint is None or public_key is None or route is None \
                or keepalive is None or interface is None:
            return None
        vpn = VpnSettings(network, address, endpoint, public_key, route, keepalive, interface, field.origin)
        for group in groups.values():
            if any(address in subnet for subnet in vpn.group_ranges(group)):
                keys["address"].error(f"{address} is inside group {group.name!r}'s network: keep Vigie's tunnel "
                                      "address out of the classes' ranges")
        if not any(vpn.group_ranges(group) for group in groups.values()):
            field.warn(f"no group has a network inside vpn.network {network}: `vigie devices enroll` needs one "
                       "(example: `networks: [10.20.3.0/24, 10.99.1.128/26]`)")
        return vpn

    def _unknown(self, field: Field | None, groups: dict[str, Group]) -> str | None:
        if field is None:
            return None
        value = field.text("refuse")
        if value is None or value == "refuse":
            return None
        if value not in groups:
            field.error(f"{value!r} is neither `refuse` nor a group (groups: {', '.join(groups)})")
            return None
        return value

    def _inventory(self, field: Field | None, groups: dict[str, Group]) -> tuple[str | None, tuple[Device, ...]]:
        if field is None:
            return None, ()
        relative = field.text("devices.csv")
        if relative is None:
            return None, ()
        path = (self.base_dir / relative).resolve()
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            field.error(f"cannot read the inventory {path} ({exc})")
            return str(path), ()
        problems = field.problems
        devices = read_inventory(text, str(path), groups, problems)
        return str(path), devices

    def _check_used(self, profiles: dict[str, Profile], schedules: dict[str, Schedule], groups: dict[str, Group],
                    categories: dict[str, Category], always_block: tuple[str, ...], background: tuple[str, ...],
                    top: dict[str, Field]) -> None:
        used_profiles = {g.profile for g in groups.values()}
        for schedule in schedules.values():
            used_profiles.add(schedule.default)
            used_profiles.update(rule.profile for rule in schedule.rules)
        for name, profile in profiles.items():
            if name not in used_profiles:
                self._warn_at(profile.origin, f"profile {name!r} is used by no group or schedule")
        used_schedules = {g.schedule for g in groups.values()}
        for name, schedule in schedules.items():
            if name not in used_schedules:
                self._warn_at(schedule.origin, f"schedule {name!r} is used by no group")
        used_categories = set(always_block) | set(background)
        for profile in profiles.values():
            used_categories.update(profile.block)
        for name, category in categories.items():
            if name not in used_categories:
                self._warn_at(category.origin, f"category {name!r} is blocked by no profile")
        for name, group in groups.items():
            if not group.networks and not group.addresses and "devices" not in top:
                self._warn_at(group.origin, f"group {name!r} has no networks, addresses or devices")

    def _warn_at(self, origin: Origin, message: str) -> None:
        self.root.problems.add(origin.file, origin.line, origin.column, origin.path, message, Severity.WARNING)


INVENTORY_COLUMNS = ("name", "addresses", "group", "credential")


def read_inventory(text: str, file: str, groups: dict[str, Group], problems: Problems) -> tuple[Device, ...]:
    """The MDM export: `name,addresses,group[,credential]`, `,` or `;` separated, addresses split by space or `|`."""
    lines = text.splitlines()
    if not lines:
        return ()
    delimiter = ";" if lines[0].count(";") > lines[0].count(",") else ","
    reader = csv.reader(lines, delimiter=delimiter)
    header = [cell.strip().lower() for cell in next(reader)]
    missing = [c for c in INVENTORY_COLUMNS[:3] if c not in header]
    if missing:
        problems.add(file, 1, 1, "header", f"missing column(s) {', '.join(missing)} "
                     f"(expected: {delimiter.join(INVENTORY_COLUMNS)})")
        return ()
    index = {name: header.index(name) for name in INVENTORY_COLUMNS if name in header}
    devices: list[Device] = []
    names: dict[str, int] = {}
    addresses: dict[IPAddress, str] = {}
    group_addresses = {a: g.name for g in groups.values() for a in g.addresses}
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue

        def cell(column: str, row: list[str] = row) -> str:
            position = index.get(column)
            return row[position].strip() if position is not None and position < len(row) else ""

        def report(message: str, line: int = line) -> None:
            problems.add(file, line, 1, "", message)

        name, group = cell("name"), cell("group")
        if not name:
            report("a device needs a name")
            continue
        if name in names:
            report(f"device {name!r} is already listed at line {names[name]}: a device belongs to one group")
            continue
        names[name] = line
        if group not in groups:
            report(f"device {name!r}: unknown group {group!r} (groups: {', '.join(groups)})")
            continue
        device_addresses: list[IPAddress] = []
        for raw in re.split(r"[\s|]+", cell("addresses")):
            if not raw:
                continue
            try:
                address = parse_address(raw)
            except ValueError:
                report(f"device {name!r}: {raw!r} is not an IP address (example: 10.99.1.10)")
                continue
            owner = addresses.get(address) or (
                f"group {group_addresses[address]!r}" if address in group_addresses else None)
            if owner:
                report(f"device {name!r}: {address} already belongs to {owner}")
                continue
            addresses[address] = f"device {name!r}"
            device_addresses.append(address)
        credential = cell("credential") or None
        if credential is not None and ":" not in credential:
            report(f"device {name!r}: credential must be user:password")
            credential = None
        devices.append(Device(name, tuple(device_addresses), group, credential,
                              Origin(file, line, 1, f"device {name}")))
    return tuple(devices)
