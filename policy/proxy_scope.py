"""Which hosts the proxy has something to do with, for a group: what a selective PAC sends to the proxy.

Everything else goes DIRECT, where DNS filtering decides (a blocked name does not resolve). The proxy is still
needed for: hosts with URL rules (a list's `urls` in a category the group's profiles block, a profile's
`allow_urls` / `deny_urls`), the search and video hosts under safe search or a search portal; IP literals and plain
host names, which DNS never sees, are sent to it by the PAC itself."""

from __future__ import annotations

from dataclasses import dataclass

from blocklists.bundled_data import SafeSearchLevel
from blocklists.names import parent_domains
from policy.model import Mode
from policy.snapshot import CompiledProfile, Snapshot


def profiles_of_group(snapshot: Snapshot, group: str) -> tuple[CompiledProfile, ...]:
    """Every profile the group can be in: its fixed profile, or each one its schedule names."""
    rules = snapshot.rules
    entry = rules.groups[group]
    names = {entry.profile} if entry.profile else set()
    if entry.schedule:
        schedule = rules.schedules[entry.schedule]
        names |= {schedule.default, *(line.profile for line in schedule.rules)}
    return tuple(snapshot.profiles[name] for name in sorted(names) if name in snapshot.profiles)


@dataclass(frozen=True)
class ProxyScope:
    """Hosts whose requests the proxy must see: `exact` names alone (a safe-search host: `www.google.fr`, not
    `mail.google.fr`), `suffixes` with their subdomains (URL rules cover a host's subdomains)."""

    exact: frozenset[str]
    suffixes: frozenset[str]


def hosts_for_proxy(snapshot: Snapshot, group: str) -> ProxyScope:
    """What the proxy must see for `group`, over every profile the group can be in."""
    profiles = profiles_of_group(snapshot, group)
    blocked = snapshot.always_block_mask
    exact: set[str] = set()
    suffixes: set[str] = set()
    for profile in profiles:
        blocked |= profile.block_mask
        suffixes.update(profile.allow_urls)
        suffixes.update(profile.deny_urls)
        if profile.profile.safe_search is not SafeSearchLevel.OFF or profile.profile.search_portal:
            exact.update(snapshot.safe_search)
    suffixes.update(entry.host for entry, mask in snapshot.lists.urls.entries()
                    if mask & blocked and not _never_resolves(snapshot, profiles, entry.host))
    return ProxyScope(frozenset(exact - suffixes), frozenset(suffixes))


def _never_resolves(snapshot: Snapshot, profiles: tuple[CompiledProfile, ...], host: str) -> bool:
    """Whether DNS blocks `host` in every profile of the group (always-blocked, or in a blocked category and not
    on the profile's allow list): sent DIRECT it does not resolve, so URL rules under it need no proxy (most URL
    entries of the adult categories sit on hosts their domain lists block already)."""
    listed = snapshot.lists.domains.lookup(host)
    if listed & snapshot.always_block_mask:
        return True
    names = parent_domains(host)

    def blocked_in(profile: CompiledProfile) -> bool:
        if any(name in profile.allow for name in names):
            return False
        return profile.profile.mode is not Mode.FILTERED or bool(listed & profile.block_mask)

    return bool(profiles) and all(blocked_in(profile) for profile in profiles)
