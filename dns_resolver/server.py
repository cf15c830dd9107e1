"""The DNS front: parse, identify the client, ask the engine, answer (block, safe search) or forward.

Each stage either answers or passes on:
  malformed → FORMERR · not a QUERY → NOTIMP · client not ours → REFUSED · `resolver.arpa` → answered here ·
  the root → forwarded · decision cached or made · block → block answer · rewrite → CNAME to the safe-search
  endpoint + its addresses · allow → answer cache, else upstream → every name and address of the answer judged
Any internal error answers SERVFAIL (never NXDOMAIN, never silence) and is counted. No answer carries AA (Vigie is
authoritative for nothing but `resolver.arpa`) or AD (it validates nothing).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import NamedTuple, Protocol

from dnslib import AAAA, CNAME, EDNS0, OPCODE, QTYPE, RCODE, RR, SOA, A, DNSError, DNSRecord, EDNSOption
from dnslib.buffer import BufferError as DnsBufferError
from dnslib.label import DNSLabelError

from blocklists.errors import NameRejected
from blocklists.names import normalize_domain
from dns_resolver.budget import DECISION_COST, EXACT_COST, CacheBudget
from dns_resolver.fastpath import (
    MAX_UDP_ANSWER,
    ExactReplies,
    ExactReply,
    PlainQuery,
    RateLimiter,
    ReplyCache,
    read_plain_query,
)
from dns_resolver.forwarding import OUR_OPT, Forwarder, UpstreamAnswer
from dns_resolver.upstream import UpstreamFailure, UpstreamPool
from policy.clients import Client
from policy.decision import Action, Decision, Query
from policy.destination import listed_address
from policy.engine import OPENING_HORIZON, decide, next_allowed
from policy.metrics import (
    DNS_ANSWER_BLOCKS,
    DNS_CACHE_BYTES,
    DNS_CACHE_LIMIT,
    DNS_ERRORS,
    DNS_LATENCY,
    DNS_RATE_LIMITED,
    QUERIES,
    REPLY_CACHE,
)
from policy.model import BlockAnswer, DnsSettings, SocketAddress
from policy.snapshot import Snapshot
from policy.state import StateView

log = logging.getLogger(__name__)

EDE_OPTION = 15
EDE_BLOCKED, EDE_FILTERED = 15, 17
BLOCK_TTL = 60
BLOCK_SOA_NAME = "blocked.vigie.invalid."  # RFC 6761: a name that never resolves
ONE_WORKER_DEFAULT = CacheBudget.share(DnsSettings.cache_bytes, 1)
MAX_CLIENTS = 10_000  # source addresses remembered with their client, per worker (a city: ~5,000 tablets)
_SVCB_TYPES = {QTYPE.HTTPS, QTYPE.SVCB}
_PASSED_RCODES = (RCODE.NOERROR, RCODE.NXDOMAIN)  # as plain ints: dnslib's RCODE.X is a Python-level lookup
_SHARED, _PER_DEVICE, _NOT_CACHED = object(), object(), object()  # how a group's replies are cached
_UNKNOWN_CLIENT = ("unknown", "refuse", "unknown_client", "none")
# RFC 9462 §6.5: a forwarder answers these itself. Vigie designates no encrypted resolver: an empty answer.
RESOLVER_ARPA = "resolver.arpa"
_HOST_BYTES = b"abcdefghijklmnopqrstuvwxyz0123456789-_."  # what a plain name is made of, in lower case
_TTL, _COUNT = struct.Struct("!I"), struct.Struct("!H")


def formerr_for(packet: bytes) -> bytes | None:
    """A FORMERR header echoing the query's ID, or None when not even a header can be read (then: silence)."""
    if len(packet) < 12:
        return None
    query_id, flags = struct.unpack("!HH", packet[:4])
    if flags & 0x8000:
        return None  # a response, not a query: never answer it (no reflection loops)
    return struct.pack("!HHHHHH", query_id, 0x8000 | (flags & 0x7900) | RCODE.FORMERR, 0, 0, 0, 0)


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


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the DNS front needs of a Decision. A Decision carries its explanation (~1 KB); equal verdicts are one
    object here, so the decision cache costs a key per name: thousands of names allowed by default share one."""

    action: Action
    labels: tuple[str, str, str, str]
    until: datetime | None
    counts_screen_time: bool
    rewrite_to: str | None
    extended_error: int  # RFC 8914 info code of a block
    extended_text: str  # the categories, or the reason

    @classmethod
    def of(cls, decision: Decision) -> Verdict:
        code = EDE_BLOCKED if decision.categories or decision.reason.value in ("deny_list", "bypass") \
            else EDE_FILTERED
        return cls(decision.action, decision.labels, decision.until, decision.counts_screen_time,
                   decision.rewrite_to, code, ", ".join(decision.categories) or decision.reason.value)


@dataclass(frozen=True)
class _Reply:
    record: DNSRecord
    lifetime: float = 0.0


class DnsFront:
    """Protocol-independent handling of one query; the UDP and TCP servers below only move bytes."""

    def __init__(self, current_snapshot: Callable[[], Snapshot], current_state: Callable[[], StateView],
                 upstreams: UpstreamPool, count_minute: Callable[[str], None] = lambda device: None,
                 rate_limit: int = 0, clock: Callable[[], float] = time.time,
                 cache: CacheBudget = ONE_WORKER_DEFAULT) -> None:
        self.current_snapshot = current_snapshot
        self.current_state = current_state
        self.count_minute = count_minute  # the device's current minute counts as screen time
        self.upstreams = upstreams
        self.clock = clock
        self._decisions: OrderedDict[tuple[int, int, str, str | None, str], Verdict] = OrderedDict()
        self._verdicts: dict[tuple[object, ...], Verdict] = {}
        self.cache = cache
        self.forwarder = Forwarder(upstreams, max_bytes=cache.upstream_bytes)
        self.rate_limiter = RateLimiter(rate_limit) if rate_limit else None
        self._clients: dict[str, tuple[int, Client | None]] = {}
        self._views: dict[str, tuple[int, int, float, object]] = {}
        self.replies = ReplyCache(cache.replies_bytes)
        self.exact_indexes: list[ExactReplies] = []  # one per UDP socket
        self.tcp_connections: dict[str, int] = {}  # open TCP connections per client address
        self.tcp_open = 0  # all of them, up to tcp_cap
        self.tcp_cap = tcp_connection_cap()
        self.tcp_full_since: float | None = None  # when the total cap was reached (logged once)
        self._publish_cache_memory()

    def _publish_cache_memory(self) -> None:
        """Each cache's memory and limit as gauges, read when Prometheus scrapes (so that an admin can see whether
        `dns.cache_size` is too small: caches at their limit and a low hit rate)."""
        used = {"replies": lambda: self.replies.memory, "upstream": lambda: self.forwarder.memory,
                "decisions": lambda: len(self._decisions) * DECISION_COST,
                "exact": lambda: sum(map(len, self.exact_indexes)) * EXACT_COST}
        limits = {"replies": self.cache.replies_bytes, "upstream": self.cache.upstream_bytes,
                  "decisions": self.cache.decisions * DECISION_COST, "exact": self.cache.exact_replies * EXACT_COST}
        for cache, measure in used.items():
            DNS_CACHE_BYTES.labels(cache).set_function(measure)
            DNS_CACHE_LIMIT.labels(cache).set(limits[cache])

    def client_of(self, address: str, snapshot: Snapshot) -> Client | None:
        """The client behind a source address, remembered per rules generation (parsing an address costs more
        than answering from the cache)."""
        known = self._clients.get(address)
        if known is not None and known[0] == snapshot.generation:
            return known[1]
        if len(self._clients) > MAX_CLIENTS:
            self._clients.clear()
        client = snapshot.identify(address)
        self._clients[address] = (snapshot.generation, client)
        return client

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
            return _raw(_header_reply(packet, RCODE.NOTIMP))
        labels: tuple[str, ...] = ()
        view, counted = None, None
        try:
            snapshot = self.current_snapshot()
            client = self.client_of(client_address, snapshot)
            reply, labels, counted = await self._answer(request, client, snapshot)
            if client is not None:
                view = self.reply_view(client, snapshot, self.current_state(), self.clock())
        except Exception:
            log.exception("internal error answering a query; answered SERVFAIL")
            DNS_ERRORS.labels("internal").inc()
            reply = _Reply(_rcode_reply(request, RCODE.SERVFAIL))
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
            QUERIES.inc(*_UNKNOWN_CLIENT)
            return _Reply(_rcode_reply(request, RCODE.REFUSED)), _UNKNOWN_CLIENT, None
        qname = str(question.qname).rstrip(".").lower()
        if qname == RESOLVER_ARPA or qname.endswith("." + RESOLVER_ARPA):
            return _Reply(self._resolver_arpa_reply(request, qname)), (), None
        if not qname:  # the root: no site to judge, and resolvers behind Vigie ask it
            labels = (client.group, Action.ALLOW.value, "default", "none")
            QUERIES.inc(*labels)
            return await self._forward(request, snapshot.rules.server.dns.max_ttl_seconds, client, snapshot,
                                       datetime.fromtimestamp(self.clock(), UTC)), labels, None
        try:
            name = normalize_domain(qname)
        except NameRejected:
            DNS_ERRORS.labels("formerr").inc()
            return _Reply(_rcode_reply(request, RCODE.FORMERR)), (), None
        now = datetime.fromtimestamp(self.clock(), UTC)
        decision = self._verdict(snapshot, client, name, now)
        labels = decision.labels
        QUERIES.inc(*labels)
        ttl_cap = self._ttl_cap(decision, snapshot, now)
        if decision.action is Action.BLOCK:
            ttl = min(ttl_cap, BLOCK_TTL)
            reply = _Reply(self._block_reply(request, decision, snapshot, ttl,
                                             opens=self._opening(client, name, now, snapshot)), ttl)
        elif decision.action is Action.REFUSE:
            reply = _Reply(_rcode_reply(request, RCODE.REFUSED))
        elif question.qtype in _SVCB_TYPES and decision.action is Action.REWRITE:
            # No HTTPS/SVCB hints around the rewrite.
            reply = _Reply(_with_edns(request, _reply_to(request)), min(ttl_cap, BLOCK_TTL))
        elif decision.action is Action.REWRITE and decision.rewrite_to:
            reply = await self._rewrite_reply(request, decision.rewrite_to, ttl_cap, snapshot)
        else:
            reply = await self._forward(request, ttl_cap, client, snapshot, now)
        return reply, labels, client.device if decision.counts_screen_time else None

    def _verdict(self, snapshot: Snapshot, client: Client, name: str, now: datetime) -> Verdict:
        """Verdicts are cached per (rules generation, overrides version, group, device, name) until they expire
        (a decision under a screen-time budget expires when the budget could run out); a request that counts as
        screen time marks the device's minute."""
        state = self.current_state()
        key = (snapshot.generation, state.version, client.group, client.device, name)
        verdict = self._decisions.get(key)
        if verdict is None or (verdict.until is not None and now >= verdict.until):
            decision = decide(Query(client, name, now), snapshot, state)
            # What a Verdict is made of, as a plain tuple: hashed and compared in C (the dataclass's own hash and
            # equality are Python calls, and an enum's hash too, hence the members' `_value_`).
            made_of = (decision.action._value_, decision.reason._value_, decision.group, decision.categories,
                       decision.until, decision.counts_screen_time, decision.rewrite_to)
            verdict = self._verdicts.get(made_of)
            if verdict is None:
                if len(self._verdicts) > self.cache.decisions:
                    self._verdicts.clear()  # verdicts of past schedules or rules; those in use stay cached
                verdict = self._verdicts[made_of] = Verdict.of(decision)
            self._decisions[key] = verdict
            if len(self._decisions) > self.cache.decisions:
                self._decisions.popitem(last=False)
        if verdict.counts_screen_time and client.device is not None:
            self.count_minute(client.device)
        return verdict

    def _block_reply(self, request: DNSRecord, decision: Verdict, snapshot: Snapshot, ttl: int,
                     via: str | None = None, opens: str = "") -> DNSRecord:
        """The block answer for the question; `via`: the chained name or address of the answer that was blocked,
        named in the extended error text, with `opens` (when the site opens again)."""
        settings = snapshot.rules.server.dns
        question = request.questions[0]
        reply = _reply_to(request)
        if settings.block_answer is BlockAnswer.NXDOMAIN:
            reply.header.rcode = RCODE.NXDOMAIN
        elif question.qtype == QTYPE.A:
            address = settings.blockpage_ipv4 if settings.block_answer is BlockAnswer.BLOCKPAGE else "0.0.0.0"
            if address:
                reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(address), ttl=ttl))
        elif question.qtype == QTYPE.AAAA:
            address = settings.blockpage_ipv6 if settings.block_answer is BlockAnswer.BLOCKPAGE else "::"
            if address:
                reply.add_answer(RR(question.qname, QTYPE.AAAA, rdata=AAAA(address), ttl=ttl))
        if not reply.rr:
            # NXDOMAIN or no address: an SOA makes it cacheable (RFC 2308) for the block's TTL, which never
            # outlasts the decision; without one, clients would ask again at once.
            reply.add_auth(RR(question.qname, QTYPE.SOA, ttl=ttl, rdata=SOA(
                BLOCK_SOA_NAME, "hostmaster." + BLOCK_SOA_NAME, (snapshot.generation % 2**32, 3600, 600, 86400, ttl))))
        text = decision.extended_text + (f" (via {via})" if via else "") + opens
        return _with_edns(request, reply, EDNSOption(EDE_OPTION, struct.pack("!H", decision.extended_error)
                                                     + text.encode()))

    def _opening(self, client: Client, name: str, now: datetime, snapshot: Snapshot) -> str:
        """When `name` opens again for `client`, for the extended error text (as the block page and `vigie explain`
        say it): the first instant the engine allows it, within OPENING_HORIZON."""
        opens = next_allowed(Query(client, name, now), snapshot, self.current_state())
        if opens is None:
            return f"; not allowed in the next {OPENING_HORIZON.days} days"
        return f"; allowed again {opens.astimezone(snapshot.clock.zone):%Y-%m-%d %H:%M}"

    @staticmethod
    def _resolver_arpa_reply(request: DNSRecord, qname: str) -> DNSRecord:
        """`resolver.arpa` and `_dns.resolver.arpa` exist and hold nothing (no designated encrypted resolver, RFC
        9462): an authoritative empty answer; any other name below them does not exist."""
        reply = _reply_to(request)
        reply.header.aa = 1
        if qname not in (RESOLVER_ARPA, "_dns." + RESOLVER_ARPA):
            reply.header.rcode = RCODE.NXDOMAIN
        return _with_edns(request, reply)

    async def _rewrite_reply(self, request: DNSRecord, target: str, ttl_cap: int, snapshot: Snapshot) -> _Reply:
        question = request.questions[0]
        reply = _reply_to(request)
        ttl = min(ttl_cap, 300)
        reply.add_answer(RR(question.qname, QTYPE.CNAME, rdata=CNAME(target + "."), ttl=ttl))
        if question.qtype in (QTYPE.A, QTYPE.AAAA):
            target_answer, _, _ = await self._upstream(target, question.qtype)
            if target_answer.header.rcode != RCODE.NOERROR:
                return _Reply(_with_edns(request, reply))
            for rr in target_answer.rr:
                if rr.rtype == question.qtype:
                    rr.ttl = min(rr.ttl, ttl)
                    reply.add_answer(rr)
        return _Reply(_with_edns(request, reply), _min_ttl(reply))

    async def _forward(self, request: DNSRecord, ttl_cap: int, client: Client, snapshot: Snapshot,
                       now: datetime) -> _Reply:
        upstream_answer, lifetime, raw = await self._upstream(str(request.q.qname), request.q.qtype)
        if upstream_answer.header.rcode not in _PASSED_RCODES:  # as on the bytes path: the upstream failed us
            return _Reply(_with_edns(request, _rcode_reply(request, RCODE.SERVFAIL)))
        if raw is not None and raw.leads_elsewhere:
            judged = self.judge_answer(raw, client, snapshot, now, ttl_cap)
            if judged.blocked is not None:
                ttl = min(judged.ttl_cap, BLOCK_TTL)
                opens = self._opening(client, judged.via, now, snapshot) if judged.via and \
                    not judged.via[-1].isdigit() and ":" not in judged.via else ""  # a name, not an address
                return _Reply(self._block_reply(request, judged.blocked, snapshot, ttl, judged.via, opens), ttl)
            ttl_cap = judged.ttl_cap
        reply = _reply_to(request)
        reply.header.rcode = upstream_answer.header.rcode
        for section, add in ((upstream_answer.rr, reply.add_answer), (upstream_answer.auth, reply.add_auth)):
            for rr in section:
                rr.ttl = min(rr.ttl, ttl_cap)
                add(rr)
        for rr in upstream_answer.ar:
            if rr.rtype != QTYPE.OPT:
                rr.ttl = min(rr.ttl, ttl_cap)
                reply.add_ar(rr)
        return _Reply(_with_edns(request, reply), min(lifetime, ttl_cap) if reply.rr or reply.auth else 0)

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
            ttl_cap = min(ttl_cap, self._ttl_cap(verdict, snapshot, now))
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
        name = _plain_name(query.question)
        if name is None or name.endswith(RESOLVER_ARPA):
            return None  # the dnslib path answers `resolver.arpa` (and ends `xresolver.arpa`'s detour there)
        now = datetime.fromtimestamp(self.clock(), UTC)
        decision = self._verdict(snapshot, client, name, now)
        if decision.action is not Action.ALLOW:
            return None
        QUERIES.inc(*decision.labels)
        return PlainPlan(started, decision.labels, self._ttl_cap(decision, snapshot, now), view,
                         client.device if decision.counts_screen_time else None, client, snapshot)

    def finish_plain(self, packet: bytes, query: PlainQuery, plan: PlainPlan,
                     upstream: UpstreamAnswer | UpstreamFailure) -> Answered | None:
        """The reply to a forwarded plain query; None when its answer leads to something blocked (the dnslib path
        then builds the block answer)."""
        if isinstance(upstream, UpstreamFailure):
            DNS_ERRORS.labels("upstream").inc()
            return Answered(_servfail(packet, query))
        if upstream.wire[3] & 0x0F not in _PASSED_RCODES:
            return Answered(_servfail(packet, query))
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

    @staticmethod
    def _ttl_cap(decision: Verdict, snapshot: Snapshot, now: datetime) -> int:
        """An answer never outlives the decision behind it (the next schedule change, an override's end)."""
        max_ttl = snapshot.rules.server.dns.max_ttl_seconds
        if decision.until is None:
            return max_ttl
        return max(0, min(max_ttl, int((decision.until - now).total_seconds())))


