"""The HTTP/1 heads the proxy's front reads (`filter_proxy/http1.py`): what it takes, what it leaves to mitmproxy,
how a response is framed, and where a chunked body ends however its bytes are cut."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from filter_proxy.http1 import ChunkedBody, Framing, plain_get, response_head


@pytest.mark.parametrize("head, host, port, path, keep_alive", [
    (b"GET http://Example.FR/a%20b?q=1 HTTP/1.1\r\nHost: example.fr\r\n\r\n", "example.fr", 80, "/a%20b?q=1", True),
    (b"HEAD http://example.fr:8080 HTTP/1.0\r\nHost: example.fr:8080\r\n\r\n", "example.fr", 8080, "/", False),
    (b"GET http://[::1]:81/ HTTP/1.1\r\nHost: [::1]:81\r\nConnection: keep-alive, close\r\n\r\n", "::1", 81, "/",
     False),
    (b"GET http://2130706433/ HTTP/1.1\r\nHost: 2130706433\r\n\r\n", "127.0.0.1", 80, "/", True),
    ("GET http://example.fr/élève HTTP/1.1\r\nHost: example.fr\r\n\r\n".encode(), "example.fr", 80, "/élève",
     True),
], ids=["mixed case host", "HEAD, HTTP/1.0, no path", "IPv6 and close", "an address spelled as a number",
        "UTF-8 in the path"])
def test_the_plain_requests_the_front_reads(head: bytes, host: str, port: int, path: str, keep_alive: bool) -> None:
    request = plain_get(head)
    assert request is not None
    assert (request.host, request.port, request.path, request.keep_alive) == (host, port, path, keep_alive)
    line, _, rest = head.partition(b"\r\n")
    method, _, version = line.split(b" ")
    assert request.origin_form == method + b" " + path.encode() + b" " + version + b"\r\n" + rest  # as sent


@pytest.mark.parametrize("head", [
    b"POST http://example.fr/ HTTP/1.1\r\nHost: example.fr\r\nContent-Length: 0\r\n\r\n",
    b"GET /relative HTTP/1.1\r\nHost: example.fr\r\n\r\n",
    b"GET https://example.fr/ HTTP/1.1\r\nHost: example.fr\r\n\r\n",
    b"GET http://example.fr/ HTTP/2\r\nHost: example.fr\r\n\r\n",
    b"GET http://example.fr/ HTTP/1.1\r\nHost: other.fr\r\n\r\n",
    b"GET http://example.fr/ HTTP/1.1\r\n\r\n",
    b"GET http://example.fr/ HTTP/1.1\r\nHost: example.fr\r\nHost: example.fr\r\n\r\n",
    b"GET http://example.fr/ HTTP/1.1\r\nHost: example.fr\r\nProxy-Authorization: Basic eDp5\r\n\r\n",
    b"GET http://example.fr/ HTTP/1.1\r\nHost: example.fr\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET http://example.fr/ HTTP/1.1\r\nHost: example.fr\r\nContent-Length: 3\r\n\r\n",
    b"GET http://example.fr/ HTTP/1.1\r\nHost: example.fr\r\nX: 1\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET http://example.fr/ HTTP/1.1\r\nHost: example.fr\r\nX: 1\rY: 2\r\n\r\n",
    b"GET http://example.fr/ HTTP/1.1\r\nHost: example.fr\r\n\tfolded\r\n\r\n",
    b"GET http://example.fr/ HTTP/1.1\r\nHost : example.fr\r\n\r\n",
    b"GET http://example.fr/\x01 HTTP/1.1\r\nHost: example.fr\r\n\r\n",
    b"GET http://user@example.fr/ HTTP/1.1\r\nHost: user@example.fr\r\n\r\n",
    b"GET http://example.fr:0/ HTTP/1.1\r\nHost: example.fr:0\r\n\r\n",
    b"GET http://example.fr/proxy.pac HTTP/1.1\r\nHost: example.fr\r\n\r\n",
    b"GET  http://example.fr/ HTTP/1.1\r\nHost: example.fr\r\n\r\n",
], ids=["a method with a body", "origin form", "https in plain", "HTTP/2", "another Host", "no Host",
        "repeated Host", "proxy credentials", "chunked body", "a body", "bare LF", "bare CR", "folded line",
        "space before the colon", "control in the target", "user info", "port 0", "a PAC path", "two spaces"])
def test_what_the_front_leaves_to_mitmproxy(head: bytes) -> None:
    assert plain_get(head) is None


def test_an_upgrade_is_read_but_marked() -> None:
    request = plain_get(b"GET http://example.fr/ws HTTP/1.1\r\nHost: example.fr\r\nConnection: Upgrade\r\n"
                        b"Upgrade: websocket\r\n\r\n")
    assert request is not None and request.upgrade


@given(st.binary(max_size=300))
@example(b"[/ HTTP/1.1\r\nHost: [")
@example(b"a:99999/ HTTP/1.1\r\nHost: a:99999")
@example(b"a/\xff\xfe HTTP/1.1\r\nHost: a")
def test_any_head_is_read_or_declined(data: bytes) -> None:
    """`GET http://` then anything: read, with one head in origin form that says what was judged, or declined."""
    head = b"GET http://" + data + b"\r\n\r\n"
    request = plain_get(head)
    if request is not None:
        assert b"\r\n\r\n" not in request.origin_form[:-4] and request.origin_form.startswith(b"GET /")
        assert request.origin_form.split(b" ")[1].decode("utf-8", "surrogateescape") == request.path


@pytest.mark.parametrize("head, was_head, framing, length, reusable", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", False, Framing.LENGTH, 12, True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 12, 12\r\n\r\n", False, Framing.LENGTH, 12, True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", False, Framing.CHUNKED, 0,
     True),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n", False, Framing.LENGTH, 1, False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", False, Framing.LENGTH, 1, False),
    (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\n", False, Framing.LENGTH, 1, True),
    (b"HTTP/1.1 200 OK\r\n\r\n", False, Framing.UNTIL_CLOSE, 0, False),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", False, None, 0, False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", True, Framing.NO_BODY, 0, True),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", False, Framing.NO_BODY, 0, True),
    (b"HTTP/1.1 100 Continue\r\n\r\n", False, Framing.NO_BODY, 0, True),
    (b"HTTP/1.1 200\r\n\r\n", False, Framing.UNTIL_CLOSE, 0, False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", False, None, 0, False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n", False, None, 0, False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n", False, None, 0, False),
    (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", False, None, 0, False),
    (b"HTTP/2 200 OK\r\n\r\n", False, None, 0, False),
    (b"HTTP/1.1 2000 OK\r\n\r\n", False, None, 0, False),
], ids=["length", "a repeated equal length", "chunked wins over a length", "close", "HTTP/1.0", "1.0 keep-alive",
        "until close", "an unknown coding", "answer to HEAD", "304", "interim", "no reason phrase",
        "two lengths", "a signed length", "a huge length", "chunked in HTTP/1.0", "HTTP/2", "four-digit status"])
def test_how_a_response_is_framed(head: bytes, was_head: bool, framing: Framing | None, length: int,
                                  reusable: bool) -> None:
    response = response_head(head, was_head)
    if framing is None:
        assert response is None
    else:
        assert response is not None and (response.framing, response.length, response.reusable) == (
            framing, length, reusable)


def chunked(chunks: list[bytes], trailers: list[bytes]) -> bytes:
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks if chunk)
    return body + b"0\r\n" + b"".join(trailer + b"\r\n" for trailer in trailers) + b"\r\n"


@given(st.lists(st.binary(max_size=40), max_size=6),
       st.lists(st.sampled_from([b"Expires: 0", b"X-Checksum: abc"]), max_size=2),
       st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=60),
       st.binary(max_size=20))
def test_a_chunked_body_ends_where_it_ends_however_it_is_cut(chunks: list[bytes], trailers: list[bytes],
                                                             cuts: list[int], after: bytes) -> None:
    body = chunked(chunks, trailers)
    stream, reader, taken, position = body + after, ChunkedBody(), 0, 0
    for size in cuts * (len(stream) // sum(cuts) + 1):
        piece = stream[position:position + size]
        position += size
        taken += reader.feed(piece)
        if reader.ended:
            break
    assert reader.ended and taken == len(body)


@pytest.mark.parametrize("body", [
    b"5\r\nhello!\r\n0\r\n\r\n", b"g\r\n", b"5\nhello\r\n", b"-1\r\n", b"0\r\nbad trailer\r\n\r\n",
    b"1" * 5000, b"11111111111111111\r\n",
], ids=["data past its size", "not hex", "bare LF", "negative", "malformed trailer", "endless size line",
        "a size over 16 digits"])
def test_a_malformed_chunked_body_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        ChunkedBody().feed(body)


@given(st.binary(max_size=200))
def test_any_bytes_are_a_body_or_a_value_error(data: bytes) -> None:
    reader = ChunkedBody()
    with contextlib.suppress(ValueError):
        assert 0 <= reader.feed(data) <= len(data)
