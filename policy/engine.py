"""decide(query, snapshot, state) -> Decision: pure, deterministic (the time is an input), no I/O.

Precedence, first that applies wins (docs/rules.md, "How Vigie decides"):
 1. unknown client refused
 2. teacher overrides for the device, then the group: a domain allow/block (most specific domain wins)
 3. the profile's deny and allow lists, URL rules before domain rules, the most specific entry winning (a tie
    goes to deny); the profile's search portal counts as allowed; then a teacher's lock blocks everything else
 4. mode of the profile in force: allowlist-only (kiosk) and block-all (night) block everything not allowed above
 5. screen-time budget spent (background services keep working)
 6. always-blocked categories (DNS bypass: DoH resolvers, VPNs, proxies)
 7. blocked categories of the profile (domain lists, then URL lists and expressions when the URL is known)
 8. IP-literal destinations (blocked for profiles with `block_ip_literals`)
 9. safe search: the provider's enforced endpoint
10. allow
A decision holds until the next schedule change, the expiry of an override that shaped it, or midnight for screen
time, or the soonest a budget can run out (a device uses at most one minute per minute): fronts may cache it until
`until`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from typing import NamedTuple

from blocklists.bundled_data import SafeSearchLevel
from blocklists.names import ip_literal, parent_domains
from policy.clients import Client
from policy.decision import Action, Decision, Query, Reason
from policy.model import DomainRule, Mode, Profile, UrlRule
from policy.snapshot import CompiledProfile, Snapshot
from policy.state import Override, OverrideKind, StateView

UNKNOWN_CLIENT = Decision(Action.REFUSE, Reason.UNKNOWN_CLIENT,
                          "unknown client: rules.yaml refuses clients outside its groups (devices.unknown)")


def decide(query: Query, snapshot: Snapshot, state: StateView) -> Decision:
    """The first step of the precedence (above) with something to say decides; nothing said, the host is allowed."""
    if query.client is None:
        return UNKNOWN_CLIENT
    asked = _Asked.of(query, query.client, snapshot, state)
    for step in BEFORE_BUDGET:
        verdict = step(asked)
        if verdict is not None:
            return asked.decision(verdict)
    asked = asked.with_budget_left()  # what follows holds at most until the budget could run out
    for step in AFTER_BUDGET:
        verdict = step(asked)
        if verdict is not None:
            return asked.decision(verdict)
    return asked.decision(Verdict(Action.ALLOW, Reason.DEFAULT,
                                  f"{asked.host} is in no blocked category of profile {asked.profile.name}"))


def bits_deciding(host: str, client: Client, snapshot: Snapshot, state: StateView) -> int | None:
    """The list bits of `host` when they are all that `decide` reads of it for `client`, in a query without a path:
    no override concerns the client's group, and the host is no IP address, no safe-search host, and neither it nor
    a parent is on an allow or deny list of any profile. Two such hosts with the same bits then get the same
    decision at the same instant, but for the wording of its explanation: a front may keep one verdict per
    (client, bits) where it would otherwise keep one per host. None when anything else about the host may matter."""
    if client.group in state.override_groups or host[-1:].isdigit() or ":" in host or host in snapshot.safe_search:
        return None
    listed = snapshot.listed_domains
    if listed and not listed.isdisjoint(parent_domains(host)):
        return None
    return snapshot.lists.lookup_domain(host)


class Verdict(NamedTuple):
    """What a step says; `_Asked.decision` adds who asked, the profile and until when."""

    action: Action
    reason: Reason
    explanation: str
    rule: str | None = None
    categories: tuple[str, ...] = ()
    lists: int = 0  # the list bits that matched
    valid_until: datetime | None = None  # sooner than the profile's end: an override's, midnight
    rewrite_to: str | None = None
    counts: bool = True  # the minute counts as screen time (not when the budget is what blocks)


class _Asked(NamedTuple):
    """Everything the steps read, worked out once per question."""

    query: Query
    client: Client
    host: str
    at: datetime  # UTC: every "until" is a real instant
    snapshot: Snapshot
    compiled: CompiledProfile
    profile: Profile
    masks: int  # the list bits the host is on
    metered: bool  # the profile has a budget and the host is no background service
    minutes_used: int | None  # today, by the device, when its budget applies
    overrides: tuple[Override, ...]  # those in force for this client
    until: datetime | None  # the profile's end or the first override's, whichever is sooner
    trail: tuple[str, ...]

    @classmethod
    def of(cls, query: Query, client: Client, snapshot: Snapshot, state: StateView) -> _Asked:
        at = query.at.astimezone(UTC)
        in_force = snapshot.profile_in_force(client.group, at)
        compiled = snapshot.profiles[in_force.profile]
        masks = snapshot.lists.lookup_domain(query.host)
        overrides = tuple(o for o in state.overrides if o.applies_to(client.group, client.device, at)) \
            if state.overrides else ()
        until = _earliest(in_force.until, min(o.expires_at for o in overrides)) if overrides else in_force.until
        metered = compiled.profile.screen_time_minutes is not None and not masks & snapshot.background_mask
        used = state.minutes_used(client.device, at.astimezone(snapshot.clock.zone).date()) \
            if metered and client.device is not None else None
        return cls(query, client, query.host, at, snapshot, compiled, compiled.profile, masks, metered, used,
                   overrides, until, (f"client → group {client.group} ({client.matched_by})", in_force.description))

    def with_budget_left(self) -> _Asked:
        """Past the budget step with minutes left: decisions hold until they could run out, and the trail says
        how many are used."""
        budget, used = self.profile.screen_time_minutes, self.minutes_used
        if budget is None or used is None:
            return self
        runs_out = self.at.replace(second=0, microsecond=0) + timedelta(minutes=budget - used)
        return self._replace(until=_earliest(self.until, runs_out),
                             trail=(*self.trail, f"screen time: {used} of {budget} minutes used today"))

    def decision(self, verdict: Verdict) -> Decision:
        lists = tuple(self.snapshot.lists.refs_in(verdict.lists)) if verdict.lists else ()
        return Decision(
            action=verdict.action, reason=verdict.reason, explanation=verdict.explanation, group=self.client.group,
            device=self.client.device, profile=self.profile.name, categories=verdict.categories, lists=lists,
            rule=verdict.rule, until=_earliest(self.until, verdict.valid_until), rewrite_to=verdict.rewrite_to,
            search_portal=self.profile.search_portal, counts_screen_time=self.metered and verdict.counts,
            trail=(*self.trail, verdict.explanation))


Step = Callable[[_Asked], "Verdict | None"]


def _domain_override(asked: _Asked) -> Verdict | None:
    """2. A teacher's allow or block for this domain (device before group, most specific domain)."""
    found = _override_for(asked.host, asked.overrides) if asked.overrides else None
    if found is None:
        return None
    allowed = found.kind is OverrideKind.ALLOW
    return Verdict(Action.ALLOW if allowed else Action.BLOCK,
                   Reason.OVERRIDE_ALLOW if allowed else Reason.OVERRIDE_BLOCK,
                   f"{'allowed' if allowed else 'blocked'} by override {found.id} for {found.domain} "
                   f"({_override_scope(found)}, by {found.author}) until {_clock(found.expires_at, asked.snapshot)}",
                   rule=f"override {found.id}", valid_until=found.expires_at)


