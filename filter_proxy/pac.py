"""The proxy auto-configuration file (PAC, also served as WPAD's `wpad.dat`) that tablets and browsers fetch from
the proxy itself: `http://<vigie>:8080/proxy.pac`. It names `server.proxy.pac_proxies`, or else the address the
client reached, so one URL works on the school network and through the VPN. With `pac: selective` (for all, or
per group) it sends only the hosts the proxy has something to do with (policy/proxy_scope.py)."""

from __future__ import annotations

import ipaddress
import json

from mitmproxy import http

from policy.proxy_scope import ProxyScope

PAC_PATHS = ("/proxy.pac", "/wpad.dat")
CONTENT_TYPE = "application/x-ns-proxy-autoconfig"
MAX_AGE_SECONDS = 300  # a rules change reaches the browsers within five minutes


def is_pac_request(flow: http.HTTPFlow) -> bool:
    """A GET of the PAC file addressed to the proxy's own socket (a direct request, not one it forwards), or to a
    `wpad` host (WPAD by DNS, its port 80 redirected to the proxy)."""
    request = flow.request
    if request.method not in ("GET", "HEAD") or request.path.split("?", 1)[0] not in PAC_PATHS:
        return False
    if request.pretty_host.split(".", 1)[0].lower() == "wpad":
        return True
    sockname = flow.client_conn.sockname
    return bool(sockname) and request.port == sockname[1] and _same_address(request.host, sockname[0])


def pac_response(flow: http.HTTPFlow, proxies: tuple[str, ...], scope: ProxyScope | None,
                 version: str) -> http.Response:
    """The PAC for this client: `proxies` (`host:port`; empty: the address the client reached), and either every
    request through them (`scope` None) or only the hosts of `scope` (selective). `version` changes with the
    rules."""
    if not proxies:
        host, port = flow.client_conn.sockname[:2]
        proxies = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}",)
    text = pac_text(proxies) if scope is None else selective_pac_text(proxies, scope)
    return http.Response.make(200, text.encode(), {
        "Content-Type": CONTENT_TYPE, "Cache-Control": f"max-age={MAX_AGE_SECONDS}", "ETag": f'"{version}"'})


def _proxy_line(proxies: tuple[str, ...]) -> str:
    # No DIRECT fallback: when no proxy answers, browsing stops rather than going on unfiltered.
    return "; ".join(f"PROXY {proxy}" for proxy in proxies)


def pac_text(proxies: tuple[str, ...]) -> str:
    return ("// Vigie: every request through the filtering proxy.\n"
            "function FindProxyForURL(url, host) {\n"
            f'  return "{_proxy_line(proxies)}";\n'
            "}\n")


def selective_pac_text(proxies: tuple[str, ...], scope: ProxyScope) -> str:
    """Through the proxy: the scope's exact hosts, its suffixes and their subdomains, IP literals in any spelling
    (the last label a number, or an IPv6 address) and plain host names — DNS never judges those; everything else
    DIRECT, filtered by DNS."""
    exact = json.dumps(dict.fromkeys(sorted(scope.exact), 1), separators=(",", ":"))
    suffixes = json.dumps(dict.fromkeys(sorted(scope.suffixes), 1), separators=(",", ":"))
    return f"""// Vigie: only the hosts the proxy has something to do with; the rest DIRECT, filtered by DNS.
var PROXY = "{_proxy_line(proxies)}";
var EXACT = {exact};
var SUFFIXES = {suffixes};
function has(table, name) {{ return Object.prototype.hasOwnProperty.call(table, name); }}
function FindProxyForURL(url, host) {{
  host = host.toLowerCase();
  if (host.charAt(host.length - 1) == ".") host = host.substring(0, host.length - 1);
  var last = host.substring(host.lastIndexOf(".") + 1);
  if (host.indexOf(".") < 0 || host.indexOf(":") >= 0 || host.charAt(0) == "[" || /^(0x[0-9a-f]*|[0-9]+)$/.test(last))
    return PROXY;
  if (has(EXACT, host)) return PROXY;
  for (var name = host; ; name = name.substring(name.indexOf(".") + 1)) {{
    if (has(SUFFIXES, name)) return PROXY;
    if (name.indexOf(".") < 0) return "DIRECT";
  }}
}}
"""


def _same_address(host: str, address: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")) == ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
