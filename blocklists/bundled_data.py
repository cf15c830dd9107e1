"""The small lists Vigie ships itself: DNS-bypass services and the safe-search endpoints."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml

from blocklists.formats import ParsedList, parse_domains

BUNDLED_SOURCE = "vigie"
BUNDLED_CATEGORIES = ("dns-bypass",)


class SafeSearchLevel(enum.Enum):
    OFF = "off"
    MODERATE = "moderate"
    STRICT = "strict"


@dataclass(frozen=True)
class SafeSearchTarget:
    """A search or video host and the endpoint that enforces safe search for it."""

    provider: str
    strict: str
    moderate: str

    def endpoint(self, level: SafeSearchLevel) -> str:
        return self.strict if level is SafeSearchLevel.STRICT else self.moderate


def _bundled_text(category: str) -> str:
    return resources.files("blocklists").joinpath(f"bundled/{category}.txt").read_text(encoding="utf-8")


def read_bundled_list(category: str) -> ParsedList:
    return parse_domains(f"{BUNDLED_SOURCE}/{category}", _bundled_text(category).splitlines())


@cache
def bundled_digest() -> str:
    """SHA-256 of the bundled lists, so that compiled lists are rebuilt when an upgrade changes them."""
    return hashlib.sha256("\0".join(_bundled_text(c) for c in BUNDLED_CATEGORIES).encode()).hexdigest()


@cache
def safe_search_hosts() -> dict[str, SafeSearchTarget]:
    """Exact host → its provider's enforced endpoint (subdomains are not included: only these hosts serve search)."""
    text = resources.files("blocklists").joinpath("bundled/safe_search.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    hosts: dict[str, SafeSearchTarget] = {}
    for provider, spec in data["providers"].items():
        target = SafeSearchTarget(provider, spec["strict"], spec["moderate"])
        for host in spec["hosts"]:
            hosts[host] = target
    google = SafeSearchTarget("google", data["providers"]["google"]["strict"], data["providers"]["google"]["moderate"])
    for suffix in data["google_country_suffixes"]:
        if not isinstance(suffix, str):  # YAML read `no` (Norway) or `on` as a boolean: quote it in the file
            raise ValueError(f"safe_search.yaml: country suffix {suffix!r} is not text")
        hosts[f"www.google.{suffix}"] = google
        hosts[f"google.{suffix}"] = google
    return hosts
