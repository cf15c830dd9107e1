"""The DNS hot path: reading plain queries from bytes, and replies answered from the reply cache."""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from dnslib import AAAA, CNAME, DNAME, EDNS0, NS, QTYPE, RR, A, DNSRecord
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dns_resolver.fastpath import ENTRY_COST, ReplyCache, read_name, read_plain_query, read_records, ttl_offsets
from dns_resolver.wire import plain_name
from tests.conftest import free_port, free_port_run, write_tree
from tests.dns_servers import RULES_PREAMBLE, UpstreamServer, VigieProcess, dig

LABEL = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=20)
NAMES = st.lists(LABEL, min_size=1, max_size=5).map(".".join)
TYPES = st.sampled_from(["A", "AAAA", "HTTPS", "MX", "TXT", "SVCB", "NS", "PTR"])


@given(NAMES, TYPES, st.booleans())
@example("WwW.ExAmPle.ORG", "HTTPS", False)  # qtype 65 = 'A': only the name may be lower-cased
def test_a_plain_query_reads_as_dnslib_reads_it(name: str, qtype: str, edns: bool) -> None:
    record = DNSRecord.question(name, qtype)
    if edns:
        record.add_ar(EDNS0(udp_len=1232))
    packet = record.pack()
    query = read_plain_query(packet)
    assert query is not None
    assert query.qtype == getattr(QTYPE, qtype) and query.edns is edns
    assert query.udp_size == (1232 if edns else 512)
    assert query.question == DNSRecord.question(name.lower(), qtype).pack()[12:]


@given(st.binary(max_size=80))
@example(b"\x00\x01\x81\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01")  # a response: not ours
@example(b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01")  # a pointer in the question
@settings(max_examples=500)
def test_any_bytes_read_as_a_plain_query_or_none(packet: bytes) -> None:
    query = read_plain_query(packet)
    if query is not None:
        assert 17 <= query.question_end <= len(packet)


def reply_for(query: DNSRecord, ttl: int) -> bytes:
    reply = query.reply()
    reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A("192.0.2.7"), ttl=ttl))
    wire: bytes = reply.pack()
    return wire


def test_a_cached_reply_keeps_the_askers_id_and_case_and_ages_its_ttls() -> None:
    cache = ReplyCache(max_bytes=1_000_000)
    first = DNSRecord.question("lumni.fr")
    query = read_plain_query(first.pack())
    assert query is not None
    reply = reply_for(first, 300)
    offsets = ttl_offsets(reply, query.question_end)
    assert offsets is not None and len(offsets) == 1
    assert struct.unpack_from("!I", reply, query.question_end + offsets[0])[0] == 300
    cache.store(("g", 1), query, reply, 300, ("school", "allow", "default"))
    again = DNSRecord.question("LuMnI.fR")
    packet = again.pack()
    asked = read_plain_query(packet)
    assert asked is not None
    hit = cache.reply(("g", 1), asked, packet)
    assert hit is not None
    answer = DNSRecord.parse(hit[0])
    assert answer.header.id == again.header.id and str(answer.q.qname) == "LuMnI.fR."
    assert answer.rr[0].ttl == 300 and str(answer.rr[0].rdata) == "192.0.2.7"
    assert cache.reply(("other group", 1), asked, packet) is None
    time.sleep(1.1)
    aged = cache.reply(("g", 1), asked, packet)
    assert aged is not None and DNSRecord.parse(aged[0]).rr[0].ttl == 299


