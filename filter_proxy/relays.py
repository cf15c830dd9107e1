"""The protocols that copy an origin's bytes to a client for the proxy's front: `Relay` for a tunnel passed through
(bytes both ways, nothing read), `ResponseRelay` for the responses to plain HTTP requests the front forwarded
(each response's end found, so that the client's next request is read and judged before it is sent).

Both pass back-pressure on: when the transport they write to cannot take more, the other side stops reading.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from filter_proxy.http1 import ChunkedBody, Framing, ResponseHead, error_response, response_head
from policy.metrics import PROXY_ERRORS

log = logging.getLogger(__name__)

MAX_RESPONSE_HEAD = 65_536


class Relay(asyncio.Protocol):
    """One direction of a passed-through tunnel: what arrives on this protocol's transport is written to `peer`.
    Half-closes are passed on; `ended` is called once the connection is gone."""

    def __init__(self, peer: asyncio.Transport) -> None:
        self.peer = peer
        self.ended: Callable[[], None] = lambda: None

    def data_received(self, data: bytes) -> None:
        self.peer.write(data)

    def eof_received(self) -> bool:
        if self.peer.can_write_eof():
            self.peer.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer.close()
        self.ended()

    def pause_writing(self) -> None:
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        self.peer.resume_reading()


class ResponseRelay(asyncio.Protocol):
    """A connection to an origin for a client's plain HTTP requests, one at a time: `expect` before each request is
    sent; the response (interim heads, head, body) is written to `client` as it arrives, and the future `expect`
    returned tells, once the response has ended, whether both connections may carry another request. A response
    that is malformed, or cut before its head, gets the client a 502; one cut in its body ends the client's
    connection (as the origin's would)."""

    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.ended: Callable[[], None] = lambda: None
        self._waiting: asyncio.Future[bool] | None = None
        self._head = b""
        self._response: ResponseHead | None = None
        self._request_was_head = False
        self._left = 0  # of a Content-Length body
        self._chunks = ChunkedBody()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses

    def expect(self, request_was_head: bool) -> asyncio.Future[bool]:
        """Get ready for the response to the request about to be sent."""
        self._waiting = asyncio.get_running_loop().create_future()
        self._head, self._response, self._request_was_head = b"", None, request_was_head
        return self._waiting

    def data_received(self, data: bytes) -> None:
        if self._waiting is None or self._waiting.done() or self.client.is_closing():
            self._close()  # bytes no request asked for, or no one to give them to
            return
        try:
            while data and not self._waiting.done():
                data = self._body(data) if self._response is not None else self._next_head(data)
        except Exception as exc:  # a bug here must not leave the client waiting, or with half a response
            PROXY_ERRORS.labels("forward").inc()
            log.error("proxy forwarding failed, the connection is closed: %s: %s", type(exc).__name__, exc)
            self.client.abort()
            self._finish(False)
            return
        if data:
            self._close()  # more than the response: this connection cannot be trusted with another request

    def _next_head(self, data: bytes) -> bytes:
        """Read a response head from `data`; what follows it."""
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_RESPONSE_HEAD:
                self._fail()
            return b""
        head, rest = self._head[:end + 4], self._head[end + 4:]
        self._head = b""
        response = response_head(head, self._request_was_head)
        if response is None or response.status == 101:  # 101: no request the front sends asks to switch
            self._fail()
            return b""
        self.client.write(head)
        if 100 <= response.status < 200:
            return rest  # an interim response (100, 103): the final head follows
        self._response, self._left, self._chunks = response, response.length, ChunkedBody()
        if response.framing is Framing.NO_BODY or (response.framing is Framing.LENGTH and not self._left):
            self._finish(response.reusable)
        return rest

    def _body(self, data: bytes) -> bytes:
        """Copy the body's part of `data`; what follows the body."""
        assert self._response is not None
        framing = self._response.framing
        if framing is Framing.UNTIL_CLOSE:
            taken = len(data)
        elif framing is Framing.LENGTH:
            taken = min(self._left, len(data))
            self._left -= taken
        else:
            try:
                taken = self._chunks.feed(data)
            except ValueError:
                self.client.abort()  # the client has part of a body it cannot trust: end it as a cut would
                self._finish(False)
                return b""
        self.client.write(data[:taken])
        if (framing is Framing.LENGTH and not self._left) or (framing is Framing.CHUNKED and self._chunks.ended):
            self._finish(self._response.reusable)
        return data[taken:]

    def eof_received(self) -> bool:
        self._origin_ended()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._origin_ended()
        self.ended()

    def _origin_ended(self) -> None:
        if self._waiting is None or self._waiting.done():
            return
        if self._response is None:
            self._fail()
        elif self._response.framing is Framing.UNTIL_CLOSE:
            self._finish(False)
        else:
            self.client.abort()  # cut in its body: the client must see it cut, not a whole response
            self._finish(False)

    def _fail(self) -> None:
        """The origin gave no usable response: 502, and the client's connection ends."""
        self.client.write(error_response("502 Bad Gateway", "the server gave no valid response"))
        self._finish(False)

    def _finish(self, reusable: bool) -> None:
        assert self._waiting is not None
        if not self._waiting.done():
            self._waiting.set_result(reusable)
        if not reusable:
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        pass  # requests are heads only: nothing to hold back

    def resume_writing(self) -> None:
        pass
