"""decide(query, snapshot, state) -> Decision: pure, deterministic (the time is an input), no I/O.

Precedence, first that applies wins (docs/rules.md, "How Vigie decides"):
 1. unknown client refused
 2. teacher overrides for the device, then the group: a domain allow/block (most specific domain wins), then lock
 3. the profile's deny and allow lists, URL rules before domain rules, the most specific entry winning (a tie
    goes to deny); the profile's search portal counts as allowed
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

from datetime import UTC, datetime, time, timedelta

from blocklists.bundled_data import SafeSearchLevel
from blocklists.names import ip_literal, parent_domains
from policy.decision import Action, Decision, Query, Reason
from policy.model import DomainRule, Mode, ScheduleRule, UrlRule
from policy.schedule import ProfileInForce
from policy.snapshot import CompiledProfile, Snapshot
from policy.state import Override, OverrideKind, StateView


def decide(query: Query, snapshot: Snapshot, state: StateView) -> Decision:
    client = query.client
    if client is None:
        return Decision(Action.REFUSE, Reason.UNKNOWN_CLIENT,
                        "unknown client: rules.yaml refuses clients outside its groups (devices.unknown)")
    host, at = query.host, query.at.astimezone(UTC)  # every "until" below is a real instant (UTC arithmetic)
    in_force = snapshot.profile_in_force(client.group, at)
    compiled = snapshot.profiles[in_force.profile]
    profile = compiled.profile
    trail = list(_trail_opening(client.group, client.matched_by, in_force, snapshot))
    until = in_force.until
    masks = snapshot.lists.lookup_domain(host)
    background = bool(masks & snapshot.background_mask)
    metered = profile.screen_time_minutes is not None and not background

    def decision(action: Action, reason: Reason, explanation: str, *, rule: str | None = None,
                 categories: tuple[str, ...] = (), lists: int = 0, valid_until: datetime | None = None,
                 rewrite_to: str | None = None, counts: bool = True) -> Decision:
        trail.append(explanation)
        return Decision(
            action=action, reason=reason, explanation=explanation, group=client.group, device=client.device,
            profile=profile.name, categories=categories, lists=tuple(snapshot.lists.refs_in(lists)) if lists else (),
            rule=rule,
            until=_earliest(until, valid_until),
            rewrite_to=rewrite_to, search_portal=profile.search_portal, counts_screen_time=metered and counts,
            trail=tuple(trail),
        )

    # 2. overrides
    overrides = [o for o in state.overrides if o.applies_to(client.group, client.device, at)] \
        if state.overrides else []
    if overrides:
        found = _override_for(host, overrides)
        if found is not None:
            allowed = found.kind is OverrideKind.ALLOW
            return decision(
                Action.ALLOW if allowed else Action.BLOCK,
                Reason.OVERRIDE_ALLOW if allowed else Reason.OVERRIDE_BLOCK,
                f"{'allowed' if allowed else 'blocked'} by override {found.id} for {found.domain} "
                f"({_override_scope(found)}, by {found.author}) until {_clock(found.expires_at, snapshot)}",
                rule=f"override {found.id}", valid_until=found.expires_at)
        until = _earliest(until, min(o.expires_at for o in overrides))

    # 3. deny and allow lists
    listed = _listed(host, query.path, compiled)
    if listed is not None:
        allowed, rule_text = listed
        if not allowed:
            return decision(Action.BLOCK, Reason.DENY_LIST, f"{host}{query.path or ''} is on the deny list of "
                            f"profile {profile.name} ({rule_text})", rule=rule_text)
        return decision(Action.ALLOW, Reason.ALLOW_LIST, f"{host}{query.path or ''} is on the allow list of "
                        f"profile {profile.name} ({rule_text})", rule=rule_text)

    lock = next((o for o in overrides if o.kind is OverrideKind.LOCK), None) if overrides else None
    if lock is not None:
        return decision(Action.BLOCK, Reason.OVERRIDE_LOCK,
                        f"the {_override_scope(lock)} is locked by override {lock.id} (by {lock.author}) until "
                        f"{_clock(lock.expires_at, snapshot)}: only the allow list is reachable",
                        rule=f"override {lock.id}", valid_until=lock.expires_at)

    # 4. mode
    if profile.mode is Mode.ALLOWLIST_ONLY:
        return decision(Action.BLOCK, Reason.KIOSK, f"profile {profile.name} is allowlist-only (kiosk) and "
                        f"{host} is not on its allow list", rule=f"profiles.{profile.name}.mode")
    if profile.mode is Mode.BLOCK_ALL:
        return decision(Action.BLOCK, Reason.BLOCK_ALL, f"profile {profile.name} blocks everything not on its "
                        "allow list", rule=f"profiles.{profile.name}.mode")

    # 5. screen time
    budget = profile.screen_time_minutes
    if budget is not None and metered and client.device is not None:
        used = state.minutes_used(client.device, at.astimezone(snapshot.clock.zone).date())
        if used >= budget:
            return decision(Action.BLOCK, Reason.SCREEN_TIME,
                            f"screen time used up: {used} of {budget} minutes today (profile {profile.name})",
                            rule=f"profiles.{profile.name}.screen_time", valid_until=_next_midnight(at, snapshot),
                            counts=False)
        # Whatever follows holds at least until the budget could run out.
        until = _earliest(until, at.replace(second=0, microsecond=0) + timedelta(minutes=budget - used))
        trail.append(f"screen time: {used} of {budget} minutes used today")

    # 6. always-blocked categories
    for name, mask in snapshot.always_block:
        if masks & mask:
            refs = ", ".join(snapshot.lists.refs_in(masks & mask))
            return decision(Action.BLOCK, Reason.BYPASS, f"{host} is in category {name} ({refs}), always "
                            "blocked because it lets devices bypass filtering (always_block)",
                            rule="always_block", categories=(name,), lists=masks & mask)

    # 7. categories of the profile
    hit = masks & compiled.block_mask
    if hit:
        names = tuple(name for name, mask in compiled.blocked_categories if hit & mask)
        refs = ", ".join(snapshot.lists.refs_in(hit))
        return decision(Action.BLOCK, Reason.CATEGORY, f"{host} is in category {', '.join(names)} ({refs}), "
                        f"blocked by profile {profile.name}", rule=f"profiles.{profile.name}.block",
                        categories=names, lists=hit)
    if query.path is not None:
        url_hit = snapshot.lists.lookup_url(host, query.path, query.url or f"{host}{query.path}") & (
            compiled.block_mask | snapshot.always_block_mask)
        if url_hit:
            names = tuple(name for name, mask in (*compiled.blocked_categories, *snapshot.always_block)
                          if url_hit & mask)
            return decision(Action.BLOCK, Reason.URL_LIST, f"{host}{query.path} matches the URL list of "
                            f"category {', '.join(names)} ({', '.join(snapshot.lists.refs_in(url_hit))})",
                            rule=f"profiles.{profile.name}.block", categories=names, lists=url_hit)

    # 8. IP literals
    # A name whose last label ends in a letter is no address: parsing one costs more than the whole decision.
    if profile.block_ip_literals and (host[-1:].isdigit() or ":" in host) and ip_literal(host) is not None:
        return decision(Action.BLOCK, Reason.IP_LITERAL, f"{host} is an IP address; profile {profile.name} only "
                        "allows names (block_ip_literals)", rule=f"profiles.{profile.name}.block_ip_literals")

    # 9. safe search
    target = snapshot.safe_search.get(host)
    if target is not None and profile.safe_search is not SafeSearchLevel.OFF:
        endpoint = target.endpoint(profile.safe_search)
        return decision(Action.REWRITE, Reason.SAFE_SEARCH, f"{host} is {target.provider}: safe search "
                        f"({profile.safe_search.value}) enforced through {endpoint}",
                        rule=f"profiles.{profile.name}.safe_search", rewrite_to=endpoint)

    return decision(Action.ALLOW, Reason.DEFAULT, f"{host} is in no blocked category of profile {profile.name}")


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


def _override_for(host: str, overrides: list[Override]) -> Override | None:
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


def _why_profile(rule: ScheduleRule | None, group: str, snapshot: Snapshot) -> str:
    if rule is not None:
        return str(rule.origin)
    schedule = snapshot.rules.groups[group].schedule
    return f"default of schedule {schedule}" if schedule else f"fixed profile of group {group}"


def _trail_opening(group: str, matched_by: str, in_force: ProfileInForce, snapshot: Snapshot) -> tuple[str, str]:
    """How the client was placed and which profile is in force: the same two lines for every name a group asks
    until its schedule changes, so they are written once (formatting the dates costs more than the rest of a
    DNS decision)."""
    memo = snapshot.trail_memo.get((group, matched_by))
    if memo is not None and memo[0] is in_force:
        return memo[1]
    lines = (f"client → group {group} ({matched_by})",
             f"profile {in_force.profile} in force ({_why_profile(in_force.rule, group, snapshot)})"
             f"{_until_text(in_force.until, snapshot)}")
    snapshot.trail_memo[(group, matched_by)] = (in_force, lines)
    return lines


def _until_text(until: datetime | None, snapshot: Snapshot) -> str:
    return f" until {until.astimezone(snapshot.clock.zone):%Y-%m-%d %H:%M}" if until else ""


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