def test_an_answer_is_read_once_without_its_opt_record_wherever_it_sits() -> None:
    question = DNSRecord.question("lumni.fr")
    answer = question.reply()
    answer.add_answer(RR("lumni.fr", QTYPE.A, rdata=A("192.0.2.7"), ttl=300))
    answer.add_auth(RR("lumni.fr", QTYPE.NS, rdata=NS("ns.lumni.fr"), ttl=900))
    answer.add_ar(EDNS0(udp_len=1232))  # the upstream's OPT record, before another additional record
    answer.add_ar(RR("ns.lumni.fr", QTYPE.A, rdata=A("192.0.2.53"), ttl=120))
    wire = answer.pack()
    end = len(question.pack())
    records = read_records(wire, end)
    assert records is not None and records.question_end == end
    kept = DNSRecord.parse(records.wire)
    assert [rr.rtype for rr in kept.ar] == [QTYPE.A] and kept.header.ar == 1
    assert [str(rr.rdata) for rr in (*kept.rr, *kept.auth, *kept.ar)] == ["192.0.2.7", "ns.lumni.fr.", "192.0.2.53"]
    ttls = [struct.unpack_from("!I", records.wire, end + offset)[0] for offset in records.ttl_offsets]
    assert ttls == [300, 900, 120] and records.smallest_ttl == 120
    assert read_records(wire[:-3], end) is None  # a record cut short
    assert read_records(wire + b"\x00", end) is None  # bytes after the last record
    empty = read_records(question.reply().pack(), end)
    assert empty is not None and empty.ttl_offsets == () and empty.smallest_ttl is None


def test_an_answer_tells_every_name_it_points_at_and_every_address_it_gives() -> None:
    question = DNSRecord.question("Play.Pupil.example")
    answer = question.reply()
    answer.add_answer(RR("play.pupil.example", QTYPE.CNAME, rdata=CNAME("Hop.Pupil.Example"), ttl=300))
    answer.add_answer(RR("hop.pupil.example", QTYPE.DNAME, rdata=DNAME("roblox.com"), ttl=300))
    answer.add_answer(RR("roblox.com", QTYPE.A, rdata=A("192.0.2.7"), ttl=300))
    answer.add_answer(RR("roblox.com", QTYPE.AAAA, rdata=AAAA("2001:db8::7"), ttl=300))
    answer.add_auth(RR("pupil.example", QTYPE.NS, rdata=NS("ns.other.example"), ttl=900))  # not the answer
    wire = answer.pack()  # dnslib compresses the names: pointers are followed
    records = read_records(wire, len(question.pack()))
    assert records is not None
    assert records.targets == ("hop.pupil.example", "roblox.com")
    assert records.addresses == ("192.0.2.7", "2001:db8::7")


def test_a_name_that_loops_or_runs_past_the_end_makes_the_answer_unreadable() -> None:
    assert read_name(b"\x03abc\x00", 0) == "abc" and read_name(b"\x00", 0) == ""
    with pytest.raises(ValueError):
        read_name(b"\xc0\x00", 0)  # a pointer to itself
    with pytest.raises((ValueError, IndexError)):
        read_name(b"\x05ab", 0)
    question = DNSRecord.question("loop.example")
    end = len(question.pack())
    cname = b"\xc0\x0c\x00\x05\x00\x01\x00\x00\x01\x2c\x00\x02" + struct.pack("!H", 0xC000 | end + 12)
    wire = question.reply().pack()
    wire = wire[:6] + b"\x00\x01" + wire[8:] + cname  # one answer, a CNAME whose target points at itself
    assert read_records(wire, end) is None


@given(st.binary(max_size=300))
def test_any_bytes_as_an_answer_are_read_or_refused(tail: bytes) -> None:
    question = DNSRecord.question("any.example").pack()
    read_records(question[:6] + b"\x00\x02" + question[8:] + tail, len(question))  # never raises


def test_only_plain_host_names_take_the_bytes_path() -> None:
    assert plain_name(b"\x03www\x05lumni\x02fr\x00\x00\x01\x00\x01") == "www.lumni.fr"
    assert plain_name(b"\x05_acme\x03a-b\x00\x00\x01\x00\x01") == "_acme.a-b"
    assert plain_name(b"\x03a.b\x02fr\x00\x00\x01\x00\x01") is None  # a dot inside a label
    assert plain_name(b"\x03a b\x02fr\x00\x00\x01\x00\x01") is None
    assert plain_name(b"\x03\xc3\xa9t\x02fr\x00\x00\x01\x00\x01") is None
    assert plain_name(b"\x00\x00\x01\x00\x01") is None  # the root


