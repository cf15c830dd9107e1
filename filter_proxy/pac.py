"""The proxy auto-configuration file (PAC, also served as WPAD's `wpad.dat`) that tablets and browsers fetch from
the proxy itself: `http://<vigie>:8080/proxy.pac`. It names the address the client reached, so one URL works on
the school network and through the VPN."""

from __future__ import annotations

import ipaddress

from mitmproxy import http

PAC_PATHS = ("/proxy.pac", "/wpad.dat")
CONTENT_TYPE = "application/x-ns-proxy-autoconfig"


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


def pac_response(flow: http.HTTPFlow) -> http.Response:
    host, port = flow.client_conn.sockname[:2]
    proxy = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return http.Response.make(200, pac_text(proxy).encode(), {
        "Content-Type": CONTENT_TYPE, "Cache-Control": "max-age=300"})


def pac_text(proxy: str) -> str:
    # No DIRECT fallback: when the proxy is down, browsing stops rather than going on unfiltered.
    return ("// Vigie: every request through the filtering proxy.\n"
            "function FindProxyForURL(url, host) {\n"
            f'  return "PROXY {proxy}";\n'
            "}\n")


def _same_address(host: str, address: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")) == ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
