"""Who is asking: source address (device address, group address, group network) or proxy credential → group."""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from policy.model import IPAddress, Rules


@dataclass(frozen=True)
class Client:
    """A client as the engine sees it. `device` is None when only the network is known."""

    group: str
    device: str | None
    matched_by: str
    known: bool = True


def parse_client_address(raw: str | IPAddress) -> IPAddress | None:
    """The address a front saw, with IPv4-mapped IPv6 (`::ffff:10.0.0.1`) turned back into IPv4."""
    try:
        address = ipaddress.ip_address(raw) if isinstance(raw, str) else raw
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


MAX_REMEMBERED = 65_536  # addresses `identify` remembers; past that it starts again
_UNSEEN = Client("", None, "")  # `identify`'s marker for an address not remembered (None means refused)


class ClientDirectory:
    """Most specific first: a device's address, a group's listed address, then the group's network."""

    def __init__(self, rules: Rules) -> None:
        self._exact: dict[IPAddress, Client] = {}
        for group in rules.groups.values():
            for address in group.addresses:
                self._exact[address] = Client(group.name, None, f"address {address} of group {group.name}")
        self._credentials: dict[str, tuple[str, Client]] = {}
        for device in rules.devices:
            client = Client(device.group, device.name, f"device {device.name} ({device.origin.file}:"
                                                       f"{device.origin.line})")
            for address in device.addresses:
                self._exact[address] = client
            if device.credential:
                user, _, password = device.credential.partition(":")
                self._credentials[user] = (password, client)
        # Networks indexed by (version, prefix length): a lookup is one dict probe per distinct length.
        self._networks: dict[tuple[int, int], dict[int, tuple[str, str]]] = {}
        for group in rules.groups.values():
            for network in group.networks:
                key = (network.version, network.prefixlen)
                shift = network.max_prefixlen - network.prefixlen
                self._networks.setdefault(key, {})[int(network.network_address) >> shift] = (
                    group.name, f"network {network} of group {group.name}")
        self._lengths = sorted(self._networks, key=lambda k: -k[1])
        self._by_text: dict[str, Client | None] = {}
        self._unknown = (Client(rules.unknown_group, None, f"unknown client, default group {rules.unknown_group}",
                                known=False) if rules.unknown_group else None)

    def identify(self, raw: str | IPAddress) -> Client | None:
        """The client behind a source address; None when unknown clients are refused. Remembered by the address's
        text for every front (these rules never change; a city has a few thousand tablets): parsing an address costs
        more than a cached DNS answer, and was a twentieth of a new tunnel through the proxy."""
        if not isinstance(raw, str):
            return self._identify(raw)
        client = self._by_text.get(raw, _UNSEEN)
        if client is _UNSEEN:
            if len(self._by_text) >= MAX_REMEMBERED:
                self._by_text.clear()
            client = self._by_text[raw] = self._identify(raw)
        return client

    def _identify(self, raw: str | IPAddress) -> Client | None:
        address = parse_client_address(raw)
        if address is None:
            return self._unknown
        exact = self._exact.get(address)
        if exact is not None:
            return exact
        value = int(address)
        for version, length in self._lengths:
            if version != address.version:
                continue
            found = self._networks[(version, length)].get(value >> (address.max_prefixlen - length))
            if found is not None:
                return Client(found[0], None, found[1])
        return self._unknown

    @property
    def has_credentials(self) -> bool:
        """Whether any device has a proxy credential: the proxy then asks unknown clients for one (407)."""
        return bool(self._credentials)

    def identify_credential(self, user: str, password: str) -> Client | None:
        """The device whose proxy credential this is; None when the user is unknown or the password wrong."""
        entry = self._credentials.get(user)
        if entry is None or not hmac.compare_digest(entry[0].encode(), password.encode()):
            return None
        return entry[1]
