"""The resolver under conditions a user meets rarely: big answers, IPv6, garbage, protocol edges, many connections."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest
from dnslib import DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dns_resolver.transport import TCP_CONNECTIONS_PER_CLIENT
from tests.conftest import free_port, write_tree
from tests.dns_servers import UpstreamServer, VigieProcess, dig
from tests.test_dns_fastpath import RULES

IPV6_RULES = RULES.replace("school: {addresses: [127.0.0.1]", "school: {addresses: [127.0.0.1, '::1']")


def test_an_answer_too_big_for_the_client_is_truncated_and_whole_over_tcp(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port) as vigie:
        upstream.records = 60  # ~1 KB of answer: over 512 bytes
        truncated = dig(vigie.dns_port, "+noedns", "+ignore", "big.example")
        assert "flags: qr tc rd ra;" in truncated and "ANSWER: 0" in truncated
        whole = dig(vigie.dns_port, "+tcp", "big.example")
        assert "ANSWER: 60" in whole
        assert "ANSWER: 60" in dig(vigie.dns_port, "+bufsize=4096", "big.example"), "EDNS clients get it by UDP"


def test_the_resolver_listens_on_ipv6(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": IPV6_RULES, "games.txt": "roblox.com\n"})
    port = free_port()
    with UpstreamServer() as upstream, VigieProcess(rules, port, upstream.port, None,
                                                    "--dns-listen", f"[::1]:{port}") as vigie:
        out = dig(vigie.dns_port, "roblox.com", server="::1")
        assert "status: NXDOMAIN" in out and "SERVER: ::1#" in out
        assert "status: NOERROR" in dig(vigie.dns_port, "lumni.fr")  # and still IPv4


GARBAGE = st.one_of(
    st.binary(max_size=600),
    # A real query with bytes flipped: the interesting malformations sit close to valid ones.
    st.tuples(st.sampled_from([DNSRecord.question(n, t).pack() for n in ("lumni.fr", "a.b.example", "x")
                               for t in ("A", "AAAA", "HTTPS", "TXT")]),
              st.lists(st.tuples(st.integers(0, 60), st.integers(0, 255)), max_size=6))
    .map(lambda pair: bytes(_flip(pair[0], pair[1]))),
)


def _flip(packet: bytes, changes: list[tuple[int, int]]) -> bytearray:
    mutated = bytearray(packet)
    for position, value in changes:
        if position < len(mutated):
            mutated[position] = value
    return mutated


def test_garbage_never_stops_the_server(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port) as vigie, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)

        @given(GARBAGE)
        @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
        def send(packet: bytes) -> None:
            sock.sendto(packet, ("127.0.0.1", vigie.dns_port))

        send()
        assert "status: NOERROR" in dig(vigie.dns_port, "lumni.fr")
        assert vigie.process.poll() is None
        assert "Traceback" not in vigie.output()


def tcp_query(connection: socket.socket, name: str) -> DNSRecord | None:
    """One query over an open TCP connection; None when the server closed it instead of answering."""
    wire = DNSRecord.question(name).pack()
    try:
        connection.sendall(struct.pack("!H", len(wire)) + wire)
        header = connection.recv(2)
    except (BrokenPipeError, ConnectionResetError):
        return None
    if len(header) < 2:
        return None
    length, body = struct.unpack("!H", header)[0], b""
    while len(body) < length:
        body += connection.recv(length - len(body))
    return DNSRecord.parse(body)


def test_tcp_is_held_to_a_connection_cap_and_the_same_rate_as_udp(tmp_path: Path) -> None:
    limited = RULES.replace("timezone: Europe/Paris", "timezone: Europe/Paris\nserver:\n  dns: {rate_limit: 20/s}")
    rules = write_tree(tmp_path, {"rules.yaml": limited, "games.txt": "roblox.com\n"})
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port) as vigie:
        connections = [socket.create_connection(("127.0.0.1", vigie.dns_port), timeout=3)
                       for _ in range(TCP_CONNECTIONS_PER_CLIENT + 8)]
        try:
            over = connections[TCP_CONNECTIONS_PER_CLIENT:]
            assert all(tcp_query(c, "lumni.fr") is None for c in over), "over the cap: closed at once"
            answered = [tcp_query(c, "lumni.fr") for c in connections[:TCP_CONNECTIONS_PER_CLIENT]]
            assert all(a is not None and a.header.rcode == 0 for a in answered[:20]), "within the rate"
            flood = connections[0]
            results = [tcp_query(flood, "lumni.fr") for _ in range(60)]
            assert None in results, "a client over its rate loses its connection"
        finally:
            for connection in connections:
                connection.close()
        time.sleep(1.5)
        with socket.create_connection(("127.0.0.1", vigie.dns_port), timeout=3) as fresh:
            answer = tcp_query(fresh, "lumni.fr")
            assert answer is not None and answer.header.rcode == 0, "the limits reset"


def raw_query(name_wire: bytes, qtype: int = 1, flags: int = 0x0100, edns_size: int | None = None,
              query_id: int = 0x4242) -> bytes:
    """A query built by hand, for what dnslib and dig refuse to build: `name_wire` is the name's wire form."""
    additional = 1 if edns_size is not None else 0
    packet = struct.pack("!HHHHHH", query_id, flags, 1, 0, 0, additional) + name_wire + struct.pack("!HH", qtype, 1)
    if edns_size is not None:
        packet += b"\x00" + struct.pack("!HHIH", 41, edns_size, 0, 0)
    return packet


