"""Real processes and servers for end-to-end tests: a loopback upstream DNS server and a running `vigie dns`."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

from dnslib import CNAME, QTYPE, RD, RR, A, DNSRecord

from tests.conftest import REPO

# The start of every DNS test's rules.yaml: one city list (games.txt) and the bundled bypass list always blocked.
RULES_PREAMBLE = """
timezone: Europe/Paris
lists:
  games: {source: games.txt, format: domains}
categories:
  games: [games]
  bypass: [vigie/dns-bypass]
always_block: [bypass]
devices:
  unknown: refuse
"""


class UpstreamServer:
    """A UDP DNS server on 127.0.0.1 that answers every A question with `address`; records what it was asked.

    Its behaviour can change mid-test: `ttl`, `delay` (seconds before answering), `mode`: `answer`, `silent`,
    `servfail`, or a hostile or broken server's answers — `garbage` (random bytes), `wrong_id` (a good answer with
    another ID), `wrong_question` (the right ID, another name: a poisoning attempt), `mangled` (the right ID and
    question, then a broken record). With `tcp`, it also answers over TCP on the same port, whole, and `truncate`
    makes its UDP answers empty with the TC bit set (as a server does when the answer is too big)."""

    def __init__(self, address: str = "192.0.2.1", ttl: int = 300, tcp: bool = False) -> None:
        self.address = address
        self.ttl = ttl
        self.delay = 0.0
        self.mode = "answer"
        self.records = 1  # A records per answer (many make an answer too big for plain UDP)
        self.asked: list[str] = []
        self.packets: list[bytes] = []
        self.truncate = False
        self.rcode = 0  # the rcode of every answer (FORMERR, NOTIMP, REFUSED: an upstream that fails us)
        self.authenticated = False  # set AD (and AA) on its answers, as a validating upstream may
        self.drop_next = 0  # queries to receive (and record) without answering, as if lost on the way
        # Names answered another way: `aliases` by a CNAME to another name (then that name's A records, as a
        # recursive resolver gives them), `address_of` by a given A address, `https_targets` by an HTTPS record
        # naming another host (for HTTPS questions).
        self.aliases: dict[str, str] = {}
        self.address_of: dict[str, str] = {}
        self.https_targets: dict[str, str] = {}
        self.tcp_asked: list[str] = []
        self.sock, self.listener = self._bind(tcp)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        if self.listener is not None:
            self._threads.append(threading.Thread(target=self._serve_tcp, daemon=True))

    @staticmethod
    def _bind(tcp: bool) -> tuple[socket.socket, socket.socket | None]:
        for _ in range(20):  # a free UDP port whose TCP twin is free too
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            udp.settimeout(0.2)
            if not tcp:
                return udp, None
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.bind(("127.0.0.1", udp.getsockname()[1]))
            except OSError:
                listener.close()
                udp.close()
                continue
            listener.listen(8)
            listener.settimeout(0.2)
            return udp, listener
        raise RuntimeError("no free port for UDP and TCP")

    def __enter__(self) -> UpstreamServer:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        self.sock.close()
        if self.listener is not None:
            self.listener.close()

    def _serve_tcp(self) -> None:
        assert self.listener is not None
        while not self._stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(2)
                length = struct.unpack("!H", connection.recv(2))[0]
                request = DNSRecord.parse(connection.recv(length))
                self.tcp_asked.append(str(request.q.qname).rstrip(".").lower())
                reply = self._reply(request).pack()
                connection.sendall(struct.pack("!H", len(reply)) + reply)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            request = DNSRecord.parse(data)
            question = request.questions[0]
            self.asked.append(str(question.qname).rstrip(".").lower())
            self.packets.append(data)
            if self.mode == "silent":
                continue
            if self.drop_next:
                self.drop_next -= 1
                continue
            if self.delay:
                threading.Timer(self.delay, self._answer, (request, peer)).start()
            else:
                self._answer(request, peer)

    def _answer(self, request: DNSRecord, peer: tuple[str, int]) -> None:
        if self.mode in ("garbage", "wrong_id", "wrong_question", "mangled"):
            self._hostile(request, peer)
            return
        if self.truncate:
            reply = request.reply()
            reply.header.tc = 1
        else:
            reply = self._reply(request)
        with contextlib.suppress(OSError):
            self.sock.sendto(reply.pack(), peer)

    def _reply(self, request: DNSRecord) -> DNSRecord:
        reply = request.reply()
        question = request.questions[0]
        asked = str(question.qname).rstrip(".").lower()
        reply.header.ad = int(self.authenticated)
        if self.mode == "servfail" or self.rcode:
            reply.header.rcode = self.rcode or 2
        elif asked in self.https_targets and question.qtype == QTYPE.HTTPS:
            target = self.https_targets[asked]
            # SvcPriority 1, the target name, no parameters (RFC 9460 §2.2).
            rdata = b"\x00\x01" + b"".join(bytes((len(p),)) + p.encode() for p in target.split(".")) + b"\x00"
            reply.add_answer(RR(question.qname, QTYPE.HTTPS, rdata=RD(rdata), ttl=self.ttl))
        elif asked in self.aliases and question.qtype in (QTYPE.A, QTYPE.AAAA):
            name = asked
            while name in self.aliases:
                target = self.aliases[name]
                reply.add_answer(RR(name + ".", QTYPE.CNAME, rdata=CNAME(target + "."), ttl=self.ttl))
                name = target
            if question.qtype == QTYPE.A:
                reply.add_answer(RR(name + ".", QTYPE.A, rdata=A(self.address_of.get(name, self.address)),
                                    ttl=self.ttl))
        elif asked in self.address_of and question.qtype == QTYPE.A:
            reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(self.address_of[asked]), ttl=self.ttl))
        elif question.qtype == QTYPE.A:
            base = self.address.rsplit(".", 1)[0]
            for index in range(self.records):
                address = self.address if index == 0 else f"{base}.{(index % 250) + 2}"
                reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(address), ttl=self.ttl))
        return reply

    def _hostile(self, request: DNSRecord, peer: tuple[str, int]) -> None:
        if self.mode == "garbage":
            packet = os.urandom(64)
        elif self.mode == "mangled":
            packet = request.reply().pack() + b"\xc0\x0c\x00\x01\x00\x01\xff"  # a record cut short
            packet = packet[:6] + b"\x00\x01" + packet[8:]  # one answer announced
        else:
            reply = request.reply()
            if self.mode == "wrong_question":
                reply.questions[0].qname = "poisoned.example"
            reply.add_answer(RR(reply.questions[0].qname, QTYPE.A, rdata=A("203.0.113.66"), ttl=86400))
            if self.mode == "wrong_id":
                reply.header.id = (request.header.id + 1) % 65536
            packet = reply.pack()
        with contextlib.suppress(OSError):
            self.sock.sendto(packet, peer)


class RunningVigie:
    """A `vigie` command as an admin runs it, logging to a file, ready once its startup line is printed; stopped
    with SIGTERM on exit."""

    ready_text = "vigie: "

    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None,
                 file_limit: int | None = None) -> None:
        self.log = log
        self._log_file = log.open("w")

        def limit_files() -> None:  # in the child, before it runs: as `ulimit -n` or systemd's LimitNOFILE would
            if file_limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (file_limit, file_limit))

        self.process = subprocess.Popen([sys.executable, "-m", "vigie", *command], cwd=REPO, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                                       **(env or {})}, preexec_fn=limit_files)

    def __enter__(self) -> Self:
        deadline = time.monotonic() + 30
        while self.ready_text not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vigie did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log_file.close()

    def output(self) -> str:
        return self.log.read_text()


class VigieProcess(RunningVigie):
    """`vigie dns` on free loopback ports."""

    ready_text = "vigie: DNS on"

    def __init__(self, rules: Path, dns_port: int, upstream_port: int, metrics_port: int | None = None,
                 *extra: str, file_limit: int | None = None) -> None:
        self.dns_port = dns_port
        self.metrics_port = metrics_port
        super().__init__(["dns", "--rules", str(rules), "--dns-listen", f"127.0.0.1:{dns_port}",
                          "--upstream", f"127.0.0.1:{upstream_port}",
                          "--metrics-listen", f"127.0.0.1:{metrics_port}" if metrics_port else "off",
                          *(extra if "--api-listen" in extra else ("--api-listen", "off", *extra))],
                         rules.parent / "vigie.log", file_limit=file_limit)


def dig(port: int, *args: str, server: str = "127.0.0.1") -> str:
    result = subprocess.run(["dig", f"@{server}", "-p", str(port), "+time=2", "+tries=1", *args],
                            capture_output=True, text=True, timeout=20)
    return result.stdout
