"""Run mitmproxy inside Vigie's event loop with the addon: `start_proxy` returns once the port accepts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import options
from mitmproxy.exceptions import OptionsError
from mitmproxy.tools.dump import DumpMaster

from blocklists.errors import VigieError
from filter_proxy.addon import VigieAddon
from policy.model import SocketAddress

START_TIMEOUT_SECONDS = 15.0
# mitmproxy logs every client connection at INFO: noise, and a trace of who browsed when. Warnings stay.
logging.getLogger("mitmproxy.proxy.server").setLevel(logging.WARNING)


@dataclass
class ProxyHandle:
    master: DumpMaster
    task: asyncio.Task[None]

    async def stop(self) -> None:
        # mitmproxy's shutdown leaves the listening sockets open: close them first.
        for server in self.master.addons.get("proxyserver").servers:
            if server.is_running:
                with contextlib.suppress(Exception):
                    await server.stop()
        self.master.shutdown()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self.task, 5)


async def start_proxy(addon: VigieAddon, listen: SocketAddress, mode: str, confdir: Path,
                      extra_options: Sequence[str] = ()) -> ProxyHandle:
    """Start mitmproxy on `listen` (`host:port`) in `mode` (`regular`, `transparent`). `extra_options` are
    mitmproxy `name=value` settings (`vigie proxy --set`). Raises VigieError when it cannot listen."""
    opts = options.Options(listen_host=listen.host, listen_port=listen.port, mode=[mode], confdir=str(confdir))
    master = DumpMaster(opts, with_termlog=False, with_dumper=False)
    master.addons.add(addon)
    try:
        # Lazy: a blocked host is never connected to, and its page is served even when it does not resolve.
        opts.update(connection_strategy="lazy")
        opts.set(*extra_options)
    except (OptionsError, KeyError) as exc:
        raise VigieError(f"bad proxy option: {exc}") from None
    task = asyncio.create_task(master.run())
    servers = master.addons.get("proxyserver").servers
    deadline = asyncio.get_running_loop().time() + START_TIMEOUT_SECONDS
    while True:
        failed = [server.last_exception for server in servers if server.last_exception is not None]
        if task.done() or failed:
            master.shutdown()
            reason = failed[0] if failed else (task.exception() if not task.cancelled() else None)
            raise VigieError(f"the proxy cannot listen on {listen}: {reason or 'it stopped'}")
        if len(servers) and all(server.is_running for server in servers):
            return ProxyHandle(master, task)
        if asyncio.get_running_loop().time() > deadline:
            master.shutdown()
            raise VigieError(f"the proxy did not start on {listen} within {START_TIMEOUT_SECONDS:g} s")
        await asyncio.sleep(0.05)
