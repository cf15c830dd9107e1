"""Where a front may connect: the address and port it is about to reach, judged after every name was.

Names are decided by `policy.engine.decide`; this judges what they lead to, at the moment of connecting, so that
no spelling of a name (`localhost`, `2130706433`, a name that resolves to 127.0.0.1, a rebinding answer) reaches
the server's own services, the school network or a listed resolver's address. Pure: the address and the server's
own addresses are inputs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from datetime import datetime

from policy.clients import Client
from policy.decision import Action, Decision, Reason
from policy.model import IPAddress, PortRange, ProxyReach
from policy.snapshot import Snapshot


def port_allowed(port: int, ranges: tuple[PortRange, ...], reach: ProxyReach) -> bool:
    """Whether a CONNECT (`ranges` = connect_ports) or a plain HTTP request (http_ports) may name `port`; a port
    an internal host is listed with counts as allowed (it is checked again with its address when connecting)."""
    return any(port in r for r in ranges) or any(host.port == port for host in reach.internal_hosts)


def decide_destination(client: Client, address: IPAddress, port: int, at: datetime, snapshot: Snapshot,
                       own_addresses: Collection[IPAddress] = ()) -> Decision | None:
    """A BLOCK decision when `client` may not reach `address:port`, else None.

    Blocked: an address in `server.proxy.deny_networks` or one of the server's own, unless an `internal_hosts`
    entry lists it (with this port, or with none); an address in an always-blocked category or in a category the
    client's profile blocks (a DoH resolver or VPN endpoint reached under an unlisted name)."""
    reach = snapshot.rules.server.proxy_reach
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    internal = any(address in host.network and host.port in (None, port) for host in reach.internal_hosts)
    if not internal and (address in own_addresses or any(address in network for network in reach.deny_networks)):
        where = "one of this server's own addresses" if address in own_addresses else "in server.proxy.deny_networks"
        return _blocked(client, at, snapshot, f"{address}:{port} is {where}: the proxy does not connect there "
                        "(an admin lists the internal hosts pupils may reach in server.proxy.internal_hosts)",
                        rule="server.proxy.deny_networks")
    return listed_address(client, str(address), at, snapshot)


def listed_address(client: Client, address: str, at: datetime, snapshot: Snapshot) -> Decision | None:
    """A BLOCK decision when `address` (canonical text) is listed in an always-blocked category or in one the
    client's profile blocks — a DoH resolver or VPN endpoint reached under a name no list has — else None. Used
    for the address the proxy connects to and for every address a DNS answer gives."""
    found = snapshot.lists.lookup_domain(address)
    if not found:
        return None  # the usual case, before any schedule is looked at
    in_force = snapshot.profile_in_force(client.group, at)
    compiled = snapshot.profiles[in_force.profile]
    hit = found & (snapshot.always_block_mask | compiled.block_mask)
    if not hit:
        return None
    refs = ", ".join(snapshot.lists.refs_in(hit))
    names = tuple(name for name, mask in (*snapshot.always_block, *compiled.blocked_categories) if hit & mask)
    return _blocked(client, at, snapshot, f"{address} is listed in {refs}: a name that leads there is blocked with "
                    "it", rule="destination address", categories=names, profile=in_force.profile)


def _blocked(client: Client, at: datetime, snapshot: Snapshot, explanation: str, *, rule: str,
             categories: tuple[str, ...] = (), profile: str | None = None) -> Decision:
    profile = profile or snapshot.profile_in_force(client.group, at).profile
    return Decision(Action.BLOCK, Reason.DESTINATION, explanation, group=client.group, device=client.device,
                    profile=profile, categories=categories, rule=rule, trail=(explanation,))
