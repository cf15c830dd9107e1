"""The proxy fails closed: when deciding raises, the flow is blocked, never let through.

A real mitmproxy (Vigie's `start_proxy`, in this process so that the fault can be put in its way) in front of the
real local origin; curl as the client. The fault is the state view's provider failing, which every decision
reads: the same path an engine bug would take.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from filter_proxy.addon import VigieAddon
from filter_proxy.ca import ensure_ca
from policy.metrics import PROXY_ERRORS
from policy.snapshot import ListCache
from policy.state import EMPTY_STATE, StateView
from tests.conftest import REPO, free_port, write_tree
from tests.proxy_servers import Origin, allow_origin, curl, proxy_in_this_process
from tests.test_proxy_end_to_end import FILES
from vigie.loading import load_snapshot


class FailingState:
    """A state provider that works until told to fail."""

    def __init__(self) -> None:
        self.failing = False

    def __call__(self) -> StateView:
        if self.failing:
            raise RuntimeError("the state view is gone")
        return EMPTY_STATE


@pytest.fixture
def running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, FailingState, Path]]:
    with Origin(tmp_path) as origin:
        rules = write_tree(tmp_path, FILES)
        allow_origin(rules, origin)
        snapshot = load_snapshot(rules, ListCache()).snapshot
        monkeypatch.setenv("VIGIE_TEST_ORIGIN_HTTP", str(origin.http.server_port))
        monkeypatch.setenv("VIGIE_TEST_ORIGIN_HTTPS", str(origin.https.server_port))
        state = FailingState()
        addon = VigieAddon(lambda: snapshot, state)
        ca = ensure_ca(tmp_path / "var")
        port = free_port()
        proxy = proxy_in_this_process(addon, port, ca.confdir, (
            f"scripts={REPO / 'tests' / 'proxy_origin_map.py'}", f"ssl_verify_upstream_trusted_ca={origin.ca_file}"))
        # Trusted by the client: the origin's CA (a passed-through connection) and Vigie's (an intercepted one).
        bundle = tmp_path / "both-cas.pem"
        bundle.write_bytes(origin.ca_file.read_bytes() + ca.pem.read_bytes())
        with proxy:
            yield port, state, bundle


def errors(hook: str) -> float:
    return PROXY_ERRORS.labels(hook)._value.get()


def test_a_failing_decision_blocks_plain_http_and_https(running: tuple[int, FailingState, Path],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    port, state, ca = running
    assert curl(port, "http://allowed.example/")[1] == "200", "the origin answers while deciding works"
    assert curl(port, "https://allowed.example/", "--cacert", str(ca))[1] == "200"
    state.failing = True
    before = errors("requestheaders")
    with caplog.at_level(logging.ERROR, logger="filter_proxy.addon"):
        code, status, body = curl(port, "http://allowed.example/")
    assert status == "403" and "could not" in body, (code, status, body[:200])
    assert errors("requestheaders") == before + 1
    assert [r.message for r in caplog.records if r.levelno == logging.ERROR] == [
        "proxy requestheaders failed, the flow is blocked: RuntimeError: the state view is gone"]
    # HTTPS: the CONNECT is refused before any TLS.
    before = errors("http_connect")
    code, status, body = curl(port, "https://allowed.example/", "--cacert", str(ca))
    assert code == 56 and "CONNECT tunnel failed, response 403" in body, (code, status, body[:200])
    assert errors("http_connect") == before + 1
