"""mitmproxy script for the proxy tests and benchmark: stands in for the Internet's DNS by sending every upstream
connection to a name to the local origin (ports from VIGIE_TEST_ORIGIN_HTTP / VIGIE_TEST_ORIGIN_HTTPS). An address
in any spelling and `localhost` go where they really lead, as an attacker's would. Never loaded in production.

The name is put back once connected, so mitmproxy still finds the connection for the next request of a keep-alive
client (it matches connections by the address the request names)."""

from __future__ import annotations

import os

from mitmproxy.connection import Address
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from blocklists.names import parse_ip


class OriginMap:
    def __init__(self) -> None:
        self._asked: dict[str, Address] = {}

    def server_connect(self, data: ServerConnectionHookData) -> None:
        assert data.server.address is not None
        name = data.server.address[0].lower().rstrip(".")
        if parse_ip(name) is not None or name == "localhost" or name.endswith(".localhost"):
            return
        tls = data.server.address[1] == 443
        port = os.environ["VIGIE_TEST_ORIGIN_HTTPS" if tls else "VIGIE_TEST_ORIGIN_HTTP"]
        self._asked[data.server.id] = data.server.address
        data.server.address = ("127.0.0.1", int(port))

    def server_connected(self, data: ServerConnectionHookData) -> None:
        # mitmproxy refuses to change the address of an open connection (it guards __setattr__); the socket is
        # connected already, only the name used for matching changes back.
        object.__setattr__(data.server, "address", self._asked.pop(data.server.id, data.server.address))

    def server_connect_error(self, data: ServerConnectionHookData) -> None:
        self._asked.pop(data.server.id, None)


addons = [OriginMap()]