RULES = RULES_PREAMBLE + """
groups:
  school: {addresses: [127.0.0.1], profile: class}
  home: {addresses: [127.0.0.3], profile: home}
profiles:
  class: {block: [games]}
  home: {}
"""


def ask_from(source: str, port: int, name: str) -> DNSRecord:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(2)
        sock.sendto(DNSRecord.question(name).pack(), ("127.0.0.1", port))
        return DNSRecord.parse(sock.recv(4096))


def test_cached_answers_stay_per_group_and_age(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port) as vigie:
        for _ in range(3):  # the first answers are made, the next come from the caches
            assert ask_from("127.0.0.1", vigie.dns_port, "roblox.com").header.rcode == 3  # NXDOMAIN
            home = ask_from("127.0.0.3", vigie.dns_port, "roblox.com")
            assert home.header.rcode == 0 and str(home.rr[0].rdata) == "192.0.2.1"
        assert upstream.asked == ["roblox.com"]
        first_ttl = int(dig(vigie.dns_port, "lumni.fr").split("ANSWER SECTION:")[1].split()[1])
        time.sleep(2.1)
        later_ttl = int(dig(vigie.dns_port, "lumni.fr").split("ANSWER SECTION:")[1].split()[1])
        assert first_ttl == 300 and 296 <= later_ttl <= 298


