"""The addresses of the machine the proxy runs on: it never connects to them, whatever name leads there (a
pupil's `CONNECT <the server's public address>:6379` would otherwise reach its Redis or its admin API)."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import socket
import struct
from collections.abc import Iterable
from pathlib import Path

from policy.model import IPAddress, ServerSettings

_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def own_addresses(settings: ServerSettings) -> frozenset[IPAddress]:
    """Every interface's addresses, the host name's, and every address Vigie listens on or is reached at."""
    found: set[IPAddress] = set()
    found.update(_interface_ipv4())
    found.update(_interface_ipv6())
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.update(_addresses([str(info[4][0])]))
    listens = [*settings.dns.listen, settings.proxy_listen, settings.metrics_listen, settings.api.listen]
    found.update(_addresses(listen.host for listen in listens if listen is not None))
    found.update(_addresses(a for a in (settings.dns.blockpage_ipv4, settings.dns.blockpage_ipv6) if a))
    return frozenset(a for a in found if not a.is_unspecified)


def _addresses(texts: Iterable[str]) -> Iterable[IPAddress]:
    for text in texts:
        with contextlib.suppress(ValueError):
            yield ipaddress.ip_address(text.partition("%")[0])


def _interface_ipv4() -> Iterable[IPAddress]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                packed = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                yield ipaddress.IPv4Address(packed[20:24])


def _interface_ipv6() -> Iterable[IPAddress]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            yield ipaddress.IPv6Address(bytes.fromhex(line.split()[0]))
