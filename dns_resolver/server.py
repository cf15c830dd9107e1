"""The DNS front: parse, identify the client, ask the engine, answer (block, safe search) or forward.

Each stage either answers or passes on:
  malformed → FORMERR · not a QUERY → NOTIMP · client not ours → REFUSED · `resolver.arpa` → answered here ·
  the root → forwarded · decision cached or made · block → block answer · rewrite → CNAME to the safe-search
  endpoint + its addresses · allow → answer cache, else upstream → every name and address of the answer judged
Any internal error answers SERVFAIL (never NXDOMAIN, never silence) and is counted. No answer carries AA (Vigie is
authoritative for nothing but `resolver.arpa`) or AD (it validates nothing).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

from dnslib import CNAME, OPCODE, QTYPE, RCODE, RR, DNSError, DNSRecord
from dnslib.buffer import BufferError as DnsBufferError
from dnslib.label import DNSLabelError

from blocklists.errors import NameRejected
from blocklists.names import is_plain_name, normalize_domain
from dns_resolver.budget import DECISION_COST, EXACT_COST, CacheBudget
from dns_resolver.fastpath import (
    ExactReplies,
    PlainQuery,
    RateLimiter,
    ReplyCache,
)
from dns_resolver.forwarding import Forwarder, UpstreamAnswer
from dns_resolver.upstream import UpstreamFailure, UpstreamPool
from dns_resolver.verdicts import Verdict, Verdicts
from dns_resolver.wire import (
    RESOLVER_ARPA,
    block_answer,
    client_reply,
    formerr_for,
    header_reply,
    min_ttl,
    plain_name,
    question_bytes,
    rcode_reply,
    reply_to,
    resolver_arpa_answer,
    servfail,
    with_edns,
)
from policy.clients import Client
from policy.decision import Action, Query
from policy.destination import listed_address
from policy.engine import OPENING_HORIZON, next_allowed
from policy.metrics import (
    DNS_ANSWER_BLOCKS,
    DNS_CACHE_BYTES,
    DNS_CACHE_LIMIT,
    DNS_ERRORS,
    DNS_LATENCY,
    QUERIES,
)
from policy.model import DnsSettings
from policy.snapshot import Snapshot
from policy.state import StateView

log = logging.getLogger(__name__)

BLOCK_TTL = 60
ONE_WORKER_DEFAULT = CacheBudget.share(DnsSettings.cache_bytes, 1)
_SVCB_TYPES = {QTYPE.HTTPS, QTYPE.SVCB}
_PASSED_RCODES = (RCODE.NOERROR, RCODE.NXDOMAIN)  # as plain ints: dnslib's RCODE.X is a Python-level lookup
_SHARED, _PER_DEVICE, _NOT_CACHED = object(), object(), object()  # how a group's replies are cached
UNKNOWN_CLIENT = ("unknown", "refuse", "unknown_client", "none")


class Answered(NamedTuple):
    """A reply and how long the same question from the same view may get it again (0: not at all). A tuple: one
    is made per forwarded query, and a frozen dataclass costs several times more to build."""

    wire: bytes
    lifetime: float = 0.0
    labels: tuple[str, ...] = ()
    view: object = None
    from_upstream: bool = False  # forwarded as is: worth fetching again before it expires if popular
    count_device: str | None = None  # the device whose minute a cached copy of this reply marks
    ttl_offsets: tuple[int, ...] | None = None  # where its TTLs are, from the end of the question, when known


class PlainPlan(NamedTuple):
    """What the reply to a forwarded plain query depends on, decided before the upstream answers."""

    started: float  # perf_counter at arrival
    labels: tuple[str, str, str, str]
    ttl_cap: int
    view: object | None
    count_device: str | None
    client: Client  # who asked: the names and addresses of the answer are judged for them too
    snapshot: Snapshot


class Judged(NamedTuple):
    """What an upstream answer leads to, judged: the verdict that blocks it (and the name or address that did),
    or None; and the TTL cap the judged names allow."""

    blocked: Verdict | None
    via: str | None
    ttl_cap: int


@dataclass(frozen=True)
class _Reply:
    record: DNSRecord
    lifetime: float = 0.0


class DnsFront:
    """Protocol-independent handling of one query; the UDP and TCP servers (transport.py) only move bytes."""

    def __init__(self, current_snapshot: Callable[[], Snapshot], current_state: Callable[[], StateView],
                 upstreams: UpstreamPool, count_minute: Callable[[str], None] = lambda device: None,
                 rate_limit: int = 0, clock: Callable[[], float] = time.time,
                 cache: CacheBudget = ONE_WORKER_DEFAULT) -> None:
        self.current_snapshot = current_snapshot
        self.current_state = current_state
        self.count_minute = count_minute  # the device's current minute counts as screen time
        self.upstreams = upstreams
        self.clock = clock
        self.verdicts = Verdicts(current_state, cache.decisions)
        self.cache = cache
        self.forwarder = Forwarder(upstreams, max_bytes=cache.upstream_bytes)
        self.rate_limiter = RateLimiter(rate_limit) if rate_limit else None
        self._views: dict[str, tuple[int, int, float, object]] = {}
        self.replies = ReplyCache(cache.replies_bytes)
        self.exact_indexes: list[ExactReplies] = []  # one per UDP socket
        self._publish_cache_memory()

    def _publish_cache_memory(self) -> None:
        """Each cache's memory and limit as gauges, read when Prometheus scrapes (so that an admin can see whether
        `dns.cache_size` is too small: caches at their limit and a low hit rate)."""
        used = {"replies": lambda: self.replies.memory, "upstream": lambda: self.forwarder.memory,
                "decisions": lambda: len(self.verdicts) * DECISION_COST,
                "exact": lambda: sum(map(len, self.exact_indexes)) * EXACT_COST}
        limits = {"replies": self.cache.replies_bytes, "upstream": self.cache.upstream_bytes,
                  "decisions": self.cache.decisions * DECISION_COST, "exact": self.cache.exact_replies * EXACT_COST}
        for cache, measure in used.items():
            DNS_CACHE_BYTES.labels(cache).set_function(measure)
            DNS_CACHE_LIMIT.labels(cache).set(limits[cache])

    def reply_view(self, client: Client, snapshot: Snapshot, state: StateView, now: float) -> object | None:
        """What a reply for `client` may be cached under right now: the group when all its devices get the same
        answers; the device when a screen-time budget makes answers (and their lifetimes) per device; None while
        an override concerns the group. Remembered per group until its profile changes."""
        known = self._views.get(client.group)
        if known is None or known[0] != snapshot.generation or known[1] != state.version or now >= known[2]:
            in_force = snapshot.profile_in_force(client.group, datetime.fromtimestamp(now, UTC))
            kind = _NOT_CACHED if client.group in state.override_groups else \
                _PER_DEVICE if snapshot.profiles[in_force.profile].profile.screen_time_minutes is not None else \
                _SHARED
            known = (snapshot.generation, state.version, in_force.until.timestamp() if in_force.until else
                     float("inf"), kind)
            self._views[client.group] = known
        kind = known[3]
        if kind is _SHARED or (kind is _PER_DEVICE and client.device is None):
            return (snapshot.generation, client.group)
        if kind is _PER_DEVICE:
            return (snapshot.generation, client.group, client.device)
        return None

    def view_until(self, client: Client) -> float:
        """Wall-clock time until which `reply_view` gives `client` the same view (the next profile change)."""
        known = self._views.get(client.group)
        return known[2] if known is not None else 0.0

    async def handle(self, packet: bytes, client_address: str) -> Answered | None:
        started = time.perf_counter()
        try:
            request = DNSRecord.parse(packet)
        except Exception:  # dnslib raises several kinds on garbage; all mean "malformed"
            DNS_ERRORS.labels("formerr").inc()
            return _raw(formerr_for(packet))
        if request.header.qr or len(request.questions) != 1:
            DNS_ERRORS.labels("formerr").inc()
            return _raw(formerr_for(packet))
        if request.header.opcode != OPCODE.QUERY:  # NOTIFY, UPDATE, STATUS…: not a resolver's business
            DNS_ERRORS.labels("notimp").inc()
            return _raw(header_reply(packet, RCODE.NOTIMP))
        labels: tuple[str, ...] = ()
        view, counted = None, None
        try:
            snapshot = self.current_snapshot()
            client = snapshot.identify(client_address)
            reply, labels, counted = await self._answer(request, client, snapshot)
            if client is not None:
                view = self.reply_view(client, snapshot, self.current_state(), self.clock())
        except Exception:
            log.exception("internal error answering a query; answered SERVFAIL")
            DNS_ERRORS.labels("internal").inc()
            reply = _Reply(rcode_reply(request, RCODE.SERVFAIL))
        DNS_LATENCY.observe(time.perf_counter() - started)
        try:
            wire = reply.record.pack()
        except (DNSError, DNSLabelError, DnsBufferError):  # a name dnslib read but cannot write: the header alone
            DNS_ERRORS.labels("formerr").inc()
            return _raw(formerr_for(packet))
        return Answered(wire, reply.lifetime, labels, view, count_device=counted)

    async def _answer(self, request: DNSRecord, client: Client | None,
                      snapshot: Snapshot) -> tuple[_Reply, tuple[str, ...], str | None]:
        """The reply, its metric labels, and the device whose minute it counted (if any)."""
        question = request.questions[0]
        if client is None:
            QUERIES.inc(*UNKNOWN_CLIENT)
            return _Reply(rcode_reply(request, RCODE.REFUSED)), UNKNOWN_CLIENT, None
        qname = str(question.qname).rstrip(".").lower()
        if qname == RESOLVER_ARPA or qname.endswith("." + RESOLVER_ARPA):
            return _Reply(resolver_arpa_answer(request, qname)), (), None
        if not qname:  # the root: no site to judge, and resolvers behind Vigie ask it
            labels = (client.group, Action.ALLOW.value, "default", "none")
            QUERIES.inc(*labels)
            return await self._forward(request, snapshot.rules.server.dns.max_ttl_seconds, client, snapshot,
                                       datetime.fromtimestamp(self.clock(), UTC)), labels, None
        try:
            name = normalize_domain(qname)
        except NameRejected:
            DNS_ERRORS.labels("formerr").inc()
            return _Reply(rcode_reply(request, RCODE.FORMERR)), (), None
        now = datetime.fromtimestamp(self.clock(), UTC)
        decision = self._verdict(snapshot, client, name, now)
        labels = decision.labels
        QUERIES.inc(*labels)
        ttl_cap = decision.ttl_cap(snapshot, now)
        if decision.action is Action.BLOCK:
            ttl = min(ttl_cap, BLOCK_TTL)
            reply = _Reply(self._block_reply(request, decision, snapshot, ttl,
                                             opens=self._opening(client, name, now, snapshot)), ttl)
        elif decision.action is Action.REFUSE:
            reply = _Reply(rcode_reply(request, RCODE.REFUSED))
        elif question.qtype in _SVCB_TYPES and decision.action is Action.REWRITE:
            # No HTTPS/SVCB hints around the rewrite.
            reply = _Reply(with_edns(request, reply_to(request)), min(ttl_cap, BLOCK_TTL))
        elif decision.action is Action.REWRITE and decision.rewrite_to:
            reply = await self._rewrite_reply(request, decision.rewrite_to, ttl_cap, snapshot)
        else:
            reply = await self._forward(request, ttl_cap, client, snapshot, now)
        return reply, labels, client.device if decision.counts_screen_time else None

    def _verdict(self, snapshot: Snapshot, client: Client, name: str, now: datetime) -> Verdict:
        """The cached verdict (see `Verdicts`); a request that counts as screen time marks the device's minute."""
        verdict = self.verdicts.of(snapshot, client, name, now)
        if verdict.counts_screen_time and client.device is not None:
            self.count_minute(client.device)
        return verdict

    def _block_reply(self, request: DNSRecord, decision: Verdict, snapshot: Snapshot, ttl: int,
                     via: str | None = None, opens: str = "") -> DNSRecord:
        """The block answer for the question; `via`: the chained name or address of the answer that was blocked,
        named in the extended error text, with `opens` (when the site opens again)."""
        text = decision.extended_text + (f" (via {via})" if via else "") + opens
        return block_answer(request, snapshot.rules.server.dns, snapshot.generation, ttl, decision.extended_error,
                            text)

    def _opening(self, client: Client, name: str, now: datetime, snapshot: Snapshot) -> str:
        """When `name` opens again for `client`, for the extended error text (as the block page and `vigie explain`
        say it): the first instant the engine allows it, within OPENING_HORIZON."""
        opens = next_allowed(Query(client, name, now), snapshot, self.current_state())
        if opens is None:
            return f"; not allowed in the next {OPENING_HORIZON.days} days"
        return f"; allowed again {opens.astimezone(snapshot.clock.zone):%Y-%m-%d %H:%M}"

    async def _rewrite_reply(self, request: DNSRecord, target: str, ttl_cap: int, snapshot: Snapshot) -> _Reply:
        question = request.questions[0]
        reply = reply_to(request)
        ttl = min(ttl_cap, 300)
        reply.add_answer(RR(question.qname, QTYPE.CNAME, rdata=CNAME(target + "."), ttl=ttl))
        if question.qtype in (QTYPE.A, QTYPE.AAAA):
            target_answer, _, _ = await self._upstream(target, question.qtype)
            if target_answer.header.rcode != RCODE.NOERROR:
                return _Reply(with_edns(request, reply))
            for rr in target_answer.rr:
                if rr.rtype == question.qtype:
                    rr.ttl = min(rr.ttl, ttl)
                    reply.add_answer(rr)
        return _Reply(with_edns(request, reply), min_ttl(reply))

    async def _forward(self, request: DNSRecord, ttl_cap: int, client: Client, snapshot: Snapshot,
                       now: datetime) -> _Reply:
        upstream_answer, lifetime, raw = await self._upstream(str(request.q.qname), request.q.qtype)
        if upstream_answer.header.rcode not in _PASSED_RCODES:  # as on the bytes path: the upstream failed us
            return _Reply(with_edns(request, rcode_reply(request, RCODE.SERVFAIL)))
        if raw is not None and raw.leads_elsewhere:
            judged = self.judge_answer(raw, client, snapshot, now, ttl_cap)
            if judged.blocked is not None:
                ttl = min(judged.ttl_cap, BLOCK_TTL)
                opens = self._opening(client, judged.via, now, snapshot) \
                    if judged.via and is_plain_name(judged.via) else ""  # a chained name, not a listed address
                return _Reply(self._block_reply(request, judged.blocked, snapshot, ttl, judged.via, opens), ttl)
            ttl_cap = judged.ttl_cap
        reply = reply_to(request)
        reply.header.rcode = upstream_answer.header.rcode
        for section, add in ((upstream_answer.rr, reply.add_answer), (upstream_answer.auth, reply.add_auth)):
            for rr in section:
                rr.ttl = min(rr.ttl, ttl_cap)
                add(rr)
        for rr in upstream_answer.ar:
            if rr.rtype != QTYPE.OPT:
                rr.ttl = min(rr.ttl, ttl_cap)
                reply.add_ar(rr)
        return _Reply(with_edns(request, reply), min(lifetime, ttl_cap) if reply.rr or reply.auth else 0)

    def judge_answer(self, answer: UpstreamAnswer, client: Client, snapshot: Snapshot, now: datetime,
                     ttl_cap: int) -> Judged:
        """Decide every name the answer points at (CNAME, DNAME, HTTPS/SVCB targets) as if the client had asked
        it, and look up every address it gives in the address lists: an unlisted name that is an alias of a
        blocked one, or that resolves to a listed resolver's address, is blocked with it. The answer's TTLs are
        capped by the judged names' decisions too."""
        for target in answer.targets:
            try:
                name = normalize_domain(target)
            except NameRejected:
                continue  # no client can ask for it by that name; its addresses are judged below
            verdict = self._verdict(snapshot, client, name, now)
            if verdict.action in (Action.BLOCK, Action.REFUSE):
                DNS_ANSWER_BLOCKS.labels(verdict.labels[2], verdict.labels[3]).inc()
                return Judged(verdict, name, ttl_cap)
            ttl_cap = min(ttl_cap, verdict.ttl_cap(snapshot, now))
        for address in answer.addresses:
            listed = listed_address(client, address, now, snapshot)
            if listed is not None:
                verdict = Verdict.of(listed)
                DNS_ANSWER_BLOCKS.labels(verdict.labels[2], verdict.labels[3]).inc()
                return Judged(verdict, address, ttl_cap)
        return Judged(None, None, ttl_cap)

    async def _upstream(self, name: str, qtype: int) -> tuple[DNSRecord, float, UpstreamAnswer | None]:
        """The upstream answer for (name, type), how long it stays valid, and its bytes with what they lead to;
        SERVFAIL (and None) when no upstream answers and nothing is cached, not even stale."""
        try:
            answer = await self.forwarder.answer(question_bytes(name, qtype))
        except UpstreamFailure:
            DNS_ERRORS.labels("upstream").inc()
            failed = DNSRecord.question(name, QTYPE[qtype]).reply()
            failed.header.rcode = RCODE.SERVFAIL
            return failed, 0.0, None
        return DNSRecord.parse(answer.wire), answer.lifetime, answer

    def plan_plain(self, query: PlainQuery, client: Client, snapshot: Snapshot, view: object | None,
                   started: float) -> PlainPlan | None:
        """The bytes path for a plain query from `client` whose name is allowed: what its reply will depend on,
        decided now (`view`: what the reply may be cached under; `started`: perf_counter at arrival); the upstream
        answer is then given to `finish_plain`. None sends the query the dnslib way (blocks, rewrites, anything
        unusual)."""
        name = plain_name(query.question)
        if name is None or name.endswith(RESOLVER_ARPA):
            return None  # the dnslib path answers `resolver.arpa` (and ends `xresolver.arpa`'s detour there)
        now = datetime.fromtimestamp(self.clock(), UTC)
        decision = self._verdict(snapshot, client, name, now)
        if decision.action is not Action.ALLOW:
            return None
        QUERIES.inc(*decision.labels)
        return PlainPlan(started, decision.labels, decision.ttl_cap(snapshot, now), view,
                         client.device if decision.counts_screen_time else None, client, snapshot)

    def finish_plain(self, packet: bytes, query: PlainQuery, plan: PlainPlan,
                     upstream: UpstreamAnswer | UpstreamFailure) -> Answered | None:
        """The reply to a forwarded plain query; None when its answer leads to something blocked (the dnslib path
        then builds the block answer)."""
        if isinstance(upstream, UpstreamFailure):
            DNS_ERRORS.labels("upstream").inc()
            return Answered(servfail(packet, query))
        if upstream.wire[3] & 0x0F not in _PASSED_RCODES:
            return Answered(servfail(packet, query))
        ttl_cap = plan.ttl_cap
        # Most answers: addresses no list names, no alias. Only then is the clock read and the answer judged whole.
        listed = plan.snapshot.lists.addresses.get
        if upstream.targets or any(listed(address, 0) for address in upstream.addresses):
            judged = self.judge_answer(upstream, plan.client, plan.snapshot,
                                       datetime.fromtimestamp(self.clock(), UTC), ttl_cap)
            if judged.blocked is not None:
                return None
            ttl_cap = judged.ttl_cap
        reply = client_reply(packet, query, upstream, ttl_cap)
        DNS_LATENCY.observe(time.perf_counter() - plan.started)
        # Just fetched, the answer is cached upstream-side only: most names are asked once (on a busy day, and in
        # the benchmark's mixed load), and the reply cache takes the answer when it is asked again.
        lifetime = min(upstream.lifetime, ttl_cap) if upstream.offsets and not upstream.fetched else 0.0
        return Answered(reply, lifetime, plan.labels, plan.view, True, plan.count_device, upstream.offsets)


def _raw(wire: bytes | None) -> Answered | None:
    return None if wire is None else Answered(wire)