def question_bytes(name: str, qtype: int) -> bytes:
    """The question section for (name, type, class IN), lower-cased, as the forwarder keys it."""
    labels = b"".join(bytes((len(label),)) + label.encode("ascii") for label in name.lower().split(".") if label)
    return labels + b"\x00" + struct.pack("!HH", qtype, 1)


def _plain_name(question: bytes) -> str | None:
    """`\x03www\x07example\x02fr\x00...` → `www.example.fr`, or None when a label is not a plain host label
    (letters, digits, `-`, `_`: the question is lower-cased already)."""
    labels, index = [], 0
    while question[index]:
        labels.append(question[index + 1:index + 1 + question[index]])
        index += question[index] + 1
    name = b".".join(labels)
    if not name or name.translate(None, _HOST_BYTES) or name.count(b".") != len(labels) - 1:
        return None  # another byte, or a dot inside a label
    return name.decode("ascii")


def client_reply(packet: bytes, query: PlainQuery, upstream: UpstreamAnswer, ttl_cap: int) -> bytes:
    """The upstream answer made the client's: its ID, RD bit and question case, TTLs capped, our EDNS record
    only if the client sent one (the forwarder already dropped the upstream's own)."""
    wire, start = upstream.wire, upstream.question_end
    records = wire[start:]
    capped: bytearray | None = None
    for offset in upstream.offsets:
        if _TTL.unpack_from(records, offset)[0] > ttl_cap:
            if capped is None:
                capped = bytearray(records)
            _TTL.pack_into(capped, offset, ttl_cap)
    if capped is not None:
        records = bytes(capped)
    additional = wire[10:12]
    if query.edns:
        records += OUR_OPT
        additional = _COUNT.pack((wire[10] << 8 | wire[11]) + 1)
    flags = ((wire[2] & 0xFA) | (packet[2] & 0x01), wire[3] & 0xDF | 0x80)  # no AA; the client's RD; no AD; RA
    return packet[:2] + bytes(flags) + packet[4:6] + wire[6:10] + additional + packet[12:query.question_end] + records