def _deny_or_allow_list(asked: _Asked) -> Verdict | None:
    """3. The profile's deny and allow lists."""
    listed = _listed(asked.host, asked.query.path, asked.compiled)
    if listed is None:
        return None
    allowed, rule_text = listed
    where = f"{asked.host}{asked.query.path or ''} is on the {'allow' if allowed else 'deny'} list"
    return Verdict(Action.ALLOW if allowed else Action.BLOCK, Reason.ALLOW_LIST if allowed else Reason.DENY_LIST,
                   f"{where} of profile {asked.profile.name} ({rule_text})", rule=rule_text)


def _lock(asked: _Asked) -> Verdict | None:
    """3, after the lists: a teacher's lock leaves only the allow list."""
    lock = next((o for o in asked.overrides if o.kind is OverrideKind.LOCK), None)
    if lock is None:
        return None
    return Verdict(Action.BLOCK, Reason.OVERRIDE_LOCK,
                   f"the {_override_scope(lock)} is locked by override {lock.id} (by {lock.author}) until "
                   f"{_clock(lock.expires_at, asked.snapshot)}: only the allow list is reachable",
                   rule=f"override {lock.id}", valid_until=lock.expires_at)


def _mode(asked: _Asked) -> Verdict | None:
    """4. Kiosk (allowlist-only) and night (block-all) profiles block what the lists did not allow."""
    profile = asked.profile
    if profile.mode is Mode.ALLOWLIST_ONLY:
        return Verdict(Action.BLOCK, Reason.KIOSK, f"profile {profile.name} is allowlist-only (kiosk) and "
                       f"{asked.host} is not on its allow list", rule=f"profiles.{profile.name}.mode")
    if profile.mode is Mode.BLOCK_ALL:
        return Verdict(Action.BLOCK, Reason.BLOCK_ALL, f"profile {profile.name} blocks everything not on its "
                       "allow list", rule=f"profiles.{profile.name}.mode")
    return None


