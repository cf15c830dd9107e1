"""Screen time through the DNS front, in one process with an injected clock: the real front and UDP server, the real
keeper and SQLite store, a real upstream; minutes counted on the cached fast path too, and the budget enforced."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from dnslib import EDNS0, DNSRecord

from dns_resolver.server import DnsFront
from dns_resolver.transport import start_dns_servers
from dns_resolver.upstream import UpstreamPool
from policy.model import SocketAddress
from policy.snapshot import Snapshot
from policy.state_keeper import StateKeeper
from policy.state_store import StoreAddress, open_store
from tests.conftest import free_port, paris, snapshot_of
from tests.dns_servers import UpstreamServer
from tests.test_state import FakeClock

FILES = {
    "rules.yaml": """
        timezone: Europe/Paris
        lists:
          games: {source: games.txt, format: domains}
          updates: {source: updates.txt, format: domains}
        categories:
          games: [games]
          os_updates: [updates]
        background: [os_updates]
        devices:
          inventory: devices.csv
          unknown: refuse
        groups:
          cm2-a: {profile: maison}
        profiles:
          maison: {block: [games], allow: [lumni.fr], screen_time: 2m}
        """,
    "devices.csv": "name,addresses,group,credential\ntab-01,127.0.0.1,cm2-a,\n",
    "games.txt": "roblox.com\n",
    "updates.txt": "mesu.apple.com\n",
}


class FrontInThread:
    """The DNS front on a free port, served by an event loop in a thread; the test asks with a plain socket."""

    def __init__(self, front: DnsFront) -> None:
        self.front = front
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            listen = (SocketAddress("127.0.0.1", self.port),)
            self.servers = self.loop.run_until_complete(start_dns_servers(front, listen))
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        started.wait(10)

    def ask(self, name: str) -> DNSRecord:
        query = DNSRecord.question(name)
        query.add_ar(EDNS0(udp_len=1232))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(query.pack(), ("127.0.0.1", self.port))
            return DNSRecord.parse(sock.recv(4096))

    def close(self) -> None:
        async def shut_down() -> None:
            for server in self.servers:
                server.close()
                if isinstance(server, asyncio.AbstractServer):
                    await server.wait_closed()
            self.front.upstreams.close()
            await asyncio.sleep(0)  # let the transports finish closing

        asyncio.run_coroutine_threadsafe(shut_down(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[FrontInThread, StateKeeper, FakeClock, UpstreamServer]]:
    snapshot: Snapshot = snapshot_of(tmp_path, FILES)
    clock = FakeClock(paris("2026-11-23 18:00:10"))
    address = StoreAddress("sqlite", str(tmp_path / "state.sqlite3"))
    keeper = StateKeeper(lambda: open_store(address), lambda: ZoneInfo("Europe/Paris"), tmp_path / "spool",
                         clock=clock, flush_seconds=0)  # every step writes: the test decides when
    keeper.step()
    with UpstreamServer() as upstream:
        upstream_pool = UpstreamPool((SocketAddress("127.0.0.1", upstream.port),))
        front = DnsFront(lambda: snapshot, lambda: keeper.view, upstream_pool, count_minute=keeper.usage.record,
                         clock=clock)
        running = FrontInThread(front)
        try:
            yield running, keeper, clock, upstream
        finally:
            running.close()
            keeper.stop()


def test_minutes_count_on_the_cached_path_and_a_spent_budget_blocks(
        setup: tuple[FrontInThread, StateKeeper, FakeClock, UpstreamServer], tmp_path: Path) -> None:
    dns, keeper, clock, upstream = setup
    store = open_store(StoreAddress("sqlite", str(tmp_path / "state.sqlite3")))
    monday = date(2026, 11, 23)

    assert dns.ask("example.org").header.rcode == 0  # 18:00: decided, forwarded, cached for this device
    keeper.step()
    assert store.usage(monday) == {"tab-01": 1}

    clock.advance(60)  # 18:01: the same name comes from the reply cache, and still counts
    assert dns.ask("example.org").header.rcode == 0
    assert upstream.asked == ["example.org"], "answered from the cache"
    dns.ask("mesu.apple.com")  # background: never counted
    keeper.step()
    assert store.usage(monday) == {"tab-01": 2}

    clock.advance(60)  # 18:02: two minutes of two used
    blocked = dns.ask("wikipedia.org")
    assert blocked.header.rcode == 3, "NXDOMAIN: the budget is spent"
    assert b"screen_time; allowed again 2026-11-24 00:00" in blocked.pack(), "why, and when: the budget resets"
    # A game: the budget blocks it now, and at midnight its category still does.
    assert b"screen_time; not allowed in the next 14 days" in dns.ask("roblox.com").pack()
    assert dns.ask("lumni.fr").header.rcode == 0, "the allow list stays reachable"
    assert dns.ask("mesu.apple.com").header.rcode == 0, "background services stay reachable"
    keeper.step()
    assert store.usage(monday) == {"tab-01": 3}, "the allow list counts as use; knocking at the block does not"
