"""The resolver under conditions a user meets rarely: big answers, IPv6, and a stream of garbage."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

from dnslib import DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dns_resolver.server import TCP_CONNECTIONS_PER_CLIENT
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
