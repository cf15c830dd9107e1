"""The proxy's listening socket, bound by Vigie before any fork (without importing mitmproxy, which a DNS worker
forked from the same process need not carry)."""

from __future__ import annotations

import errno
import socket

from blocklists.errors import VigieError
from policy.model import SocketAddress

LISTEN_BACKLOG = 4096  # a class opening a page: 25 tablets × 10-30 connections at once


def bind_proxy_socket(listen: SocketAddress) -> socket.socket:
    """The proxy's listening TCP socket. Raises VigieError (with the fix) when the address cannot be had."""
    sock = socket.socket(socket.AF_INET6 if listen.is_ipv6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((listen.host, listen.port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        hint = " (another program listens there; set server.proxy.listen or --proxy-listen)" \
            if exc.errno == errno.EADDRINUSE else ""
        raise VigieError(f"the proxy cannot listen on {listen}: {exc.strerror}{hint}") from None
    sock.setblocking(False)
    return sock
