"""mitmproxy script for the proxy tests: stands in for the Internet's DNS by sending every upstream connection to
the local test origin (ports from VIGIE_TEST_ORIGIN_HTTP / VIGIE_TEST_ORIGIN_HTTPS). Never loaded in production."""

from __future__ import annotations

import os

from mitmproxy.proxy.server_hooks import ServerConnectionHookData


class OriginMap:
    def server_connect(self, data: ServerConnectionHookData) -> None:
        assert data.server.address is not None
        tls = data.server.address[1] == 443
        port = os.environ["VIGIE_TEST_ORIGIN_HTTPS" if tls else "VIGIE_TEST_ORIGIN_HTTP"]
        data.server.address = ("127.0.0.1", int(port))


addons = [OriginMap()]
