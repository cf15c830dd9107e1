"""Forwarding: one upstream query for identical questions in flight, serve-stale, failover on SERVFAIL, and what
a client's query may not carry upstream (EDNS client-subnet, cookies)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from dnslib import DNSRecord

from dns_resolver.forwarding import ENTRY_COST, Forwarder
from dns_resolver.upstream import UpstreamFailure, UpstreamPool
from dns_resolver.wire import question_bytes
from policy.metrics import DNS_STALE_ANSWERS
from policy.model import SocketAddress
from tests.conftest import free_port, write_tree
from tests.dns_servers import UpstreamServer, VigieProcess, dig
from tests.test_dns_fastpath import RULES

QUESTION = question_bytes("lumni.fr", 1)


def loopback(*ports: int) -> tuple[SocketAddress, ...]:
    return tuple(SocketAddress("127.0.0.1", port) for port in ports)


def test_identical_questions_in_flight_go_upstream_once() -> None:
    with UpstreamServer() as upstream:
        upstream.delay = 0.3
        forwarder = Forwarder(UpstreamPool(loopback(upstream.port)), max_bytes=1_000_000)

        async def many() -> list[bytes]:
            try:
                answers = await asyncio.gather(*(forwarder.answer(QUESTION) for _ in range(20)))
            finally:
                forwarder.pool.close()
            return [a.wire for a in answers]

        answers = asyncio.run(many())
    assert upstream.asked == ["lumni.fr"]
    assert len(set(answers)) == 1 and DNSRecord.parse(answers[0]).rr[0].ttl == 300


def test_an_answer_is_served_stale_while_every_upstream_is_down_then_no_more() -> None:
    with UpstreamServer(ttl=1) as upstream:
        forwarder = Forwarder(UpstreamPool(loopback(upstream.port), timeout=0.3), max_bytes=1_000_000,
                              stale_seconds=2)

        async def scenario() -> None:
            try:
                await steps()
            finally:
                forwarder.pool.close()

        async def steps() -> None:
            fresh = await forwarder.answer(QUESTION)
            assert fresh.lifetime == 1
            await asyncio.sleep(1.2)
            upstream.mode = "silent"
            stale_before = DNS_STALE_ANSWERS._value.get()
            stale = await forwarder.answer(QUESTION)
            assert stale.lifetime == 0 and DNSRecord.parse(stale.wire).rr[0].ttl == 30
            assert DNS_STALE_ANSWERS._value.get() == stale_before + 1
            await asyncio.sleep(2.1)  # past the stale window: nothing to serve
            with pytest.raises(UpstreamFailure):
                await forwarder.answer(QUESTION)

        asyncio.run(scenario())


def test_the_only_upstream_is_asked_once_more_when_its_answer_is_lost() -> None:
    with UpstreamServer() as upstream:
        forwarder = Forwarder(UpstreamPool(loopback(upstream.port), timeout=0.3), max_bytes=1_000_000)

        async def scenario() -> None:
            try:
                upstream.drop_next = 1
                answer = await forwarder.answer(QUESTION)
                assert str(DNSRecord.parse(answer.wire).rr[0].rdata) == "192.0.2.1"
                assert upstream.asked == ["lumni.fr", "lumni.fr"]
                upstream.mode = "silent"
                started = time.monotonic()
                with pytest.raises(UpstreamFailure):
                    await forwarder.answer(question_bytes("never-seen.example", 1))
                assert upstream.asked[2:] == ["never-seen.example", "never-seen.example"]  # two tries, no more
                assert 0.5 < time.monotonic() - started < 1.5
            finally:
                forwarder.pool.close()

        asyncio.run(scenario())


def test_an_upstream_answering_servfail_is_passed_over() -> None:
    with UpstreamServer() as broken, UpstreamServer(address="192.0.2.9") as working:
        broken.mode = "servfail"
        pool = UpstreamPool(loopback(broken.port, working.port))

        async def ask() -> bytes:
            try:
                return (await Forwarder(pool, max_bytes=1_000_000).answer(QUESTION)).wire
            finally:
                pool.close()

        wire = asyncio.run(ask())
    assert str(DNSRecord.parse(wire).rr[0].rdata) == "192.0.2.9"
    assert broken.asked == ["lumni.fr"] and working.asked == ["lumni.fr"]


def test_the_answer_cache_holds_to_its_memory_budget() -> None:
    with UpstreamServer() as upstream:
        budget = 10 * (ENTRY_COST + 60)
        forwarder = Forwarder(UpstreamPool(loopback(upstream.port)), max_bytes=budget)

        async def ask_many() -> None:
            try:
                for number in range(40):
                    await forwarder.answer(question_bytes(f"name{number}.example.fr", 1))
            finally:
                forwarder.pool.close()

        asyncio.run(ask_many())
    assert len(upstream.asked) == 40 and 7 <= len(forwarder) <= 10


def test_a_stream_of_names_asked_once_does_not_push_out_an_answer_in_use() -> None:
    """The answer cache is what serve-stale falls back on: the names in use must stay in it while thousands of names
    asked once go through."""
    with UpstreamServer() as upstream:
        forwarder = Forwarder(UpstreamPool(loopback(upstream.port)), max_bytes=1_000_000, max_entries=3)

        async def ask_many() -> None:
            try:
                await forwarder.answer(QUESTION)
                for number in range(12):
                    await forwarder.answer(question_bytes(f"once{number}.example.fr", 1))
                    if number % 2:
                        await forwarder.answer(QUESTION)  # in use: asked again every other new name
            finally:
                forwarder.pool.close()

        asyncio.run(ask_many())
    assert upstream.asked.count("lumni.fr") == 1 and len(upstream.asked) == 13


def test_a_truncated_upstream_answer_is_fetched_whole_over_tcp() -> None:
    with UpstreamServer(tcp=True) as upstream:
        upstream.truncate, upstream.records = True, 60
        forwarder = Forwarder(UpstreamPool(loopback(upstream.port)), max_bytes=1_000_000)

        async def ask() -> bytes:
            try:
                return (await forwarder.answer(QUESTION)).wire
            finally:
                forwarder.pool.close()

        whole = DNSRecord.parse(asyncio.run(ask()))
    assert len(whole.rr) == 60 and not whole.header.tc
    assert upstream.asked == ["lumni.fr"] and upstream.tcp_asked == ["lumni.fr"]


def test_client_subnet_and_cookies_stay_here_and_all_down_is_servfail(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port) as vigie:
        out = dig(vigie.dns_port, "+subnet=203.0.113.0/24", "+cookie", "LuMnI.fr")
        assert "status: NOERROR" in out and "LuMnI.fr." in out.split("ANSWER SECTION:")[1]
        forwarded = DNSRecord.parse(upstream.packets[-1])
        options = [rr for rr in forwarded.ar if rr.rtype == 41]
        assert len(options) == 1 and options[0].rdata == []  # our own OPT record, without any option
        assert str(forwarded.q.qname) == "lumni.fr."
        upstream.mode = "silent"
        started = time.monotonic()  # two tries of 1.5 s with a single upstream, then SERVFAIL: within dig's 5 s
        assert "status: SERVFAIL" in dig(vigie.dns_port, "+time=5", "never-seen.example")
        assert time.monotonic() - started < 4
        assert "status: NOERROR" in dig(vigie.dns_port, "lumni.fr"), "what is cached still answers"


def test_a_popular_name_is_fetched_again_before_it_expires(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    with UpstreamServer(ttl=10) as upstream, VigieProcess(rules, free_port(), upstream.port) as vigie:
        for _ in range(4):  # popular
            assert "status: NOERROR" in dig(vigie.dns_port, "lumni.fr")
        assert upstream.asked == ["lumni.fr"]
        time.sleep(9.2)  # past 90 % of its lifetime: the next answer still comes from the cache, and it is refetched
        assert "status: NOERROR" in dig(vigie.dns_port, "lumni.fr")
        deadline = time.monotonic() + 2
        while upstream.asked != ["lumni.fr", "lumni.fr"]:
            assert time.monotonic() < deadline, upstream.asked
            time.sleep(0.05)
        time.sleep(1.2)  # the first answer has expired by now; the refetched one answers without asking again
        out = dig(vigie.dns_port, "lumni.fr")
        assert upstream.asked == ["lumni.fr", "lumni.fr"]
        assert int(out.split("ANSWER SECTION:")[1].split()[1]) >= 8
