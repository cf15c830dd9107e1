"""Run mitmproxy inside Vigie's event loop with the addon, accepting on a socket Vigie binds.

Vigie binds the proxy's listening socket itself (`bind_proxy_socket`), before any fork: the proxy workers of
`vigie run` all accept on that one socket, and whichever worker is free takes the next connection. mitmproxy runs
without its own listeners (`server=False`); each accepted connection is handed to its connection handler for the
configured mode, as mitmproxy's own listener would — in regular mode through `front.ProxyFront`, which relays the
CONNECT tunnels passed through undecrypted and answers blocked plain HTTP itself, and hands mitmproxy the rest."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import options
from mitmproxy.exceptions import OptionsError
from mitmproxy.proxy import mode_specs
from mitmproxy.proxy.mode_servers import ServerInstance
from mitmproxy.tools.dump import DumpMaster

from blocklists.errors import VigieError
from filter_proxy.addon import VigieAddon
from filter_proxy.front import ProxyFront
from filter_proxy.listen import LISTEN_BACKLOG, bind_proxy_socket
from policy.model import SocketAddress

START_TIMEOUT_SECONDS = 15.0
# mitmproxy logs every client connection at INFO: noise, and a trace of who browsed when. Warnings stay.
logging.getLogger("mitmproxy.proxy.server").setLevel(logging.WARNING)


@dataclass
class ProxyHandle:
    master: DumpMaster
    task: asyncio.Task[None]
    listener: asyncio.AbstractServer
    front: ProxyFront | None = None

    async def stop(self) -> None:
        self.listener.close()
        if self.front is not None:
            self.front.close()
        self.master.shutdown()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self.task, 5)


async def start_proxy(addon: VigieAddon, listen: SocketAddress | socket.socket, mode: str, confdir: Path,
                      extra_options: Sequence[str] = ()) -> ProxyHandle:
    """Start mitmproxy in `mode` (`regular`, `transparent`) with the addon, accepting on `listen` (a socket from
    `bind_proxy_socket`, or an address to bind). `extra_options` are mitmproxy `name=value` settings (`vigie proxy
    --set`). Raises VigieError when it cannot listen or start."""
    sock = bind_proxy_socket(listen) if isinstance(listen, SocketAddress) else listen
    host, port = sock.getsockname()[:2]
    opts = options.Options(listen_host=host, listen_port=port, mode=[mode], confdir=str(confdir), server=False)
    master = DumpMaster(opts, with_termlog=False, with_dumper=False)
    master.addons.add(addon)
    try:
        # Lazy: a blocked host is never connected to, and its page is served even when it does not resolve.
        # block_global off: who may use the proxy is rules.yaml's groups (the addon refuses the others), not
        # mitmproxy's guess from the address — tablets on IPv6, or a school with public addresses, have global ones.
        opts.update(connection_strategy="lazy", block_global=False)
        opts.set(*extra_options)
    except (OptionsError, KeyError) as exc:
        raise VigieError(f"bad proxy option: {exc}") from None
    proxyserver = master.addons.get("proxyserver")
    task = asyncio.create_task(master.run())
    deadline = asyncio.get_running_loop().time() + START_TIMEOUT_SECONDS
    while not proxyserver.is_running:  # the addons are configured: connections may come
        if task.done():
            reason = task.exception() if not task.cancelled() else None
            raise VigieError(f"the proxy did not start: {reason or 'it stopped'}")
        if asyncio.get_running_loop().time() > deadline:
            master.shutdown()
            raise VigieError(f"the proxy did not start within {START_TIMEOUT_SECONDS:g} s")
        await asyncio.sleep(0.02)
    instance: ServerInstance[mode_specs.ProxyMode] = ServerInstance.make(mode_specs.ProxyMode.parse(mode),
                                                                         proxyserver)
    if mode == "regular":  # tunnels passed through and blocked plain HTTP: the front; the rest: mitmproxy
        front = ProxyFront(addon, master, instance.handle_stream)
        listener = await asyncio.get_running_loop().create_server(front.protocol, sock=sock, backlog=LISTEN_BACKLOG)
        return ProxyHandle(master, task, listener, front)
    listener = await asyncio.start_server(instance.handle_stream, sock=sock, backlog=LISTEN_BACKLOG)
    return ProxyHandle(master, task, listener)