def ask_raw(port: int, packet: bytes) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(packet, ("127.0.0.1", port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


def ask_tcp_raw(connection: socket.socket, packet: bytes) -> bytes | None:
    connection.sendall(struct.pack("!H", len(packet)) + packet)
    header = connection.recv(2)
    if len(header) < 2:
        return None
    length, body = struct.unpack("!H", header)[0], b""
    while len(body) < length:
        body += connection.recv(length - len(body))
    return body


LONG_LABEL = bytes((64,)) + b"a" * 64 + b"\x03com\x00"  # a label over 63 octets
LONG_NAME = (bytes((63,)) + b"b" * 63) * 4 + b"\x00"  # 257 octets on the wire, over 255


def test_a_name_the_wire_rules_forbid_gets_formerr_never_silence_nor_a_traceback(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port) as vigie:
        for name in (LONG_LABEL, LONG_NAME):
            for edns in (None, 1232):
                answer = ask_raw(vigie.dns_port, raw_query(name, edns_size=edns))
                assert answer is not None, "never silence"
                assert answer[:2] == b"\x42\x42" and answer[3] & 0x0F == 1, answer[:4]  # our ID, FORMERR
        with socket.create_connection(("127.0.0.1", vigie.dns_port), timeout=3) as connection:
            formerr = ask_tcp_raw(connection, raw_query(LONG_LABEL))
            assert formerr is not None and formerr[3] & 0x0F == 1
            after = tcp_query(connection, "lumni.fr")  # pipelined behind it on the same connection
            assert after is not None and after.header.rcode == 0, "the connection goes on"
        assert "Traceback" not in vigie.output()
        assert upstream.asked == ["lumni.fr"]


def test_other_opcodes_than_query_get_notimp(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    name = b"\x05lumni\x02fr\x00"
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port) as vigie:
        for opcode in (2, 4, 5):  # STATUS, NOTIFY, UPDATE
            answer = ask_raw(vigie.dns_port, raw_query(name, qtype=6, flags=opcode << 11))
            assert answer is not None
            assert answer[2] & 0x80 and (answer[2] >> 3) & 0x0F == opcode, "a response, its opcode echoed"
            assert answer[3] & 0x0F == 4, f"opcode {opcode}: NOTIMP"
        assert upstream.asked == [], "nothing forwarded"


def test_the_root_is_forwarded_and_resolver_arpa_answered_here(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port) as vigie:
        for qtype in ("NS", "A"):
            out = dig(vigie.dns_port, ".", qtype)
            assert "status: NOERROR" in out, out
        assert upstream.asked == ["", ""], "the root goes upstream, as any name"
        designation = dig(vigie.dns_port, "_dns.resolver.arpa", "TYPE64")
        assert "status: NOERROR" in designation and "ANSWER: 0" in designation
        assert " aa " in designation.split("flags:")[1].split(";")[0] + " ", "authoritative for it (RFC 9462)"
        assert "status: NXDOMAIN" in dig(vigie.dns_port, "other.resolver.arpa")
        assert upstream.asked == ["", ""], "resolver.arpa is never forwarded"


def flags_of(dig_output: str) -> set[str]:
    return set(dig_output.split("flags:", 1)[1].split(";", 1)[0].split())


def test_no_answer_claims_authority_or_authentication(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port) as vigie:
        upstream.authenticated = True  # the upstream says AA and AD: Vigie validates nothing and owns no zone
        for args in (("lumni.fr",), ("lumni.fr",), ("+adflag", "lumni.fr"), ("+dnssec", "wiki.example"),
                     ("+tcp", "tcp.example"), ("roblox.com",), ("www.google.com",), ("+noedns", "noedns.example")):
            out = dig(vigie.dns_port, *args)
            assert "status:" in out, args
            assert not flags_of(out) & {"aa", "ad"}, (args, flags_of(out))


def test_a_blocked_name_gets_an_soa_that_ends_with_the_block(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port) as vigie:
        answer = DNSRecord.parse(ask_raw(vigie.dns_port, DNSRecord.question("roblox.com").pack()) or b"")
        assert answer.header.rcode == 3 and len(answer.auth) == 1
        soa = answer.auth[0]
        assert soa.rtype == 6 and 0 < soa.ttl <= 60 and soa.rdata.times[-1] == soa.ttl, soa
        assert upstream.asked == []


def test_an_answer_never_exceeds_1232_bytes_over_udp_whatever_the_client_offers(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port) as vigie:
        upstream.records = 150  # ~2.5 KB of answer
        name = b"\x03big\x07example\x00"
        for attempt in range(3):  # forwarded, then from the reply cache, then from the exact-bytes index
            answer = ask_raw(vigie.dns_port, raw_query(name, edns_size=4096, query_id=attempt))
            assert answer is not None and len(answer) <= 1232, (attempt, None if answer is None else len(answer))
            assert answer[2] & 0x02, "TC: ask again over TCP"
        assert "ANSWER: 150" in dig(vigie.dns_port, "+tcp", "big.example"), "whole over TCP"


@pytest.mark.parametrize("rcode", [1, 4, 5], ids=["FORMERR", "NOTIMP", "REFUSED"])
def test_an_upstream_error_is_servfail_over_udp_and_tcp_alike(tmp_path: Path, rcode: int) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port) as vigie:
        upstream.rcode = rcode
        assert "status: SERVFAIL" in dig(vigie.dns_port, "udp.example")
        assert "status: SERVFAIL" in dig(vigie.dns_port, "+tcp", "tcp.example")


def connect_from(source: str, port: int) -> socket.socket:
    connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    connection.settimeout(3)
    connection.bind((source, 0))
    connection.connect(("127.0.0.1", port))
    return connection


def test_a_stranger_is_refused_and_let_go_and_tcp_connections_are_capped_in_all(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port, file_limit=200) as vigie:
        with connect_from("127.0.0.9", vigie.dns_port) as stranger:
            refused = tcp_query(stranger, "lumni.fr")
            assert refused is not None and refused.header.rcode == 5
            assert tcp_query(stranger, "lumni.fr") is None, "closed after its REFUSED"
        cap = 100  # half of the 200 files the process may open
        sources = [f"127.0.1.{n}" for n in range(1, 6)]  # 5 × 30 connections, under the per-address cap
        connections = [connect_from(source, vigie.dns_port) for source in sources for _ in range(30)]
        try:
            time.sleep(1)  # all accepted (or closed) by the server
            answered = [tcp_query(c, "lumni.fr") for c in connections]
            assert sum(a is not None for a in answered) == cap, "connections over the cap are closed at once"
            assert "status: NOERROR" in dig(vigie.dns_port, "udp.example"), "UDP members still answered"
        finally:
            for connection in connections:
                connection.close()
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", vigie.dns_port), timeout=3) as fresh:
            answer = tcp_query(fresh, "lumni.fr")
            assert answer is not None and answer.header.rcode == 0, "room again once they close"
        assert vigie.output().count("DNS-over-TCP connections open") == 1, "said once, not per connection"
