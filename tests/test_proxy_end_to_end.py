"""`vigie proxy` end to end: curl through the real proxy to a real local HTTP(S) origin."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.conftest import free_port, write_tree
from tests.proxy_servers import Origin, ProxyProcess, curl
from tests.test_proxy_hooks import FILES as HOOK_FILES
from tests.test_proxy_hooks import RULES as HOOK_RULES

# The hook tests' rules with a fixed profile: these run at whatever time it is, night included.
RULES = HOOK_RULES.replace("schedule: week", "profile: class")
FILES = {**HOOK_FILES, "rules.yaml": RULES}


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[ProxyProcess, Origin]]:
    rules = write_tree(tmp_path, FILES)
    with Origin(tmp_path) as origin, ProxyProcess(rules, free_port(), origin) as running:
        yield running, origin


def test_an_allowed_https_site_is_passed_through_undecrypted(proxy: tuple[ProxyProcess, Origin]) -> None:
    running, origin = proxy
    # Trusting only the origin's CA: this succeeds only if the origin's own certificate reached curl.
    code, status, body = curl(running.port, "https://allowed.example/hello", "--cacert", str(origin.ca_file))
    assert (code, status) == (0, "200") and json.loads(body)["path"] == "/hello"
    code, _, error = curl(running.port, "https://allowed.example/hello", "--cacert", str(running.ca_file))
    assert code == 60, error  # Vigie's CA did not sign what curl saw: nothing was intercepted


def test_a_search_engine_is_intercepted_and_gets_safe_search(proxy: tuple[ProxyProcess, Origin]) -> None:
    running, _ = proxy
    code, status, body = curl(running.port, "https://www.google.com/search?q=chat&safe=off",
                              "--cacert", str(running.ca_file))
    assert (code, status) == (0, "200"), body
    assert json.loads(body)["path"] == "/search?q=chat&safe=active"
    _, _, youtube = curl(running.port, "https://www.youtube.com/", "--cacert", str(running.ca_file))
    assert json.loads(youtube)["headers"]["YouTube-Restrict"] == "Strict"


@pytest.mark.parametrize("url", ["https://www.roblox.com/", "http://roblox.com/play",
                                 "https://pages.example/adult-section/1"])
def test_blocked_sites_and_urls_get_the_block_page(proxy: tuple[ProxyProcess, Origin], url: str) -> None:
    running, _ = proxy
    code, status, body = curl(running.port, url, "--cacert", str(running.ca_file))
    assert (code, status) == (0, "403") and "Ce site est bloqué" in body


def test_a_harmless_connect_with_a_blocked_tls_name_is_caught(proxy: tuple[ProxyProcess, Origin]) -> None:
    running, _ = proxy
    # CONNECT allowed.example:443, then a ClientHello for www.roblox.com.
    code, status, body = curl(running.port, "https://www.roblox.com/", "--cacert", str(running.ca_file),
                              "--connect-to", "www.roblox.com:443:allowed.example:443")
    assert (code, status) == (0, "403") and "www.roblox.com" in body


def test_the_ca_is_created_with_its_exports(proxy: tuple[ProxyProcess, Origin]) -> None:
    running, _ = proxy
    assert (running.data_dir / "ca" / "vigie-ca.der").stat().st_size > 300
    assert (running.data_dir / "proxy-ca").stat().st_mode & 0o777 == 0o700
    assert (running.data_dir / "proxy-ca" / "mitmproxy-ca.pem").stat().st_mode & 0o077 == 0


def test_proxy_credentials_from_the_inventory(tmp_path: Path) -> None:
    files = {**FILES, "rules.yaml": RULES.replace("networks: [127.0.0.0/8]", "networks: [10.60.0.0/16]"),
             "devices.csv": "name,addresses,group,credential\ntab-17,,school,tab17:s3cret\n"}
    rules = write_tree(tmp_path, files)
    with Origin(tmp_path) as origin, ProxyProcess(rules, free_port(), origin) as running:
        trust = ("--cacert", str(running.ca_file))
        _, status, body = curl(running.port, "http://roblox.com/", "--proxy-user", "tab17:s3cret", *trust)
        assert status == "403" and "Ce site est bloqué" in body  # identified as tab-17 of the school group
        _, status, body = curl(running.port, "https://www.google.com/search?q=x", "--proxy-user", "tab17:s3cret",
                               *trust)
        assert status == "200" and "safe=active" in body
        for credentials in (("--proxy-user", "tab17:wrong"), ()):
            _, status, _ = curl(running.port, "http://allowed.example/", *credentials, *trust)
            assert status == "407"


def test_the_proxy_serves_its_pac_file_naming_the_address_it_was_reached_at(
        proxy: tuple[ProxyProcess, Origin]) -> None:
    running, _ = proxy
    for path in ("/proxy.pac", "/wpad.dat"):
        result = subprocess.run(["curl", "-sS", "--max-time", "10", "-D", "-",
                                 f"http://127.0.0.1:{running.port}{path}"], capture_output=True, text=True, timeout=30)
        assert "200 OK" in result.stdout and "application/x-ns-proxy-autoconfig" in result.stdout
        assert f'return "PROXY 127.0.0.1:{running.port}";' in result.stdout, "no DIRECT fallback"


def test_a_browser_configured_by_the_pac_file_is_filtered(proxy: tuple[ProxyProcess, Origin],
                                                          tmp_path: Path) -> None:
    running, _ = proxy
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is needed (make test installs Debian's chromium package)"
    # The tablet trusts Vigie's CA (installed by the MDM); here, by the key's fingerprint.
    ca = x509.load_pem_x509_certificate(running.ca_file.read_bytes())
    fingerprint = base64.b64encode(hashlib.sha256(ca.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).digest()).decode()

    def page(url: str) -> str:
        return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               f"--user-data-dir={tmp_path / 'profile'}", "--disable-features=HttpsUpgrades",
                               "--accept-lang=fr-FR", f"--ignore-certificate-errors-spki-list={fingerprint}",
                               f"--proxy-pac-url=http://127.0.0.1:{running.port}/proxy.pac", "--dump-dom", url],
                              capture_output=True, text=True, timeout=90).stdout

    assert "Ce site est bloqué" in page("http://roblox.com/play")
    assert "Ce site est bloqué" in page("https://www.roblox.com/")
    assert '"path": "/hello"' in page("http://allowed.example/hello"), "allowed sites reach the origin"