def _budget_spent(asked: _Asked) -> Verdict | None:
    """5. The device's screen time for today is used up (background services keep working)."""
    budget, used = asked.profile.screen_time_minutes, asked.minutes_used
    if budget is None or used is None or used < budget:
        return None
    return Verdict(Action.BLOCK, Reason.SCREEN_TIME,
                   f"screen time used up: {used} of {budget} minutes today (profile {asked.profile.name})",
                   rule=f"profiles.{asked.profile.name}.screen_time",
                   valid_until=_next_midnight(asked.at, asked.snapshot), counts=False)


def _always_blocked(asked: _Asked) -> Verdict | None:
    """6. Categories that let a device bypass filtering (DoH resolvers, VPNs, proxies), whatever the profile."""
    for name, mask in asked.snapshot.always_block:
        if asked.masks & mask:
            refs = ", ".join(asked.snapshot.lists.refs_in(asked.masks & mask))
            return Verdict(Action.BLOCK, Reason.BYPASS, f"{asked.host} is in category {name} ({refs}), always "
                           "blocked because it lets devices bypass filtering (always_block)",
                           rule="always_block", categories=(name,), lists=asked.masks & mask)
    return None


def _blocked_category(asked: _Asked) -> Verdict | None:
    """7. The profile's blocked categories: domain lists."""
    hit = asked.masks & asked.compiled.block_mask
    if not hit:
        return None
    names = tuple(name for name, mask in asked.compiled.blocked_categories if hit & mask)
    refs = ", ".join(asked.snapshot.lists.refs_in(hit))
    return Verdict(Action.BLOCK, Reason.CATEGORY, f"{asked.host} is in category {', '.join(names)} ({refs}), "
                   f"blocked by profile {asked.profile.name}", rule=f"profiles.{asked.profile.name}.block",
                   categories=names, lists=hit)


def _blocked_url(asked: _Asked) -> Verdict | None:
    """7. The URL lists and expressions of the blocked and always-blocked categories, when the URL is known."""
    query, snapshot, compiled = asked.query, asked.snapshot, asked.compiled
    if query.path is None:
        return None
    hit = snapshot.lists.lookup_url(asked.host, query.path, query.url or f"{asked.host}{query.path}") & (
        compiled.block_mask | snapshot.always_block_mask)
    if not hit:
        return None
    names = tuple(name for name, mask in (*compiled.blocked_categories, *snapshot.always_block) if hit & mask)
    return Verdict(Action.BLOCK, Reason.URL_LIST, f"{asked.host}{query.path} matches the URL list of "
                   f"category {', '.join(names)} ({', '.join(snapshot.lists.refs_in(hit))})",
                   rule=f"profiles.{asked.profile.name}.block", categories=names, lists=hit)


def _ip_literal(asked: _Asked) -> Verdict | None:
    """8. An address instead of a name, for profiles with `block_ip_literals`."""
    host, profile = asked.host, asked.profile
    # A name whose last label ends in a letter is no address: parsing one costs more than the whole decision.
    if not (profile.block_ip_literals and (host[-1:].isdigit() or ":" in host) and ip_literal(host) is not None):
        return None
    return Verdict(Action.BLOCK, Reason.IP_LITERAL, f"{host} is an IP address; profile {profile.name} only "
                   "allows names (block_ip_literals)", rule=f"profiles.{profile.name}.block_ip_literals")


