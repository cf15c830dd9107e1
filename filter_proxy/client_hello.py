"""The TLS name (SNI) of a tunnel's first bytes, read by the proxy's front before it passes the tunnel through.

Pure and strict: the front passes a tunnel through only when its ClientHello names the CONNECT host or none; any
form this reader does not take whole (not TLS, malformed, several names, a name that is no host name) is REFUSED,
and the front then hands the connection to mitmproxy, which intercepts it and decides every request on its own.
Reads the records and fields it needs and nothing else (mitmproxy's full parser cost a tenth of a new tunnel).
"""

from __future__ import annotations

import enum
from typing import NamedTuple

HANDSHAKE = 0x16
CLIENT_HELLO = 0x01
SERVER_NAME = 0x0000
MAX_RECORD = 16_384 + 2_048  # RFC 8446 §5.2: a TLSCiphertext's largest


class State(enum.Enum):
    MORE = "the ClientHello has not all arrived"
    READ = "a whole ClientHello"
    REFUSED = "not a ClientHello the front passes through"


class Hello(NamedTuple):
    state: State
    server_name: str | None = None  # READ: the name it asks for, None when it asks for none


MORE = Hello(State.MORE)
REFUSED = Hello(State.REFUSED)


def read_client_hello(data: bytes) -> Hello:
    """The ClientHello at the start of `data` (a client's first bytes in a tunnel), across TLS records."""
    message = bytearray()
    position = 0
    while True:
        if len(data) - position < 5:
            return MORE if _could_start_a_record(data[position:]) else REFUSED
        if data[position] != HANDSHAKE or data[position + 1] != 0x03:
            return REFUSED
        length = int.from_bytes(data[position + 3:position + 5])
        if not 0 < length <= MAX_RECORD:
            return REFUSED
        if len(data) - position - 5 < length:
            return MORE
        message += data[position + 5:position + 5 + length]
        position += 5 + length
        if len(message) >= 4:
            if message[0] != CLIENT_HELLO:
                return REFUSED
            size = int.from_bytes(message[1:4]) + 4
            if len(message) >= size:
                return _read_body(bytes(message[4:size]))


def _could_start_a_record(data: bytes) -> bool:
    return data[:1] in (b"", bytes([HANDSHAKE])) and data[1:2] in (b"", b"\x03")


def _read_body(body: bytes) -> Hello:
    """The fields of a ClientHello's body (RFC 8446 §4.1.2) up to its extensions, then the server name."""
    reader = _Reader(body)
    try:
        reader.skip(2 + 32)  # legacy_version, random
        reader.skip(reader.number(1))  # legacy_session_id
        reader.skip(reader.number(2))  # cipher_suites
        reader.skip(reader.number(1))  # legacy_compression_methods
        if reader.at_end():
            return Hello(State.READ)  # no extensions at all
        extensions = _Reader(reader.take(reader.number(2)))
        if not reader.at_end():
            return REFUSED
        names = []
        seen: set[int] = set()
        while not extensions.at_end():
            kind, content = extensions.number(2), extensions.take(extensions.number(2))
            if kind in seen:
                return REFUSED  # a repeated extension (RFC 8446 §4.2): servers differ on which they read
            seen.add(kind)
            if kind == SERVER_NAME:
                names = _server_names(content)
    except ValueError:
        return REFUSED
    if len(names) > 1:
        return REFUSED  # one name of a type at most (RFC 6066 §3); which one would the server take?
    if names:
        return Hello(State.READ, names[0])
    return Hello(State.READ) if SERVER_NAME not in seen else REFUSED  # an empty list


def _server_names(content: bytes) -> list[str]:
    """The host names of a server_name extension (RFC 6066 §3); ValueError when it is malformed or names
    anything that is not an ASCII host name."""
    outer = _Reader(content)
    entries = _Reader(outer.take(outer.number(2)))
    if not outer.at_end():
        raise ValueError("bytes after the server name list")
    names = []
    while not entries.at_end():
        if entries.number(1) != 0:
            raise ValueError("a server name that is not a host name")
        name = entries.take(entries.number(2))
        if not name or any(byte <= 0x20 or byte >= 0x7F for byte in name):
            raise ValueError("a host name with bytes no host name has")
        names.append(name.decode("ascii"))
    return names


class _Reader:
    """Big-endian numbers and length-prefixed fields from bytes; ValueError past the end."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._position = 0

    def take(self, count: int) -> bytes:
        end = self._position + count
        if end > len(self._data):
            raise ValueError("a field longer than what holds it")
        field, self._position = self._data[self._position:end], end
        return field

    def skip(self, count: int) -> None:
        self.take(count)

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size))

    def at_end(self) -> bool:
        return self._position == len(self._data)
