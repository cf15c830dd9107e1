"""Metric definitions shared by both fronts. Labels are bounded: never a domain, URL, address or device name."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

from prometheus_client import REGISTRY, Counter, Gauge, Info
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector


class LabelCounter(Collector):
    """A counter by label values cheap enough for the DNS hot path: no lock (the event loop is the only writer;
    the scrape thread copies before reading). Each label set's count is a one-item list, a "cell" that the
    hottest code keeps and increments in place: `cell[0] += 1`."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, list(labelnames)
        self._counts: dict[tuple[str, ...], list[float]] = {}
        REGISTRY.register(self)

    def cell(self, *values: str) -> list[float]:
        found = self._counts.get(values)
        if found is None:
            found = self._counts[values] = [0.0]
        return found

    def inc(self, *values: str) -> None:
        self.cell(*values)[0] += 1

    def value(self, *values: str) -> float:
        return self._counts.get(values, [0.0])[0]

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, cell in list(self._counts.items()):
            family.add_metric(list(values), cell[0])
        yield family

    def describe(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)


class FastHistogram(Collector):
    """A histogram whose `observe` is a bisect and an increment (prometheus_client's takes a lock per bucket)."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = list(buckets)
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        REGISTRY.register(self)

    def observe(self, value: float, times: int = 1) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += times
        self._sum += value * times

    def collect(self) -> Iterable[Metric]:
        counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, self._bounds), "+Inf"], counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(self._name, self._documentation, buckets=buckets, sum_value=total)

    def describe(self) -> Iterable[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation)


QUERIES = LabelCounter("vigie_dns_queries", "DNS queries answered, by group, action, reason and category (the "
                       "rules' category that decided, `none` otherwise)", ["group", "action", "reason", "category"])
REPLY_CACHE = LabelCounter("vigie_dns_reply_cache", "Plain queries answered from the reply cache (hit) or not (miss)",
                           ["result"])
DNS_LATENCY = FastHistogram("vigie_dns_answer_seconds", "Time from a query's arrival to its answer",
                            buckets=(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                     1, 2.5))
DNS_ANSWER_BLOCKS = Counter("vigie_dns_answer_blocks", "Allowed questions blocked because their upstream answer led "
                            "to a blocked name (CNAME, DNAME, HTTPS/SVCB target) or a listed address, by reason and "
                            "category", ["reason", "category"])
DNS_RATE_LIMITED = Counter("vigie_dns_rate_limited", "UDP queries dropped: their client went over dns.rate_limit")
DNS_STALE_ANSWERS = Counter("vigie_dns_stale_answers", "Answers served stale (RFC 8767): no upstream answered")
DNS_ERRORS = Counter("vigie_dns_errors", "Queries answered SERVFAIL or FORMERR, or whose answer could not be sent, "
                     "by kind", ["kind"])
UPSTREAM_FAILURES = Counter("vigie_dns_upstream_failures", "Forwarded queries an upstream did not answer",
                            ["upstream"])
UPSTREAM_UP = Gauge("vigie_dns_upstream_up", "1 while an upstream answers; 0 after 3 failures in a row, until it "
                    "answers again", ["upstream"])
UPSTREAM_LATENCY = FastHistogram("vigie_dns_upstream_seconds", "Time an upstream took to answer a forwarded query",
                                 buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2))
DNS_CACHE_BYTES = Gauge("vigie_dns_cache_bytes", "Memory this DNS worker's caches take (estimated), by cache "
                        "(replies, upstream, decisions, exact)", ["cache"])
DNS_CACHE_LIMIT = Gauge("vigie_dns_cache_limit_bytes", "This DNS worker's share of dns.cache_size, by cache",
                        ["cache"])
RELOADS = Counter("vigie_rules_reloads", "Rules reloads by result (ok, invalid)", ["result"])
RULES_GENERATION = Gauge("vigie_rules_generation", "Generation of the rules snapshot in force")
RULES_LOADED_AT = Gauge("vigie_rules_loaded_timestamp_seconds", "When the rules in force were loaded")
RULES_LAST_RELOAD_OK = Gauge("vigie_rules_last_reload_ok", "1 if the last reload attempt succeeded (or none failed "
                             "since start), 0 while the files on disk are refused")
RULES_RELOAD_SECONDS = Gauge("vigie_rules_reload_seconds", "How long the last successful reload took")
LIST_DOMAINS = Gauge("vigie_list_domains", "Domains in the compiled lists in force")
LIST_UPDATES = Counter("vigie_list_updates", "List source updates by source and result (updated, not_modified, "
                       "failed)", ["source", "result"])
LIST_LAST_SUCCESS = Gauge("vigie_list_last_success_timestamp_seconds",
                          "When each remote list source last answered (downloaded or not modified)", ["source"])
PROXY_REQUESTS = Counter("vigie_proxy_requests", "HTTP requests decided by the proxy, by group, action, reason "
                         "and category", ["group", "action", "reason", "category"])
PROXY_TLS = Counter("vigie_proxy_tls_connections", "TLS connections by handling (passthrough, intercept)",
                    ["handling"])
PROXY_ERRORS = Counter("vigie_proxy_errors", "Proxy hooks that failed, by hook: the flow was blocked (fail closed)",
                       ["hook"])
PROXY_DESTINATIONS_REFUSED = Counter("vigie_proxy_destinations_refused", "Upstream connections the proxy refused to "
                                     "open, by why (deny_networks, address list, unresolved, unknown client)",
                                     ["why"])
PAC_SERVED = Counter("vigie_proxy_pac_served", "Proxy auto-configuration files (proxy.pac, wpad.dat) served")
BLOCK_PAGES = Counter("vigie_block_pages", "Block pages served by the proxy, by reason", ["reason"])
STATE_STORE_UP = Gauge("vigie_state_store_up", "1 while the state store (overrides, screen time) answers, else 0")
STATE_STORE_ERRORS = Counter("vigie_state_store_errors", "Failed exchanges with the state store, by operation",
                             ["operation"])
OVERRIDES_ACTIVE = Gauge("vigie_overrides_active", "Teacher overrides in force")
USAGE_MARKS_PENDING = Gauge("vigie_usage_marks_pending",
                            "Used minutes (one mark per device and minute) counted in memory, not yet in the store")
STATE_AGE = Gauge("vigie_state_age_seconds", "Age of the state view the fronts decide with (grows while the store "
                  "is away)")
BUILD = Info("vigie_build", "Vigie's version and the process's role (main: DNS, proxy, list updates, admin API; "
             "dns-N: a DNS worker; proxy-N: a proxy worker)")