def test_workers_share_the_port_reload_together_and_stop_together(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port, None, "--workers", "2") as vigie:
        assert "UDP+TCP, 2 worker(s)" in vigie.output()
        workers = subprocess.run(["pgrep", "-P", str(vigie.process.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 1
        # Many sockets, many source ports: the kernel spreads them over both processes; all must answer alike.
        assert {ask_from("127.0.0.1", vigie.dns_port, "minecraft.net").header.rcode for _ in range(40)} == {0}
        rules.write_text(rules.read_text().replace("class: {block: [games]}",
                                                   "class: {block: [games], deny: [minecraft.net]}"))
        deadline = time.monotonic() + 10
        while {ask_from("127.0.0.1", vigie.dns_port, "minecraft.net").header.rcode for _ in range(40)} != {3}:
            assert time.monotonic() < deadline, vigie.output()
            time.sleep(0.3)
    assert vigie.process.returncode == 0
    assert subprocess.run(["ps", "-p", workers[0]], capture_output=True).returncode != 0, "the worker stopped too"


def test_a_name_asked_once_takes_no_reply_cache_entry(tmp_path: Path) -> None:
    """Most names are asked once: their answer is kept as the upstream gave it (one entry, not two), and made a
    finished reply for the reply cache when the name is asked again."""
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    metrics = free_port()
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port, metrics) as vigie:
        assert str(ask_from("127.0.0.1", vigie.dns_port, "once.example.fr").rr[0].rdata) == "192.0.2.1"
        gauges = cache_gauges(metrics)
        assert gauges[("vigie_dns_cache_bytes", "upstream")] > 0
        assert gauges[("vigie_dns_cache_bytes", "replies")] == 0
        assert str(ask_from("127.0.0.1", vigie.dns_port, "once.example.fr").rr[0].rdata) == "192.0.2.1"
        assert cache_gauges(metrics)[("vigie_dns_cache_bytes", "replies")] > 0
        assert upstream.asked == ["once.example.fr"]


def cache_gauges(port: int) -> dict[tuple[str, str], float]:
    """(gauge, cache) → value, from one process's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(gauge, cache): float(value) for gauge, cache, value in
            re.findall(r'^(vigie_dns_cache_(?:bytes|limit_bytes))\{cache="(\w+)"\} (\S+)$', text, re.MULTILINE)}


def test_the_caches_of_all_workers_together_stay_within_the_cache_size(tmp_path: Path) -> None:
    # 6,000 queries from one address in a second or two: over a tablet's rate limit (1000/s, bursts of 2000) as soon
    # as the shared socket gives one worker more than its half.
    # The names are under an allow-list entry, so each has a verdict of its own (unlisted names share one per list
    # bits) and the decision cache fills too.
    sized = RULES.replace("timezone: Europe/Paris",
                          "timezone: Europe/Paris\nserver:\n  dns: {cache_size: 2MB, rate_limit: off}") \
        .replace("class: {block: [games]}", "class: {block: [games], allow: [example.fr]}")
    rules = write_tree(tmp_path, {"rules.yaml": sized, "games.txt": "roblox.com\n"})
    metrics = free_port_run(2)
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port, metrics, "--workers", "2") \
            as vigie, contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) for _ in range(64)]
        for number in range(3000):  # each name twice (the second time makes its reply cache entry), over 64 ports
            sock = sockets[number % 64]
            sock.settimeout(2)
            for _ in range(2):
                sock.sendto(DNSRecord.question(f"name{number}.example.fr").pack(), ("127.0.0.1", vigie.dns_port))
                assert DNSRecord.parse(sock.recv(4096)).header.rcode == 0
        workers = [cache_gauges(metrics), cache_gauges(metrics + 1)]
    for gauges in workers:
        limits = {cache: value for (gauge, cache), value in gauges.items() if gauge == "vigie_dns_cache_limit_bytes"}
        assert set(limits) == {"replies", "upstream", "decisions", "exact"}
        assert 0.95 * 1_000_000 <= sum(limits.values()) <= 1_000_000, "each of the 2 workers gets half of 2MB"
        for cache, limit in limits.items():
            assert gauges[("vigie_dns_cache_bytes", cache)] <= limit, cache
    # The bound was reached: the kernel hands each query to whichever worker reads first, so on a busy machine one
    # worker may take most of them (and both asks of most names); at least that one's reply cache is full.
    for cache in ("replies", "decisions"):
        filled = [gauges[("vigie_dns_cache_bytes", cache)] / gauges[("vigie_dns_cache_limit_bytes", cache)]
                  for gauges in workers]
        assert max(filled) >= 0.8, (cache, filled)


def queries_answered(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(value) for value in re.findall(r"^vigie_dns_queries_total\{[^}]*\} (\S+)$", text, re.MULTILINE))


def test_workers_share_the_queries_of_a_single_source_port(tmp_path: Path) -> None:
    """The workers read one UDP socket: whichever is free takes the next queries. With one socket per worker
    (SO_REUSEPORT), the kernel would give every query of one address and port to the same worker."""
    open_rules = RULES.replace("timezone: Europe/Paris", "timezone: Europe/Paris\nserver:\n  dns: {rate_limit: off}")
    rules = write_tree(tmp_path, {"rules.yaml": open_rules, "games.txt": "roblox.com\n"})
    metrics = free_port_run(2)
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port, metrics, "--workers", "2") \
            as vigie, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        query = DNSRecord.question("lumni.fr").pack()
        for _ in range(20):  # bursts: one worker busy with a batch, the other reads the rest
            for _ in range(200):
                sock.sendto(query, ("127.0.0.1", vigie.dns_port))
            for _ in range(200):
                sock.recv(4096)
        counts = [queries_answered(port) for port in (metrics, metrics + 1)]
    assert sum(counts) == 4000
    assert min(counts) >= 200, counts


def test_a_client_over_its_rate_gets_no_answer_then_gets_answers_again(tmp_path: Path) -> None:
    limited = RULES.replace("timezone: Europe/Paris", "timezone: Europe/Paris\nserver:\n  dns: {rate_limit: 20/s}")
    rules = write_tree(tmp_path, {"rules.yaml": limited, "games.txt": "roblox.com\n"})
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port, free_port()) as vigie, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        query = DNSRecord.question("lumni.fr").pack()
        for _ in range(200):  # a burst far over 20/s (bursts up to 40 are allowed)
            sock.sendto(query, ("127.0.0.1", vigie.dns_port))
        answers = 0
        with contextlib.suppress(TimeoutError):
            while True:
                sock.recv(4096)
                answers += 1
        assert 35 <= answers <= 60
        time.sleep(1.5)
        assert ask_from("127.0.0.1", vigie.dns_port, "lumni.fr").header.rcode == 0
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{vigie.metrics_port}/metrics", timeout=5).read()
        dropped = re.search(rb"^vigie_dns_rate_limited_total (\S+)", metrics, re.MULTILINE)
        assert dropped and float(dropped.group(1)) >= 140


def test_a_stream_of_new_names_does_not_push_out_a_name_in_use() -> None:
    cache = ReplyCache(max_bytes=1_000_000, max_entries=3)
    queries = {}
    for name in ("popular.fr", "b.fr", "c.fr", "d.fr", "e.fr"):
        packet = DNSRecord.question(name).pack()
        query = read_plain_query(packet)
        assert query is not None
        queries[name] = (query, packet)
    for name in ("popular.fr", "b.fr", "c.fr"):
        query, packet = queries[name]
        cache.store("view", query, reply_for(DNSRecord.parse(packet), 300), 300, ("g", "allow", "default"))
    assert cache.reply("view", *queries["popular.fr"]) is not None  # used: gets a second chance
    for name in ("d.fr", "e.fr"):
        query, packet = queries[name]
        cache.store("view", query, reply_for(DNSRecord.parse(packet), 300), 300, ("g", "allow", "default"))
    kept = [name for name, (query, packet) in queries.items() if cache.reply("view", query, packet) is not None]
    assert kept == ["popular.fr", "d.fr", "e.fr"]


def test_repeated_query_bytes_keep_their_id_rd_bit_and_case_and_age(tmp_path: Path) -> None:
    """A repeated query is answered from its exact bytes (see ExactReplies): what differs between askers (the ID)
    and what the bytes carry (RD bit, 0x20 case) must come back as sent, with TTLs aged like any cached answer."""
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port) as vigie, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)

        def ask(query: DNSRecord) -> DNSRecord:
            sock.sendto(query.pack(), ("127.0.0.1", vigie.dns_port))
            return DNSRecord.parse(sock.recv(4096))

        for query_id in range(1, 13):  # made, then from the upstream answer, the reply cache, the exact bytes
            query = DNSRecord.question("LuMnI.fR")
            query.header.id, query.header.rd = query_id, query_id % 2
            answer = ask(query)
            assert (answer.header.id, answer.header.rd, answer.header.ra) == (query_id, query_id % 2, 1)
            assert str(answer.q.qname) == "LuMnI.fR." and str(answer.rr[0].rdata) == "192.0.2.1"
        first_ttl = ask(DNSRecord.question("LuMnI.fR")).rr[0].ttl
        time.sleep(2.1)
        later = ask(DNSRecord.question("LuMnI.fR"))
        assert first_ttl == 300 and 296 <= later.rr[0].ttl <= 298
        assert upstream.asked == ["lumni.fr"]


def test_the_reply_cache_holds_to_its_memory_budget() -> None:
    budget = 20 * (ENTRY_COST + 60)
    cache = ReplyCache(max_bytes=budget)
    for number in range(200):
        packet = DNSRecord.question(f"name{number}.example.fr").pack()
        query = read_plain_query(packet)
        assert query is not None
        cache.store("view", query, reply_for(DNSRecord.parse(packet), 300), 300, ("g", "allow", "default"))
        assert cache.memory <= budget
    assert 15 <= len(cache) <= 20
