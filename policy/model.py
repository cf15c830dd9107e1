"""The validated rules: typed, frozen values built by `policy.loader` from rules.yaml and the device inventory."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from blocklists.bundled_data import SafeSearchLevel
from blocklists.formats import ListFormat
from blocklists.update import UpdatePolicy
from policy.state_store import StoreAddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Origin:
    """Where a value was written: shown in `vigie check` errors and in every decision's explanation."""

    file: str
    line: int
    column: int
    path: str

    def __str__(self) -> str:
        return f"{self.path} ({Path(self.file).name}:{self.line})"


class Mode(enum.Enum):
    FILTERED = "filtered"
    ALLOWLIST_ONLY = "allowlist-only"
    BLOCK_ALL = "block-all"


class BlockAnswer(enum.Enum):
    NXDOMAIN = "nxdomain"
    NULL = "null"
    BLOCKPAGE = "blockpage"


class PacMode(enum.Enum):
    """What the proxy auto-configuration file sends to the proxy: every request, or only the hosts the proxy has
    something to do with for the client's group (the rest DIRECT, filtered by DNS)."""

    ALL = "all"
    SELECTIVE = "selective"


@dataclass(frozen=True)
class ListSource:
    name: str
    location: str
    format: ListFormat
    origin: Origin


@dataclass(frozen=True)
class Category:
    """A category profiles can block: the union of list categories (`adult: [ut1/adult, ut1/mixed_adult]`)."""

    name: str
    members: tuple[str, ...]
    origin: Origin


@dataclass(frozen=True)
class DomainRule:
    domain: str
    origin: Origin


@dataclass(frozen=True)
class UrlRule:
    host: str
    path_prefix: str
    origin: Origin


@dataclass(frozen=True)
class Profile:
    name: str
    mode: Mode
    block: tuple[str, ...]
    allow: tuple[DomainRule, ...]
    deny: tuple[DomainRule, ...]
    allow_urls: tuple[UrlRule, ...]
    deny_urls: tuple[UrlRule, ...]
    safe_search: SafeSearchLevel
    search_portal: str | None
    block_ip_literals: bool
    screen_time_minutes: int | None
    message: str
    origin: Origin


@dataclass(frozen=True)
class TimeRange:
    """Minutes of the day, `end` exclusive; `end <= start` means the range runs past midnight."""

    start: int
    end: int

    @property
    def crosses_midnight(self) -> bool:
        return self.end <= self.start

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"


@dataclass(frozen=True)
class DateRange:
    first: date
    last: date

    def __contains__(self, day: object) -> bool:
        return isinstance(day, date) and self.first <= day <= self.last


@dataclass(frozen=True)
class Holiday:
    name: str
    dates: DateRange


@dataclass(frozen=True)
class ScheduleRule:
    """One line of a schedule: conditions that must all hold, and the profile then in force.

    A range past midnight belongs to the day it starts: Friday 20:00-07:00 covers Saturday 03:00.
    """

    profile: str
    weekdays: frozenset[int] | None
    times: tuple[TimeRange, ...]
    dates: tuple[DateRange, ...]
    on_holidays: bool | None
    origin: Origin


@dataclass(frozen=True)
class Schedule:
    name: str
    rules: tuple[ScheduleRule, ...]
    default: str
    origin: Origin


@dataclass(frozen=True)
class Group:
    name: str
    networks: tuple[IPNetwork, ...]
    addresses: tuple[IPAddress, ...]
    schedule: str | None
    profile: str | None
    origin: Origin
    pac: PacMode | None = None  # None: server.proxy.pac


@dataclass(frozen=True)
class Device:
    name: str
    addresses: tuple[IPAddress, ...]
    group: str
    credential: str | None
    origin: Origin


@dataclass(frozen=True)
class SocketAddress:
    """An IP address and a port (`127.0.0.1:5353`, `[::1]:53`), read once from rules.yaml or the command line."""

    host: str  # the address in canonical text, without brackets
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, default_port: int | None = None) -> SocketAddress:
        """`10.0.0.5:53`, `[2001:db8::5]:53`; with `default_port`, also `10.0.0.5` and `2001:db8::5`. Raises
        ValueError."""
        text = text.strip()
        host, port = text, None
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else (None if not rest else "?")
        elif text.count(":") == 1:
            host, _, port = text.partition(":")
        if port is None and default_port is not None:
            port = str(default_port)
        if port is None or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("not address:port")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("not an IP address and port (example: 127.0.0.1:53)") from None
        return cls(str(address), int(port))


@dataclass(frozen=True)
class DnsSettings:
    listen: tuple[SocketAddress, ...] = (SocketAddress("127.0.0.1", 5353),)
    upstreams: tuple[SocketAddress, ...] = (SocketAddress("9.9.9.9", 53), SocketAddress("1.1.1.1", 53))
    block_answer: BlockAnswer = BlockAnswer.NXDOMAIN
    blockpage_ipv4: str | None = None
    blockpage_ipv6: str | None = None
    max_ttl_seconds: int = 3600
    workers: int = 1  # processes sharing the DNS sockets; production: one per core
    rate_limit: int = 1000  # UDP queries per second per client address (bursts to twice that); 0: no limit
    cache_bytes: int = 32_000_000  # every cache of every worker together (each worker gets its share), like unbound's