def _servfail(packet: bytes, query: PlainQuery) -> bytes:
    flags = bytes((0x80 | (packet[2] & 0x01), 0x80 | RCODE.SERVFAIL))
    additional = b"\x00\x01" if query.edns else b"\x00\x00"
    return packet[:2] + flags + b"\x00\x01\x00\x00\x00\x00" + additional + packet[12:query.question_end] + \
        (OUR_OPT if query.edns else b"")


def _raw(wire: bytes | None) -> Answered | None:
    return None if wire is None else Answered(wire)


def _min_ttl(record: DNSRecord) -> int:
    ttls = [rr.ttl for rr in (*record.rr, *record.auth)]
    return min(ttls) if ttls else 0


def _reply_to(request: DNSRecord) -> DNSRecord:
    """An empty reply: RA, the client's RD, neither AA (dnslib sets it) nor AD."""
    reply = request.reply(ra=1, aa=0)
    reply.header.ad = 0  # dnslib copies the query's flags, and dig sets AD in its queries
    return reply


def _rcode_reply(request: DNSRecord, rcode: int) -> DNSRecord:
    reply = _reply_to(request)
    reply.header.rcode = rcode
    return reply


def _header_reply(packet: bytes, rcode: int) -> bytes | None:
    """The query's header and question sent back with `rcode` (NOTIMP), no records; None for a response."""
    if len(packet) < 12 or packet[2] & 0x80:
        return None
    query = read_plain_query(packet[:2] + bytes((packet[2] & 0x01, 0)) + packet[4:])  # its question, if plain
    question = packet[12:query.question_end] if query is not None else b""
    flags = bytes((0x80 | (packet[2] & 0x79), 0x80 | rcode))  # QR, the opcode and RD echoed, RA
    return packet[:2] + flags + struct.pack("!HHHH", 1 if question else 0, 0, 0, 0) + question


