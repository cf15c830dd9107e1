"""Metric definitions shared by both fronts. Labels are bounded: never a domain, URL, address or device name."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

QUERIES = Counter("vigie_dns_queries", "DNS queries answered, by group, action and reason",
                  ["group", "action", "reason"])
DNS_LATENCY = Histogram("vigie_dns_answer_seconds", "Time from a query's arrival to its answer",
                        buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
DNS_ERRORS = Counter("vigie_dns_errors", "Queries answered SERVFAIL or FORMERR, by kind", ["kind"])
UPSTREAM_FAILURES = Counter("vigie_dns_upstream_failures", "Forwarded queries an upstream did not answer",
                            ["upstream"])
RELOADS = Counter("vigie_rules_reloads", "Rules reloads by result (ok, invalid)", ["result"])
RULES_GENERATION = Gauge("vigie_rules_generation", "Generation of the rules snapshot in force")
RULES_LOADED_AT = Gauge("vigie_rules_loaded_timestamp_seconds", "When the rules in force were loaded")
LIST_DOMAINS = Gauge("vigie_list_domains", "Domains in the compiled lists in force")
LIST_UPDATES = Counter("vigie_list_updates", "List source updates by source and result (updated, not_modified, "
                       "failed)", ["source", "result"])
LIST_LAST_SUCCESS = Gauge("vigie_list_last_success_timestamp_seconds",
                          "When each remote list source last answered (downloaded or not modified)", ["source"])
PROXY_REQUESTS = Counter("vigie_proxy_requests", "HTTP requests decided by the proxy, by group, action and reason",
                         ["group", "action", "reason"])
PROXY_TLS = Counter("vigie_proxy_tls_connections", "TLS connections by handling (passthrough, intercept)",
                    ["handling"])
BLOCK_PAGES = Counter("vigie_block_pages", "Block pages served by the proxy, by reason", ["reason"])
