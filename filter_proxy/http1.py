"""HTTP/1 heads as the proxy's front reads them: the CONNECT, a plain GET or HEAD in absolute form, the response
to it, and where a chunked body ends. Pure: bytes in, values out, no I/O.

Strict on purpose: what these functions decline (None) is read and judged by mitmproxy instead, so a form that is
unusual, ambiguous or malformed never reaches an origin through the front. A request the front forwards carries
exactly the head that was judged, its request line in origin form, as mitmproxy would send it.
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple

from filter_proxy.addon import normalize_host
from filter_proxy.pac import PAC_PATHS

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a header name (RFC 9110 §5.1)
_FORBIDDEN_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # controls; a lone CR or LF would end a line
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: [^\x00-\x08\x0a-\x1f\x7f]*)?")
MAX_CHUNK_LINE = 4096


class PlainGet(NamedTuple):
    host: str  # normalised
    port: int
    path: str  # as sent
    head_only: bool  # HEAD: the same answer without its body
    keep_alive: bool  # what the client asked for
    accept_language: str | None
    upgrade: bool  # asks to switch protocols (WebSocket): never forwarded by the front
    origin_form: bytes  # the head to send to the origin: the request line in origin form, the headers as received


def plain_get(head: bytes) -> PlainGet | None:
    """A plain HTTP GET or HEAD in absolute form whose Host header names the same host, without body or proxy
    credentials, every header well formed and none repeated; None for anything else (mitmproxy's to judge)."""
    request_line, _, header_block = head[:-4].partition(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD") or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") \
            or not parts[1].startswith(b"http://") or _FORBIDDEN_IN_VALUE.search(parts[1]):
        return None
    authority_bytes, slash, rest = parts[1][7:].partition(b"/")
    authority = authority_bytes.decode("ascii", "replace")
    headers = _headers(header_block)
    if headers is None or headers.get("host", "").lower() != authority.lower() \
            or "proxy-authorization" in headers or "transfer-encoding" in headers \
            or headers.get("content-length", "0") != "0" or "@" in authority:
        return None
    split = authority_parts(authority)
    if split is None:
        return None
    literal, port = split[0], split[1] or 80
    host = normalize_host(literal)
    raw_path = b"/" + rest if slash else b"/"
    path = raw_path.decode("utf-8", "surrogateescape")  # as mitmproxy reads it; URL rules read it percent-decoded
    if host is None or path.split("?", 1)[0] in PAC_PATHS:
        return None  # a PAC is served whatever the host's decision: one that fails to load means DIRECT
    keep_alive = parts[2] == b"HTTP/1.1" and "close" not in _tokens(headers.get("connection", ""))
    origin_form = b"%s %s %s\r\n%s\r\n\r\n" % (parts[0], raw_path, parts[2], header_block)
    return PlainGet(host, port, path, parts[0] == b"HEAD", keep_alive, headers.get("accept-language"),
                    "upgrade" in headers or "upgrade" in _tokens(headers.get("connection", "")), origin_form)


def connect_target(head: bytes) -> tuple[str, int] | None:
    """(host, port) of a `CONNECT host:port HTTP/1.x` head without proxy credentials; None for anything else."""
    request_line, _, headers = head.partition(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or parts[0] != b"CONNECT" or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    if b"\nproxy-authorization:" in b"\n" + headers.lower():
        return None  # mitmproxy checks the credentials
    split = authority_parts(parts[1].decode("ascii", "replace"))
    if split is None or split[1] is None:
        return None
    return split[0], split[1]


def authority_parts(text: str) -> tuple[str, int | None] | None:
    """`host`, `host:port`, `[v6]` or `[v6]:port` → (the host without brackets, the port or None); None when what
    follows the host is not a port."""
    if text.startswith("["):
        host, _, after = text[1:].partition("]")
        if after and not after.startswith(":"):
            return None
        port = after[1:]
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not port:
        return host, None
    return (host, int(port)) if port.isdigit() and 0 < int(port) < 65536 else None


def error_response(status: str, text: str) -> bytes:
    """A short plain-text answer of the front's own (`status`: `502 Bad Gateway`) that ends the connection."""
    body = f"{text}\n".encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode() + body


class Framing(enum.Enum):
    """Where a response's body ends (RFC 9112 §6.3)."""

    NO_BODY = "the head is the whole response"
    LENGTH = "after Content-Length bytes"
    CHUNKED = "at the chunked encoding's last chunk and trailers"
    UNTIL_CLOSE = "when the server closes the connection"


class ResponseHead(NamedTuple):
    status: int
    framing: Framing
    length: int  # for Framing.LENGTH
    reusable: bool  # the server keeps the connection open after this response


def response_head(head: bytes, request_was_head: bool) -> ResponseHead | None:
    """How a response to a GET (or HEAD) is framed; None when its head is malformed or ambiguous (several
    different Content-Lengths, a repeated or unknown Transfer-Encoding): the client then gets 502."""
    status_line, _, header_block = head[:-4].partition(b"\r\n")
    matched = _STATUS_LINE.fullmatch(status_line)
    headers = _headers(header_block, repeats=True) if matched else None
    if matched is None or headers is None:
        return None
    minor, status = matched.group(1), int(matched.group(2))
    connection = _tokens(headers.get("connection", ""))
    reusable = "close" not in connection and (minor == b"1" or "keep-alive" in connection)
    lengths = {value.strip() for value in headers.get("content-length", "").split(",")} - {""}
    if request_was_head or status < 200 or status in (204, 304):
        return ResponseHead(status, Framing.NO_BODY, 0, reusable)
    if "transfer-encoding" in headers:
        if _tokens(headers["transfer-encoding"]) != ["chunked"] or minor == b"0":
            return None
        return ResponseHead(status, Framing.CHUNKED, 0, reusable)
    if lengths:
        if len(lengths) != 1 or not (length := lengths.pop()).isdigit() or len(length) > 18:
            return None
        return ResponseHead(status, Framing.LENGTH, int(length), reusable)
    return ResponseHead(status, Framing.UNTIL_CLOSE, 0, False)


class ChunkedBody:
    """Finds where a chunked body ends as its bytes arrive, without decoding it (the bytes are relayed as they
    are). `feed` returns how many of the given bytes belong to the body, or raises ValueError on a malformed one."""

    def __init__(self) -> None:
        self._line = b""  # a line not yet ended: a chunk size, the CRLF after a chunk's data, a trailer
        self._data_left = 0  # bytes of the current chunk's data
        self._after_data = False  # the next line is the empty one that ends a chunk's data
        self._in_trailers = False
        self.ended = False

    def feed(self, data: bytes) -> int:
        position = 0
        while position < len(data) and not self.ended:
            if self._data_left:
                taken = min(self._data_left, len(data) - position)
                self._data_left -= taken
                position += taken
                continue
            end = data.find(b"\n", position)
            self._line += data[position:len(data) if end < 0 else end + 1]
            if len(self._line) > MAX_CHUNK_LINE:
                raise ValueError("chunk line too long")
            if end < 0:
                return len(data)
            position = end + 1
            line, self._line = self._line, b""
            if not line.endswith(b"\r\n"):
                raise ValueError("chunk line not ended by CRLF")
            self._line_ended(line[:-2])
        return position

    def _line_ended(self, line: bytes) -> None:
        if self._after_data:
            if line:
                raise ValueError("chunk data longer than its size")
            self._after_data = False
        elif self._in_trailers:
            if line and not (_TOKEN.match(line) and b":" in line):
                raise ValueError("malformed trailer")
            self.ended = not line
        else:
            size = line.split(b";", 1)[0].strip(b" \t")
            if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                raise ValueError("malformed chunk size")
            self._data_left = int(size, 16)
            self._after_data = self._data_left > 0
            self._in_trailers = self._data_left == 0


def _headers(block: bytes, repeats: bool = False) -> dict[str, str] | None:
    """A head's fields by lower-case name, or None when one is malformed or (unless `repeats`) repeated. Repeated
    fields are joined with a comma, as RFC 9110 §5.3 reads them."""
    headers: dict[str, str] = {}
    if not block:
        return headers
    for line in block.split(b"\r\n"):
        name, separator, value = line.partition(b":")
        if not separator or not _TOKEN.fullmatch(name) or _FORBIDDEN_IN_VALUE.search(value):
            return None
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if not repeats:
                return None
            text = f"{headers[key]}, {text}"
        headers[key] = text
    return headers


def _tokens(value: str) -> list[str]:
    """A comma-separated header value's tokens, lower case."""
    return [token.strip().lower() for token in value.split(",") if token.strip()]