def _with_edns(request: DNSRecord, reply: DNSRecord, *options: EDNSOption) -> DNSRecord:
    """Echo EDNS when the client used it (with our options, e.g. Extended DNS Errors); never add it otherwise."""
    if any(rr.rtype == QTYPE.OPT for rr in request.ar):
        reply.add_ar(EDNS0(udp_len=1232, opts=list(options)))
    return reply


class Closable(Protocol):
    def close(self) -> None: ...


RECEIVE_BATCH = 64  # datagrams read per wake-up before TCP, upstream answers and timers get their turn
RECEIVE_SIZE = 4096  # a query is at most 512 bytes plus EDNS options; anything longer is malformed anyway


class _UdpListener:
    """One UDP socket, read in batches straight from the event loop's readiness callback (a datagram protocol
    costs a Python call and a tuple per packet more). A repeated query is answered from `ExactReplies` by its
    bytes; other cached plain queries from the `ReplyCache`; allowed names are forwarded, the reply sent when the
    upstream calls back; anything else (blocks, rewrites, unusual packets) goes the dnslib way, as a task.

    Which exact replies a source address may get depends on its client's view (rules generation, group, device,
    the profile in force): the address → view map is emptied whenever any of those may have changed."""

    def __init__(self, front: DnsFront, sock: socket.socket, exact_replies: int) -> None:
        self.front = front
        self.sock = sock
        self.tasks: set[asyncio.Task[None]] = set()
        self.exact = ExactReplies(exact_replies)
        self._addresses_valid: tuple[object, int] = (None, -1)  # (snapshot, state version) of the address map
        self._addresses_until = float("inf")  # wall clock: the first change of profile among the mapped groups
        self._hits = REPLY_CACHE.cell("hit")
        self._misses = REPLY_CACHE.cell("miss")
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()

    def send(self, answer: bytes, addr: tuple[str, int]) -> None:
        try:
            self.sock.sendto(answer, addr)
        except OSError as exc:
            self._not_sent(exc, addr)

    def _not_sent(self, exc: OSError, addr: tuple[str, int]) -> None:
        if isinstance(exc, (BlockingIOError, InterruptedError)):
            DNS_ERRORS.labels("send").inc()  # the socket's send buffer is full: like a lost packet, the client retries
        elif not self._closed:
            DNS_ERRORS.labels("send").inc()
            log.warning("cannot send a DNS answer to %s: %s", addr[0], exc)

    def readable(self) -> None:
        front = self.front
        snapshot, state = front.current_snapshot(), front.current_state()
        if (snapshot, state.version) != self._addresses_valid or front.clock() >= self._addresses_until:
            self.exact.clear()
            self._addresses_valid, self._addresses_until = (snapshot, state.version), float("inf")
        receive, sendto, by_address, limiter = self.sock.recvfrom, self.sock.sendto, self.exact.by_address, \
            front.rate_limiter
        started = time.perf_counter()
        now = time.monotonic()
        hits = 0
        for _ in range(RECEIVE_BATCH):
            try:
                data, addr = receive(RECEIVE_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                if self._closed:
                    return
                continue
            if limiter is not None and not limiter.allow(addr[0], now):
                DNS_RATE_LIMITED.inc()
                continue
            replies = by_address.get(addr[0])
            if replies is not None:
                exact = replies.get(data[2:])
                if exact is not None and now < exact.fresh_until:
                    try:  # `send`, inlined: this is most answers
                        sendto(data[:2] + exact.body, addr)
                    except OSError as exc:
                        self._not_sent(exc, addr)
                    exact.hits += 1
                    exact.counter[0] += 1
                    if exact.count_device is not None:
                        front.count_minute(exact.count_device)
                    hits += 1
                    continue
            try:
                self._answer_other(data, addr, now)
            except Exception:  # a bug: counted and logged; the dnslib path still answers (SERVFAIL at worst)
                DNS_ERRORS.labels("internal").inc()
                log.exception("internal error on the bytes path; answering through dnslib")
                self._answer_later(data, addr, None)
        if hits:
            self._hits[0] += hits
            DNS_LATENCY.observe((time.perf_counter() - started) / hits, hits)  # the batch's mean, per answer

    def _answer_other(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        started = time.perf_counter()
        query = read_plain_query(data)
        if query is not None:
            front = self.front
            snapshot = front.current_snapshot()
            client = front.client_of(addr[0], snapshot)
            if client is None:
                self._answer_later(data, addr, query)  # REFUSED, counted there
                return
            view = front.reply_view(client, snapshot, front.current_state(), front.clock())
            if view is not None:
                replies = self.exact.by_address.get(addr[0])
                if replies is None:
                    replies = self.exact.map_address(addr[0], view)
                    self._addresses_until = min(self._addresses_until, front.view_until(client))
                exact = replies.get(data[2:])
                if exact is not None:  # indexed, but its second is over: age it, or drop it when expired
                    if self.exact.refresh(exact, now):
                        self._answer_exact(exact, query, data, addr)
                        return
                    del replies[data[2:]]
                hit = front.replies.reply(view, query, data)
                if hit is not None:
                    self.send(hit[0], addr)
                    if hit[2]:
                        front.forwarder.prefetch(query.question)
                    entry = hit[1]
                    counter = QUERIES.cell(*entry.labels)
                    counter[0] += 1
                    self._hits[0] += 1
                    self.exact.add(addr[0], data, query, entry, counter, now)
                    if entry.count_device is not None:
                        front.count_minute(entry.count_device)
                    DNS_LATENCY.observe(time.perf_counter() - started)
                    return
            self._misses[0] += 1
            try:
                plan = front.plan_plain(query, client, snapshot, view, started)
            except Exception:  # a bug: counted and logged; the dnslib path below still answers
                DNS_ERRORS.labels("internal").inc()
                log.exception("internal error on the bytes path; answering through dnslib")
                plan = None
            if plan is not None:
                front.forwarder.when_answered(query.question, partial(self._forwarded, data, addr, query, plan))
                return
        self._answer_later(data, addr, query)

    def _answer_exact(self, exact: ExactReply, query: PlainQuery, data: bytes, addr: tuple[str, int]) -> None:
        self.send(data[:2] + exact.body, addr)
        if exact.entry.take_prefetch(time.monotonic()):
            self.front.forwarder.prefetch(query.question)
        exact.counter[0] += 1
        self._hits[0] += 1
        if exact.count_device is not None:
            self.front.count_minute(exact.count_device)

    def _forwarded(self, data: bytes, addr: tuple[str, int], query: PlainQuery, plan: PlainPlan,
                   result: UpstreamAnswer | UpstreamFailure) -> None:
        """The upstream answered (or failed) a plain query: reply, cache, index."""
        try:
            answered = self.front.finish_plain(data, query, plan, result)
        except Exception:
            DNS_ERRORS.labels("internal").inc()
            log.exception("internal error on the bytes path; answering through dnslib")
            answered = None
        if answered is None:
            self._answer_later(data, addr, query)  # blocked by what the answer leads to, or a bug: dnslib answers
            return
        self._deliver(answered, data, addr, query)

    def _answer_later(self, data: bytes, addr: tuple[str, int], query: PlainQuery | None) -> None:
        """The dnslib path, which answers every case (blocks, rewrites, malformed input), as a task."""
        task = asyncio.ensure_future(self._reply(data, addr, query))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reply(self, data: bytes, addr: tuple[str, int], query: PlainQuery | None) -> None:
        answered = await self.front.handle(data, addr[0])
        if answered is not None:
            self._deliver(answered, data, addr, query)

    def _deliver(self, answered: Answered, data: bytes, addr: tuple[str, int], query: PlainQuery | None) -> None:
        if self._closed:
            return
        answer = answered.wire
        if query is not None and answered.lifetime and answered.view is not None:
            # Into the reply cache only: the exact bytes are indexed at the entry's first hit, so that a name
            # asked twice costs one entry there, not two.
            self.front.replies.store(answered.view, query, answer, answered.lifetime, answered.labels,
                                     from_upstream=answered.from_upstream, count_device=answered.count_device,
                                     offsets=answered.ttl_offsets)
        limit = query.udp_size if query is not None else _client_udp_size(data)
        if len(answer) > limit:
            answer = _truncated(answer)
        self.send(answer, addr)


def _client_udp_size(packet: bytes) -> int:
    try:
        request = DNSRecord.parse(packet)
    except Exception:
        return 512
    for rr in request.ar:
        if rr.rtype == QTYPE.OPT:
            return max(512, min(int(rr.rclass), MAX_UDP_ANSWER))
    return 512


def _truncated(answer: bytes) -> bytes:
    """Header and question only, TC set: the client retries over TCP."""
    record = DNSRecord.parse(answer)
    record.rr, record.auth, record.ar = [], [], []
    record.header.tc = 1
    wire: bytes = record.pack()
    return wire


TCP_CONNECTIONS_PER_CLIENT = 32  # a resolver or a browser keeps a few; thousands would be an attack on our files
TCP_CONNECTIONS_TOTAL = 2000  # per worker, whoever opens them
TCP_IDLE_SECONDS = 10


def tcp_connection_cap() -> int:
    """Open TCP connections a worker accepts: TCP_CONNECTIONS_TOTAL, and never more than half the files the
    process may open, so that upstream sockets, the state store and reloads always find one."""
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY:
        return TCP_CONNECTIONS_TOTAL
    return max(16, min(TCP_CONNECTIONS_TOTAL, soft_limit // 2))


async def _serve_tcp_client(front: DnsFront, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    address = writer.get_extra_info("peername")[0]
    open_now = front.tcp_connections.get(address, 0)
    if open_now >= TCP_CONNECTIONS_PER_CLIENT or front.tcp_open >= front.tcp_cap:
        DNS_RATE_LIMITED.inc()
        if front.tcp_open >= front.tcp_cap and front.tcp_full_since is None:
            front.tcp_full_since = time.monotonic()
            log.warning("%d DNS-over-TCP connections open: new ones are closed until some end", front.tcp_open)
        writer.close()
        return
    front.tcp_connections[address] = open_now + 1
    front.tcp_open += 1
    limiter = front.rate_limiter
    try:
        while True:  # several queries per connection, under the same per-client rate as UDP
            header = await asyncio.wait_for(reader.readexactly(2), timeout=TCP_IDLE_SECONDS)
            packet = await asyncio.wait_for(reader.readexactly(struct.unpack("!H", header)[0]),
                                            timeout=TCP_IDLE_SECONDS)
            if limiter is not None and not limiter.allow(address, time.monotonic()):
                DNS_RATE_LIMITED.inc()
                break
            answered = await front.handle(packet, address)
            if answered is None:
                break
            writer.write(struct.pack("!H", len(answered.wire)) + answered.wire)
            await writer.drain()
            if answered.labels == _UNKNOWN_CLIENT:
                break  # REFUSED: a stranger does not keep a connection open
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
        front.tcp_open -= 1
        if front.tcp_open < front.tcp_cap:
            front.tcp_full_since = None
        remaining = front.tcp_connections.get(address, 1) - 1
        if remaining:
            front.tcp_connections[address] = remaining
        else:
            front.tcp_connections.pop(address, None)


RECEIVE_BUFFER_BYTES = 8 * 1024 * 1024


def _enlarge_receive_buffer(sock: socket.socket | None) -> None:
    """Room for ~80,000 queries: a pause of the process (a garbage collection, a reload) must not drop them.
    SO_RCVBUFFORCE may pass net.core.rmem_max (with CAP_NET_ADMIN); otherwise as much as allowed."""
    if sock is None:
        return
    for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if option is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, RECEIVE_BUFFER_BYTES)
            return
        except OSError:
            continue


class ListenError(Exception):
    """A DNS address cannot be listened on (taken by another server, or a privileged port)."""


def bind_udp(listen: tuple[SocketAddress, ...]) -> list[socket.socket]:
    """A non-blocking UDP socket bound on every `host:port` of `listen`, its receive buffer enlarged. Raises
    ListenError."""
    sockets: list[socket.socket] = []
    for entry in listen:
        family = socket.AF_INET6 if entry.is_ipv6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((entry.host, entry.port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            for opened in sockets:
                opened.close()
            raise ListenError(f"cannot listen for DNS on {entry} (UDP): {exc.strerror}") from None
        _enlarge_receive_buffer(sock)
        sockets.append(sock)
    return sockets


async def start_dns_servers(front: DnsFront, listen: tuple[SocketAddress, ...],
                            udp: list[socket.socket] | None = None) -> list[Closable]:
    """Serve UDP and TCP on every `host:port` of `listen`; returns what to close on shutdown. `udp`: sockets
    bound before the workers were forked, one per address, shared by every worker: each takes the next query
    when it is free. TCP listeners are per worker (SO_REUSEPORT) when there are several. Raises ListenError."""
    loop = asyncio.get_running_loop()
    servers: list[Closable] = []
    udp_sockets = udp if udp is not None else bind_udp(listen)
    for entry, sock in zip(listen, udp_sockets, strict=True):
        listener = _UdpListener(front, sock, max(1, front.cache.exact_replies // len(listen)))
        front.exact_indexes.append(listener.exact)
        loop.add_reader(sock.fileno(), listener.readable)
        servers.append(listener)
        try:
            server = await asyncio.start_server(lambda r, w: _serve_tcp_client(front, r, w), entry.host, entry.port,
                                                reuse_port=udp is not None or None)
        except OSError as exc:
            for opened in servers:
                opened.close()
            raise ListenError(f"cannot listen for DNS on {entry} (TCP): {exc.strerror}") from None
        servers.append(server)
    return servers
