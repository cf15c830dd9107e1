"""`vigie lists update` against a real HTTP server on 127.0.0.1 serving the UT1 snapshot, good and bad."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from blocklists.formats import ListFormat
from blocklists.sources import SourceSpec
from blocklists.update import UpdatePolicy, UpdateResult, is_due, read_state, update_source
from tests.conftest import REPO, free_port, write_tree
from tests.dns_servers import UpstreamServer, VigieProcess, dig


@dataclass
class Served:
    body: bytes = b""
    hang_seconds: float = 0.0  # send the headers, then nothing for this long
    declared_length: int | None = None


@dataclass
class ListServer:
    """Serves `routes` with ETag and Last-Modified, answering 304 to a matching conditional request."""

    routes: dict[str, Served] = field(default_factory=dict)
    requests: list[dict[str, str]] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def list_server() -> Iterator[ListServer]:
    state = ListServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append({"path": self.path, **dict(self.headers.items())})
            served = state.routes.get(self.path)
            if served is None:
                self.send_error(404)
                return
            version = f"{served.declared_length} {served.hang_seconds}".encode() + served.body
            etag = '"' + hashlib.sha256(version).hexdigest()[:16] + '"'
            if self.headers.get("If-None-Match") == etag:
                self.send_response(304)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", "Tue, 24 Nov 2026 03:00:00 GMT")
            self.send_header("Content-Length", str(served.declared_length or len(served.body)))
            self.end_headers()
            if served.hang_seconds:
                time.sleep(served.hang_seconds)
                return
            self.wfile.write(served.body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def ut1_spec(tmp_path: Path, server: ListServer) -> SourceSpec:
    return SourceSpec("ut1", server.url("/blacklists.tar.gz"), ListFormat.UT1, tmp_path / "var" / "lists" / "ut1")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hostile_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in (("blacklists/adult/domains", b"example.com\n"), ("blacklists/../../etc/cron.d/x", b"*")):
            member = tarfile.TarInfo(name)
            member.size = len(text)
            archive.addfile(member, io.BytesIO(text))
    return buffer.getvalue()


def test_the_ut1_archive_downloads_then_answers_not_modified(tmp_path: Path, list_server: ListServer,
                                                             ut1_archive: Path) -> None:
    list_server.routes["/blacklists.tar.gz"] = Served(ut1_archive.read_bytes())
    spec = ut1_spec(tmp_path, list_server)
    first = update_source(spec, UpdatePolicy())
    assert first.result is UpdateResult.UPDATED and first.entries == 32  # every domain, address and URL
    assert digest(spec.local_path) == digest(ut1_archive)
    state = read_state(spec)
    assert state.etag and state.entries == first.entries and state.last_error is None
    assert not is_due(spec, UpdatePolicy(), time.time())
    assert is_due(spec, UpdatePolicy(refresh_seconds=60), time.time() + 61)

    second = update_source(spec, UpdatePolicy())
    assert second.result is UpdateResult.NOT_MODIFIED
    assert list_server.requests[-1]["If-None-Match"] == state.etag
    assert list_server.requests[-1]["If-Modified-Since"] == "Tue, 24 Nov 2026 03:00:00 GMT"
    assert digest(spec.local_path) == digest(ut1_archive)


@pytest.mark.parametrize(("served", "policy", "reason"), [
    pytest.param(lambda archive: Served(archive[: len(archive) // 2]), UpdatePolicy(),
                 "not a usable ut1 list", id="a truncated archive is refused"),
    pytest.param(lambda archive: Served(archive, declared_length=len(archive) + 1000), UpdatePolicy(),
                 "connection closed after", id="a connection closed early is refused"),
    pytest.param(lambda archive: Served(hostile_archive()), UpdatePolicy(),
                 "leaves the archive", id="an archive with a path leaving it is refused"),
    pytest.param(lambda archive: Served(archive + bytes(2_000_000)), UpdatePolicy(max_bytes=1_000_000),
                 "over the limit", id="a download over the size limit is refused"),
    pytest.param(lambda archive: Served(archive, hang_seconds=8), UpdatePolicy(timeout_seconds=1),
                 "cannot download (timed out)", id="a server that hangs is given up on"),
])
def test_a_bad_download_keeps_the_last_good_copy(tmp_path: Path, list_server: ListServer, ut1_archive: Path,
                                                 served: object, policy: UpdatePolicy, reason: str) -> None:
    archive = ut1_archive.read_bytes()
    list_server.routes["/blacklists.tar.gz"] = Served(archive)
    spec = ut1_spec(tmp_path, list_server)
    assert update_source(spec, UpdatePolicy()).result is UpdateResult.UPDATED
    list_server.routes["/blacklists.tar.gz"] = served(archive)  # type: ignore[operator]
    started = time.monotonic()
    outcome = update_source(spec, policy)
    assert outcome.result is UpdateResult.FAILED
    assert reason in outcome.message and "the last good copy keeps serving" in outcome.message
    assert time.monotonic() - started < 6
    assert digest(spec.local_path) == digest(ut1_archive)
    assert read_state(spec).last_error and not list(spec.local_path.parent.glob(".ut1.download*"))


def run_vigie(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vigie", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_a_list_that_shrinks_too_much_is_refused_until_an_admin_accepts_it(tmp_path: Path,
                                                                           list_server: ListServer) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": f"""
        server:
          lists: {{max_shrink: 30%}}
        lists:
          city: {{source: "{list_server.url('/city.txt')}", format: domains}}
        categories:
          city: [city]
        always_block: [city]
        groups:
          school: {{networks: [127.0.0.1/32], profile: class}}
        profiles:
          class: {{}}
        """})
    names = [f"site{i}.example.fr" for i in range(100)]
    list_server.routes["/city.txt"] = Served("\n".join(names).encode())
    first = run_vigie("lists", "update", "--rules", str(rules))
    assert first.returncode == 0, first.stderr
    assert "city: updated, 100 entries" in first.stdout and "compiled: 100" in first.stdout
    list_server.routes["/city.txt"] = Served("\n".join(names[:60]).encode())
    refused = run_vigie("lists", "update", "--rules", str(rules))
    assert refused.returncode == 1
    assert "city: FAILED: suspicious: 60 entries where the last good copy has 100" in refused.stdout
    stats = run_vigie("lists", "stats", "--rules", str(rules))
    assert "LAST ATTEMPT FAILED: suspicious" in stats.stdout
    assert "city" in stats.stdout and "100" in stats.stdout
    accepted = run_vigie("lists", "update", "--rules", str(rules), "--accept-shrink")
    assert accepted.returncode == 0 and "city: updated, 60 entries (was 100)" in accepted.stdout


def test_stats_show_every_ut1_category_with_its_size_use_and_description(tmp_path: Path, list_server: ListServer,
                                                                       ut1_archive: Path) -> None:
    list_server.routes["/blacklists.tar.gz"] = Served(ut1_archive.read_bytes())
    rules = write_tree(tmp_path, {"rules.yaml": f"""
        lists:
          ut1: {{source: "{list_server.url('/blacklists.tar.gz')}", format: ut1}}
        categories:
          adult: [ut1/porn]
          malware: [ut1/malware]
        groups:
          school: {{networks: [127.0.0.1/32], profile: class}}
        profiles:
          class: {{block: [adult, malware]}}
        """})
    before = run_vigie("lists", "stats", "--rules", str(rules))
    assert "ut1 (ut1, http://127.0.0.1" in before.stdout and "not downloaded yet" in before.stdout
    assert run_vigie("lists", "update", "--rules", str(rules)).returncode == 0
    stats = run_vigie("lists", "stats", "--rules", str(rules)).stdout
    rows = {line.split()[0]: line.split()[1:] for line in stats.splitlines() if line.startswith("  ut1/")}
    assert rows["ut1/malware"][0] == "1" and rows["ut1/malware"][3] == "malware"  # and one address
    # UT1's adult category has no domains file, only URLs (as the sample has it).
    assert rows["ut1/adult"][1] == "2" and rows["ut1/adult"][3] == "adult"
    assert len(rows) == 23 and rows["ut1/games"][3] == "-"
    assert "downloaded 20" in stats and "(0 min ago)" in stats
    assert "porn → adult" in stats
    assert "vigie/dns-bypass" in stats


def test_a_running_service_downloads_at_start_then_again_on_sigusr1(tmp_path: Path,
                                                                   list_server: ListServer) -> None:
    list_server.routes["/city.txt"] = Served(b"roblox.com\n")
    rules = write_tree(tmp_path, {"rules.yaml": f"""
        lists:
          city: {{source: "{list_server.url('/city.txt')}", format: domains}}
        categories:
          city: [city]
        groups:
          school: {{networks: [127.0.0.1/32], profile: class}}
        profiles:
          class: {{block: [city]}}
        """})
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port) as vigie:
        assert "not on disk" in vigie.output()  # started on the bundled lists, then downloads at once
        deadline = time.monotonic() + 20
        while "status: NXDOMAIN" not in dig(vigie.dns_port, "www.roblox.com"):
            assert time.monotonic() < deadline, vigie.output()
            time.sleep(0.2)
        assert "status: NOERROR" in dig(vigie.dns_port, "minecraft.net")
        list_server.routes["/city.txt"] = Served(b"roblox.com\nminecraft.net\n")
        vigie.process.send_signal(signal.SIGUSR1)
        while "status: NXDOMAIN" not in dig(vigie.dns_port, "minecraft.net"):
            assert time.monotonic() < deadline, vigie.output()
            time.sleep(0.2)
        assert "list city: updated, 2 entries (was 1)" in vigie.output()
    state = json.loads((tmp_path / "var" / "lists" / "city.state.json").read_text())
    assert state["entries"] == 2
