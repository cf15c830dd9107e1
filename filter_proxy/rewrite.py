"""Safe search by rewriting an intercepted request, and the redirect to a profile's search portal.

DNS already points search hosts at the providers' enforced endpoints; the proxy adds what DNS cannot: the
parameters and headers each provider honours, so safe search holds even when a device uses another resolver.
"""

from __future__ import annotations

from urllib.parse import quote

from mitmproxy import http

from blocklists.bundled_data import SafeSearchLevel
from blocklists.names import normalize_path

# provider → (query parameter, value when strict, value when moderate)
_PARAMETERS = {
    "google": ("safe", "active", "active"),
    "bing": ("adlt", "strict", "moderate"),
    "duckduckgo": ("kp", "1", "-1"),
}
_YOUTUBE_HEADER = "YouTube-Restrict"
# Where each provider's result pages live, as `normalize_path` writes them without a trailing slash: only those are
# redirected to a search portal (not maps or mail). The home page counts when it carries a query (`/?q=`).
_SEARCH_PATHS = {
    "google": frozenset({"/search", "/webhp", "/images", "/imghp", "/videohp"}),
    "bing": frozenset({"/search", "/images/search", "/videos/search", "/news/search"}),
    "duckduckgo": frozenset({"/html", "/lite", "/d.js"}),
}


def enforce_safe_search(request: http.Request, provider: str, level: SafeSearchLevel) -> None:
    """Set the provider's safe-search parameter or header on `request`, replacing whatever the client sent."""
    if provider == "youtube":
        request.headers[_YOUTUBE_HEADER] = "Strict" if level is SafeSearchLevel.STRICT else "Moderate"
        return
    parameter = _PARAMETERS.get(provider)
    if parameter is not None:
        name, strict, moderate = parameter
        request.query[name] = strict if level is SafeSearchLevel.STRICT else moderate


def portal_redirect(request: http.Request, provider: str, portal: str) -> http.Response | None:
    """A 302 from a provider's result page to the portal, keeping the search words; None for other pages."""
    if provider not in _SEARCH_PATHS or not _is_search(request, _SEARCH_PATHS[provider]):
        return None
    words = request.query.get("q", "")
    location = f"https://{portal}/" + (f"?q={quote(words)}" if words else "")
    return http.Response.make(302, b"", {"Location": location, "Cache-Control": "no-store"})


def _is_search(request: http.Request, paths: frozenset[str]) -> bool:
    """Whether `request` asks for a result page: its path read as a server reads it (`//search`, `/SEARCH`,
    `/%73earch` and `/search/` are `/search`), or the home page with search words."""
    path = normalize_path(request.path).partition("?")[0].rstrip("/") or "/"
    return path in paths or (path == "/" and "q" in request.query)
