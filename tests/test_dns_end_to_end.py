"""`vigie dns` end to end: real sockets on 127.0.0.1, a real upstream server, `dig` as a user would run it."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord

from tests.conftest import REPO, free_port, write_tree
from tests.dns_servers import RULES_PREAMBLE, UpstreamServer, VigieProcess, dig

RULES = RULES_PREAMBLE + """
server:
  dns: {rate_limit: off}   # the reload test's query loop runs faster than any tablet
groups:
  school: {networks: [127.0.0.1/32], profile: class}
profiles:
  class:
    block: [games]
    deny: [tiktok.com]
    safe_search: strict
"""


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[VigieProcess, UpstreamServer, Path]]:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port, free_port()) as vigie:
        yield vigie, upstream, rules


def test_an_allowed_name_is_forwarded_and_answered(running: tuple[VigieProcess, UpstreamServer, Path]) -> None:
    vigie, upstream, _ = running
    out = dig(vigie.dns_port, "WwW.Example.ORG", "A")
    assert "status: NOERROR" in out and "192.0.2.1" in out
    assert "WwW.Example.ORG." in out.split("ANSWER SECTION:")[1]  # the client's case comes back as asked
    assert upstream.asked == ["www.example.org"]
    dig(vigie.dns_port, "www.example.org", "A")
    assert upstream.asked == ["www.example.org"], "the second answer comes from the cache"


def test_a_blocked_name_gets_nxdomain_with_an_extended_error(
        running: tuple[VigieProcess, UpstreamServer, Path]) -> None:
    vigie, upstream, _ = running
    out = dig(vigie.dns_port, "www.roblox.com", "A")
    assert "status: NXDOMAIN" in out
    assert "EDE: 15 (Blocked): (games; not allowed in the next 14 days)" in out, "why, and when it opens again"
    out = dig(vigie.dns_port, "+noedns", "tiktok.com", "A")
    assert "status: NXDOMAIN" in out and "EDE" not in out, "no EDNS in the answer when the client sent none"
    assert "dns.google" not in upstream.asked and "roblox.com" not in " ".join(upstream.asked)


def test_bypass_canary_and_safe_search(running: tuple[VigieProcess, UpstreamServer, Path]) -> None:
    vigie, _, _ = running
    assert "status: NXDOMAIN" in dig(vigie.dns_port, "use-application-dns.net", "A")
    out = dig(vigie.dns_port, "www.google.fr", "A")
    answer = out.split("ANSWER SECTION:")[1]
    assert "CNAME\tforcesafesearch.google.com." in answer and "192.0.2.1" in answer


def test_tcp_carries_several_queries_on_one_connection(running: tuple[VigieProcess, UpstreamServer, Path]) -> None:
    vigie, _, _ = running
    assert "status: NXDOMAIN" in dig(vigie.dns_port, "+tcp", "roblox.com", "A")
    with socket.create_connection(("127.0.0.1", vigie.dns_port), timeout=5) as conn:
        for name, rcode in (("lumni.fr", RCODE.NOERROR), ("roblox.com", RCODE.NXDOMAIN)):
            wire = DNSRecord.question(name).pack()
            conn.sendall(len(wire).to_bytes(2, "big") + wire)
            length = int.from_bytes(conn.recv(2), "big")
            data = b""
            while len(data) < length:
                data += conn.recv(length - len(data))
            assert DNSRecord.parse(data).header.rcode == rcode


def test_clients_outside_the_groups_are_refused(running: tuple[VigieProcess, UpstreamServer, Path]) -> None:
    vigie, upstream, _ = running
    out = dig(vigie.dns_port, "-b", "127.0.0.2", "example.org", "A")
    assert "status: REFUSED" in out
    assert upstream.asked == []
    # No amplification: the refusal is no larger than the question, with or without EDNS, also for ANY.
    for query in (DNSRecord.question("example.org", "ANY"), DNSRecord.question("example.org")):
        if query.q.qtype != 255:
            query.add_ar(EDNS0(udp_len=4096))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.2", 0))
            sock.settimeout(2)
            sock.sendto(query.pack(), ("127.0.0.1", vigie.dns_port))
            reply = sock.recv(4096)
        assert DNSRecord.parse(reply).header.rcode == 5 and len(reply) <= len(query.pack())


def test_malformed_packets_get_formerr_or_nothing_and_the_server_goes_on(
        running: tuple[VigieProcess, UpstreamServer, Path]) -> None:
    vigie, _, _ = running
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1)
        sock.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff", ("127.0.0.1", vigie.dns_port))
        reply = sock.recv(512)
        assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F == RCODE.FORMERR
        sock.sendto(b"\x00", ("127.0.0.1", vigie.dns_port))
        with pytest.raises(TimeoutError):
            sock.recv(512)
    assert "status: NOERROR" in dig(vigie.dns_port, "example.org", "A")


def _ask(port: int, name: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(DNSRecord.question(name, "A").pack(), ("127.0.0.1", port))
        return int(DNSRecord.parse(sock.recv(4096)).header.rcode)


def test_an_edit_is_picked_up_without_restart_and_a_bad_edit_keeps_the_old_rules(
        running: tuple[VigieProcess, UpstreamServer, Path]) -> None:
    vigie, _, rules = running
    assert _ask(vigie.dns_port, "wikipedia.org") == RCODE.NOERROR
    answered: list[int] = []
    lost: list[str] = []
    stop = threading.Event()

    def load() -> None:  # queries keep flowing during the reloads; none may be lost
        while not stop.is_set():
            try:
                answered.append(_ask(vigie.dns_port, "lumni.fr"))
            except TimeoutError:
                lost.append("lumni.fr")

    thread = threading.Thread(target=load)
    thread.start()
    try:
        rules.write_text(rules.read_text().replace("deny: [tiktok.com]", "deny: [tiktok.com, wikipedia.org]"))
        assert _eventually(lambda: _ask(vigie.dns_port, "wikipedia.org") == RCODE.NXDOMAIN)
        rules.write_text(rules.read_text().replace("groups:", "groups: [oops"))
        time.sleep(3)
        assert _ask(vigie.dns_port, "wikipedia.org") == RCODE.NXDOMAIN, "the previous rules keep serving"
    finally:
        stop.set()
        thread.join()
    assert lost == [] and len(answered) > 50 and set(answered) == {RCODE.NOERROR}
    assert "rules reload refused" in vigie.output() and "YAML syntax" in vigie.output()
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{vigie.metrics_port}/metrics", timeout=5).read().decode()
    assert 'vigie_rules_reloads_total{result="invalid"} 1.0' in metrics
    assert 'vigie_rules_reloads_total{result="ok"} 1.0' in metrics
    assert 'vigie_dns_queries_total{action="block",category="none",group="school",reason="deny_list"}' in metrics


def _eventually(check: object, seconds: float = 8.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if callable(check) and check():
            return True
        time.sleep(0.2)
    return False


def test_https_records_of_rewritten_names_are_not_passed(running: tuple[VigieProcess, UpstreamServer, Path]) -> None:
    vigie, _, _ = running
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(DNSRecord.question("www.google.fr", "HTTPS").pack(), ("127.0.0.1", vigie.dns_port))
        reply = DNSRecord.parse(sock.recv(4096))
    assert reply.header.rcode == RCODE.NOERROR and not [rr for rr in reply.rr if rr.rtype == QTYPE.HTTPS]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_dns_port_already_taken_is_one_clear_line(tmp_path: Path, workers: str) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": RULES, "games.txt": "roblox.com\n"})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "vigie", "dns", "--rules", str(rules), "--dns-listen",
                                 f"127.0.0.1:{port}", "--metrics-listen", "off", "--api-listen", "off",
                                 "--workers", workers], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        f"vigie: cannot listen for DNS on 127.0.0.1:{port} (UDP): Address already in use (is another DNS server")