@dataclass(frozen=True)
class TeacherSettings:
    """The teachers' page: off unless `listen` is set; HTTPS with `certificate` and `key`, or a certificate from
    Vigie's CA. `allow_networks`: who may reach it (empty: anyone who reaches the port)."""

    listen: SocketAddress | None = None
    accounts: str = "teachers.yaml"
    allow_networks: tuple[IPNetwork, ...] = ()
    certificate: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class ApiSettings:
    """The admin API (overrides, usage): token-protected, on loopback unless the admin says otherwise."""

    listen: SocketAddress | None = SocketAddress("127.0.0.1", 9180)  # None: off
    token_file: str = "var/api-token"


@dataclass(frozen=True)
class PortRange:
    first: int
    last: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class InternalHost:
    """An address or network inside `deny_networks` that pupils may reach through the proxy (the ENT, a school
    server); on `port` only, or on every port the port rules allow when `port` is None."""

    network: IPNetwork
    port: int | None

    def __str__(self) -> str:
        host = str(self.network.network_address) if self.network.num_addresses == 1 else str(self.network)
        if self.port is None:
            return host
        return f"[{host}]:{self.port}" if self.network.version == 6 else f"{host}:{self.port}"


# Where the proxy never connects unless `internal_hosts` says so: this host, its neighbours and everything that is
# not the Internet (Squid's `to_localhost` and more). The server's own addresses are added at start.
DEFAULT_DENY_NETWORKS: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/3",
    "::/128", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8"))
# Squid's defaults: CONNECT only to SSL_ports (443); plain HTTP to Safe_ports' web ports.
DEFAULT_CONNECT_PORTS = (PortRange(443, 443),)
DEFAULT_HTTP_PORTS = (PortRange(80, 80), PortRange(443, 443), PortRange(1025, 65535))


@dataclass(frozen=True)
class ProxyReach:
    """Where the proxy may open connections, whatever the names say: checked on the address it connects to."""

    deny_networks: tuple[IPNetwork, ...] = DEFAULT_DENY_NETWORKS
    internal_hosts: tuple[InternalHost, ...] = ()
    connect_ports: tuple[PortRange, ...] = DEFAULT_CONNECT_PORTS
    http_ports: tuple[PortRange, ...] = DEFAULT_HTTP_PORTS


@dataclass(frozen=True)
class ServerSettings:
    dns: DnsSettings = field(default_factory=DnsSettings)
    proxy_listen: SocketAddress = SocketAddress("127.0.0.1", 8080)
    proxy_mode: str = "regular"  # or "transparent", behind a firewall redirect
    proxy_workers: int = 1  # processes accepting on the proxy's socket; production: one per core
    proxy_pac: PacMode = PacMode.ALL
    pac_proxies: tuple[SocketAddress, ...] = ()  # the proxies a PAC names; () = the address the client reached
    https_block_page: bool = True  # intercept blocked HTTPS to show the page (else the CONNECT is refused)
    proxy_reach: ProxyReach = field(default_factory=ProxyReach)
    metrics_listen: SocketAddress = SocketAddress("127.0.0.1", 9108)
    state: StoreAddress = field(default_factory=lambda: StoreAddress("sqlite", "var/state.sqlite3"))
    api: ApiSettings = field(default_factory=ApiSettings)
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    data_dir: str = "var"
    list_updates: UpdatePolicy = field(default_factory=UpdatePolicy)


@dataclass(frozen=True)
class VpnSettings:
    """Home use: tablets dial the city's WireGuard server, which routes them to Vigie. Each group's VPN addresses
    are its `networks` inside `network`."""

    network: IPNetwork
    server_address: IPAddress  # Vigie in the tunnel: the tablets' DNS server and proxy
    endpoint: str  # host:port the tablets dial
    server_public_key: str  # base64, as `wg pubkey` prints it
    route: str = "vigie"  # "vigie": only Vigie's address goes through the tunnel; "all": all traffic
    keepalive: int = 25  # seconds; keeps home routers' NAT mappings open
    interface: str = "wg0"
    origin: Origin | None = None

    def group_ranges(self, group: Group) -> tuple[IPNetwork, ...]:
        return tuple(network for network in group.networks
                     if network.version == self.network.version and network.subnet_of(self.network))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Rules:
    """Everything rules.yaml (and the inventory it names) says, validated."""

    source: str
    timezone: str
    lists: tuple[ListSource, ...]
    categories: dict[str, Category]
    always_block: tuple[str, ...]
    background: tuple[str, ...]
    holidays: tuple[Holiday, ...]
    groups: dict[str, Group]
    devices: tuple[Device, ...]
    unknown_group: str | None
    profiles: dict[str, Profile]
    schedules: dict[str, Schedule]
    server: ServerSettings
    inventory: str | None
    vpn: VpnSettings | None = None
