"""For end-to-end proxy tests: a local HTTP and HTTPS origin that answers for any name, and `vigie proxy` itself.

The origin's certificate comes from a test CA, so a client that trusts only that CA proves a connection was passed
through untouched, and a client that trusts only Vigie's CA proves it was intercepted. mitmproxy reaches the origin
through `tests/proxy_origin_map.py`, a mitmproxy script standing in for the Internet's DNS: every upstream
connection goes to the local origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from filter_proxy.addon import VigieAddon
from filter_proxy.server import start_proxy
from policy.model import SocketAddress
from tests.conftest import REPO
from tests.dns_servers import RunningVigie

ORIGIN_NAMES = ("allowed.example", "www.google.com", "www.bing.com", "www.youtube.com", "roblox.com",
                "www.roblox.com", "pages.example", "wiki.example", "ipv4.google.com", "www.google.fr",
                "html.duckduckgo.com", "cn.bing.com", "m.youtube.com", "youtube.com")


def make_origin_certificates(directory: Path) -> tuple[Path, Path]:
    """A test CA (returned as a PEM file) and a certificate for ORIGIN_NAMES (key + chain in one PEM)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Vigie tests origin CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ORIGIN_NAMES[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in ORIGIN_NAMES]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file, leaf_file = directory / "origin-ca.pem", directory / "origin.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaf_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
                          + leaf.public_bytes(serialization.Encoding.PEM))
    return ca_file, leaf_file


class _EchoHandler(BaseHTTPRequestHandler):
    """Answers every GET with what it received, as JSON: the test reads what the proxy forwarded."""

    def do_GET(self) -> None:
        body = json.dumps({"path": self.path, "headers": dict(self.headers.items())}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Origin:
    """HTTP and HTTPS echo servers on 127.0.0.1 (free ports), stopped on exit."""

    def __init__(self, directory: Path) -> None:
        self.ca_file, leaf = make_origin_certificates(directory)
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
        self.https = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(leaf)
        self.https.socket = context.wrap_socket(self.https.socket, server_side=True)
        for server in (self.http, self.https):
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def __enter__(self) -> Origin:
        return self

    def __exit__(self, *exc: object) -> None:
        for server in (self.http, self.https):
            server.shutdown()
            server.server_close()


def allow_origin(rules: Path, origin: Origin) -> None:
    """Let the proxy reach the local origin: it is on loopback, which `server.proxy.deny_networks` refuses unless
    `internal_hosts` lists it, as an admin lists a school server. Its two ports only: the rest of loopback (the
    metrics, the admin API, Redis) stays out of reach, which the bypass matrix checks."""
    document = yaml.safe_load(rules.read_text()) or {}
    proxy = document.setdefault("server", {}).setdefault("proxy", {})
    proxy["internal_hosts"] = [f"127.0.0.1:{origin.http.server_port}", f"127.0.0.1:{origin.https.server_port}"]
    rules.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))


class ProxyProcess(RunningVigie):
    """`vigie proxy` wired to the local origin."""

    ready_text = "vigie: proxy on"

    def __init__(self, rules: Path, port: int, origin: Origin, *extra: str) -> None:
        allow_origin(rules, origin)
        self.port = port
        self.data_dir = rules.parent / "var"
        super().__init__(["proxy", "--rules", str(rules), "--proxy-listen", f"127.0.0.1:{port}",
                          "--metrics-listen", "off", "--set", f"scripts={REPO / 'tests' / 'proxy_origin_map.py'}",
                          "--set", f"ssl_verify_upstream_trusted_ca={origin.ca_file}",
                          *(extra if "--api-listen" in extra else ("--api-listen", "off", *extra))],
                         rules.parent / f"proxy-{port}.log",
                         {"VIGIE_TEST_ORIGIN_HTTP": str(origin.http.server_port),
                          "VIGIE_TEST_ORIGIN_HTTPS": str(origin.https.server_port)})

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "ca" / "vigie-ca.pem"


def curl(proxy_port: int, url: str, *args: str) -> tuple[int, str, str]:
    """(exit code, HTTP status, body) of `curl --proxy` as a tablet's browser would send the request."""
    result = subprocess.run(["curl", "-sS", "--max-time", "10", "--proxy", f"http://127.0.0.1:{proxy_port}",
                             "-w", "\n%{http_code}", *args, url], capture_output=True, text=True, timeout=30)
    body, _, status = result.stdout.rpartition("\n")
    return result.returncode, status, body or result.stderr


@dataclass
class LoopbackServer:
    """A raw TCP server for the proxy front's tests: `serve` accepts until its listener closes and answers each
    connection in a thread of its own (`answer`, a subclass's), counting them."""

    port: int = 0
    connections: int = 0

    def serve(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn: socket.socket) -> None:
        raise NotImplementedError


def client_hello(server_name: str | None) -> bytes:
    """A real TLS ClientHello (OpenSSL's), as a browser's first bytes in a tunnel."""
    context = ssl.create_default_context()
    context.check_hostname = server_name is not None
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@contextlib.contextmanager
def proxy_in_this_process(addon: VigieAddon, port: int, confdir: Path, options: tuple[str, ...] = ()) -> Iterator[None]:
    """Vigie's `start_proxy` with `addon` on 127.0.0.1:`port`, in a thread of this process (so that a test can reach
    into the addon), under asyncio.run, which cancels what is left and closes the loop on the way out."""
    stop, ready = threading.Event(), threading.Event()

    async def serve() -> None:
        handle = await start_proxy(addon, SocketAddress("127.0.0.1", port), "regular", confdir, options)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await handle.stop()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(20), "the proxy started"
    try:
        yield
    finally:
        stop.set()
        thread.join(15)
        assert not thread.is_alive(), "the proxy stopped"