def _safe_search(asked: _Asked) -> Verdict | None:
    """9. A search or video provider: its enforced endpoint."""
    target = asked.snapshot.safe_search.get(asked.host)
    level = asked.profile.safe_search
    if target is None or level is SafeSearchLevel.OFF:
        return None
    endpoint = target.endpoint(level)
    return Verdict(Action.REWRITE, Reason.SAFE_SEARCH, f"{asked.host} is {target.provider}: safe search "
                   f"({level.value}) enforced through {endpoint}", rule=f"profiles.{asked.profile.name}.safe_search",
                   rewrite_to=endpoint)


# The precedence of the module docstring, in order; the budget step splits it (see `_Asked.with_budget_left`). A
# step that reads more of the host than its list bits must make `bits_deciding` say None for the hosts concerned.
BEFORE_BUDGET: tuple[Step, ...] = (_domain_override, _deny_or_allow_list, _lock, _mode, _budget_spent)
AFTER_BUDGET: tuple[Step, ...] = (_always_blocked, _blocked_category, _blocked_url, _ip_literal, _safe_search)


def _listed(host: str, path: str | None, compiled: CompiledProfile) -> tuple[bool, str] | None:
    """(allowed, rule) of the most specific allow/deny entry for host (and path), URL rules first; None if none."""
    if path is not None and (compiled.allow_urls or compiled.deny_urls):
        best: tuple[int, bool, UrlRule] | None = None
        for suffix in parent_domains(host):
            for allowed, table in ((False, compiled.deny_urls), (True, compiled.allow_urls)):
                for rule in table.get(suffix, ()):
                    if path.startswith(rule.path_prefix) and (best is None or len(rule.path_prefix) > best[0]):
                        best = (len(rule.path_prefix), allowed, rule)
            if best is not None:
                return best[1], f"{best[2].host}{best[2].path_prefix}, {best[2].origin}"
    for suffix in parent_domains(host):
        denied: DomainRule | None = compiled.deny.get(suffix)
        if denied is not None:
            return False, str(denied.origin)
        allowed_rule = compiled.allow.get(suffix)
        if allowed_rule is not None:
            return True, str(allowed_rule.origin)
    return None


def _override_for(host: str, overrides: tuple[Override, ...]) -> Override | None:
    """The domain override that decides for `host`: device-level before group-level, then the most specific
    domain, then block before allow."""
    best: tuple[tuple[int, int, int], Override] | None = None
    suffixes = {suffix: index for index, suffix in enumerate(parent_domains(host))}
    for override in overrides:
        if override.kind is OverrideKind.LOCK or override.domain not in suffixes:
            continue
        rank = (0 if override.device else 1, suffixes[override.domain],
                0 if override.kind is OverrideKind.BLOCK else 1)
        if best is None or rank < best[0]:
            best = (rank, override)
    return best[1] if best else None


def _override_scope(override: Override) -> str:
    return f"device {override.device}" if override.device else f"group {override.group}"


def _clock(at: datetime, snapshot: Snapshot) -> str:
    return f"{at.astimezone(snapshot.clock.zone):%H:%M}"


def _earliest(first: datetime | None, second: datetime | None) -> datetime | None:
    if first is None:
        return second
    if second is None:
        return first
    return min(first, second)


def _next_midnight(at: datetime, snapshot: Snapshot) -> datetime:
    local = at.astimezone(snapshot.clock.zone)
    return datetime.combine(local.date() + timedelta(days=1), time(0), tzinfo=snapshot.clock.zone).astimezone(UTC)


OPENING_HORIZON = timedelta(days=14)


def next_allowed(query: Query, snapshot: Snapshot, state: StateView,
                 horizon: timedelta = OPENING_HORIZON) -> datetime | None:
    """The first instant after `query.at` at which the same client would be allowed the same host (or URL), within
    `horizon`; None when not in that time. Not the next schedule change — a site blocked by every profile stays
    blocked through the night profile — but the decision walked from each change to the next: schedules,
    holidays, dates, budgets that reset at midnight, overrides that end."""
    limit = query.at + horizon
    at = query.at
    decision = decide(query, snapshot, state)
    while decision.action in (Action.BLOCK, Action.REFUSE):
        if decision.until is None or decision.until > limit or decision.until <= at:
            return None
        at = decision.until
        decision = decide(query._replace(at=at), snapshot, state)
    return at.astimezone(UTC) if at != query.at else None
