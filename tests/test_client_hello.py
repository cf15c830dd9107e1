"""The TLS name the proxy's front reads from a tunnel's first bytes (`filter_proxy/client_hello.py`): the same as
mitmproxy's parser on real ClientHellos, across records and pieces, and REFUSED (mitmproxy intercepts) for every
form a server could read another way."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.proxy.layers.tls import parse_client_hello

from filter_proxy.client_hello import MORE, REFUSED, Hello, State, read_client_hello
from tests.proxy_servers import client_hello

LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20).filter(
    lambda label: not label.startswith("-") and not label.endswith("-"))
HOST = st.lists(LABEL, min_size=2, max_size=4).map(".".join).filter(
    lambda host: host.rpartition(".")[2][0].isalpha())  # a name, not an address: clients send no TLS name for those


def record(payload: bytes) -> bytes:
    return b"\x16\x03\x01" + len(payload).to_bytes(2) + payload


def hello_with(extensions: list[tuple[int, bytes]], *, message_type: int = 1) -> bytes:
    """A ClientHello made by hand: TLS 1.2 fields, one cipher suite, the given extensions."""
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    block = b"".join(kind.to_bytes(2) + len(content).to_bytes(2) + content for kind, content in extensions)
    body += len(block).to_bytes(2) + block
    return record(bytes([message_type]) + len(body).to_bytes(3) + body)


def server_name(*names: bytes, name_type: int = 0) -> tuple[int, bytes]:
    entries = b"".join(bytes([name_type]) + len(name).to_bytes(2) + name for name in names)
    return 0, len(entries).to_bytes(2) + entries


@given(HOST)
def test_the_name_is_the_one_mitmproxy_reads(host: str) -> None:
    data = client_hello(host)
    parsed = parse_client_hello(data)
    assert parsed is not None and read_client_hello(data) == Hello(State.READ, parsed.sni) == Hello(State.READ, host)


def test_a_hello_without_a_name() -> None:
    assert read_client_hello(client_hello(None)) == Hello(State.READ, None)


def test_every_piece_short_of_the_whole_hello_asks_for_more() -> None:
    data = client_hello("example.fr")
    assert all(read_client_hello(data[:end]) is MORE for end in range(len(data)))
    assert read_client_hello(data + b"application data") == Hello(State.READ, "example.fr")


def test_a_hello_across_several_records() -> None:
    """Post-quantum key shares make ClientHellos long; a client may split one into records anywhere."""
    message = client_hello("example.fr")[5:]
    pieces = [message[start:start + 100] for start in range(0, len(message), 100)]
    assert read_client_hello(b"".join(record(piece) for piece in pieces)) == Hello(State.READ, "example.fr")


@pytest.mark.parametrize("data", [
    hello_with([server_name(b"allowed.fr", b"roblox.com")]),
    hello_with([server_name(b"allowed.fr"), server_name(b"roblox.com")]),
    hello_with([server_name(b"roblox.com", name_type=1)]),
    hello_with([server_name(b"roblox.com\x00.allowed.fr")]),
    hello_with([server_name(b"roblox com")]),
    hello_with([server_name(b"")]),
    hello_with([server_name()]),
    hello_with([(0, b"\x00\x0e\x00\x00\x0aroblox.com")]),  # the list says longer than it is
    hello_with([server_name(b"allowed.fr")], message_type=2),
    hello_with([server_name(b"allowed.fr")])[:-3] + b"\x00\x00\x05",
    b"GET / HTTP/1.1\r\nHost: allowed.fr\r\n\r\n",
    b"\x17\x03\x03\x00\x05hello",
    b"\x16\x03\x01\x00\x00",
    b"\x16\x02\x00\x00\x05",
], ids=["two names", "two name extensions", "a name that is no host name", "NUL in the name", "space in the name",
        "empty name", "empty list", "a list longer than its extension", "a ServerHello", "fields past the end",
        "plain HTTP", "application data", "an empty record", "SSL 2"])
def test_forms_a_server_could_read_another_way_are_refused(data: bytes) -> None:
    assert read_client_hello(data) is REFUSED


@given(st.binary(max_size=400))
def test_any_bytes_are_read_or_refused_or_need_more(data: bytes) -> None:
    hello = read_client_hello(data)
    if hello.state is State.READ:
        assert_mitmproxy_reads(data, hello.server_name)


def assert_mitmproxy_reads(data: bytes, name: str | None) -> None:
    """mitmproxy's parser reads the same name, or refuses the hello for an extension the front does not read
    (an empty ALPN list): a ClientHello the server will refuse too."""
    try:
        parsed = parse_client_hello(data)
    except ValueError:
        return
    assert parsed is not None and parsed.sni == name


@given(st.lists(st.tuples(st.integers(min_value=0, max_value=70), st.binary(max_size=30)), max_size=5), HOST)
def test_a_hand_made_hello_reads_as_mitmproxy_reads_it(extensions: list[tuple[int, bytes]], host: str) -> None:
    """Whatever other extensions come with it: when the front reads a name, mitmproxy reads the same."""
    data = hello_with([*[(kind, content) for kind, content in extensions if kind != 0], server_name(host.encode())])
    hello = read_client_hello(data)
    if hello.state is State.READ:
        assert hello.server_name == host
        assert_mitmproxy_reads(data, host)
