"""Request size limits enforced before routing, answered with the OpenAI error envelope."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from enclave.config import LimitSettings
from enclave.errors import envelope


async def _reply(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps(envelope(message, type="invalid_request_error", code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


BeforeBody = Callable[[Scope], Awaitable[Response | None]]


class SizeLimitMiddleware:
    """Refuses header blocks over ``max_header_bytes`` (431) and bodies over ``max_body_bytes`` (413).

    Bodies are counted as they arrive (also when chunked, without Content-Length); an oversized body is
    answered with 413 before the application sees any of it. The refused remainder is read and discarded up to
    a bound (8 MiB or 4x the limit), then the connection is closed.

    ``before_body`` runs on the headers alone of every request that carries a body (Content-Length above 0 or
    Transfer-Encoding, whatever the method), before any body byte is read or buffered: a response it returns
    (e.g. 401 for a missing or bad PAT) is sent at once and the connection closed, the body left unread, so
    unauthenticated clients cannot make the server hold their bodies. A request without a body goes straight
    to the application.
    """

    def __init__(self, app: ASGIApp, *, max_header_bytes: int, max_body_bytes: int,
                 before_body: BeforeBody | None = None) -> None:
        self.app = app
        self.max_header = max_header_bytes
        self.max_body = max_body_bytes
        self.before_body = before_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        if sum(len(k) + len(v) + 4 for k, v in headers) > self.max_header:
            await _reply(send, 431, f"Request headers are larger than {self.max_header} bytes.", "headers_too_large")
            return
        length = None
        for k, v in headers:
            if k == b"content-length":
                try:
                    length = int(v)
                except ValueError:
                    await _reply(send, 400, "Invalid Content-Length header.", "invalid_content_length")
                    return
        if length is not None and length > self.max_body:
            await self._drain(receive, 0)
            await _reply(send, 413, f"Request body is larger than {self.max_body} bytes.", "body_too_large")
            return
        if not length and not any(k == b"transfer-encoding" for k, _ in headers):
            await self.app(scope, receive, send)  # no body is coming (HTTP/1.1): nothing to bound or buffer
            return
        if self.before_body is not None:
            refusal = await self.before_body(scope)
            if refusal is not None:
                refusal.headers["connection"] = "close"
                await refusal(scope, receive, send)
                return
        # Read the whole (bounded) body first, then replay it to the app.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                if message.get("more_body", False):
                    await self._drain(receive, size)
                await _reply(send, 413, f"Request body is larger than {self.max_body} bytes.", "body_too_large")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _drain(self, receive: Receive, already: int) -> None:
        """Read and discard the rest of a refused body (bounded), so the client, which sends the whole body
        before reading, sees the 413 instead of a reset connection."""
        budget = max(8 * 1024 * 1024, 4 * self.max_body) - already
        while budget > 0:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            budget -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return


CLOSE_LINGER_SECONDS = 1.0  # time for a refusal to reach the client before its connection is aborted


def _raw_reply(status: str, message: str, code: str, type_: str = "invalid_request_error") -> bytes:
    """A complete HTTP/1.1 error response (OpenAI envelope) that closes the connection."""
    body = json.dumps(envelope(message, type=type_, code=code)).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def limited_httptools_protocol(max_header_bytes: int, *, header_timeout: float | None = None,
                               body_timeout: float | None = None, max_connections: int | None = None) -> type:
    """uvicorn's httptools protocol with the limits a slow or greedy client must not get past.

    * the bytes a request may send before its headers end: httptools (llhttp) itself buffers header lines
      without limit, so the ASGI-level check alone would let a client make the server hold megabytes of
      headers; the connection is cut (431) as soon as the header section grows past ``max_header_bytes``;
    * ``header_timeout``: from the connection's start (after the TLS handshake) or a request's first byte, the
      whole header section must arrive within it (408), however slowly it trickles (slowloris);
    * ``body_timeout``: the whole body must arrive within it after the headers, or the connection is closed;
    * ``max_connections``: open connections beyond it are answered 503 and closed at once, which bounds how
      many requests run (one per connection) and how much they can buffer.

    Pass it as ``uvicorn.Config(http=...)`` (through enclave.tls.uvicorn_config).
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    too_large = _raw_reply("431 Request Header Fields Too Large",
                           f"Request headers are larger than {max_header_bytes} bytes.", "headers_too_large")
    too_slow = _raw_reply("408 Request Timeout", f"Request headers did not arrive within {header_timeout} s.",
                          "request_timeout")
    too_many = _raw_reply("503 Service Unavailable", "Too many open connections; retry later.",
                          "server_busy", "server_error")

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        _header_bytes = 0
        _in_headers = True
        _deadline: asyncio.TimerHandle | None = None
        _closing = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if max_connections is not None and len(self.connections) > max_connections:
                self._refuse(too_many)
                return
            self._arm(header_timeout, self._headers_late)

        def connection_lost(self, exc: Exception | None) -> None:
            self._arm(None, None)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._in_headers:
                self._header_bytes += len(data)
            super().data_received(data)
            if self._in_headers and self._header_bytes > max_header_bytes:
                self._refuse(too_large)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._deadline is None:  # a request's first byte; the connection's first keeps its deadline
                self._arm(header_timeout, self._headers_late)

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._arm(body_timeout, self._body_late)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._arm(None, None)
            super().on_message_complete()
            self._in_headers = True
            self._header_bytes = 0

        def _arm(self, timeout: float | None, handler: Callable[[], None] | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            if timeout is not None and handler is not None:
                self._deadline = self.loop.call_later(timeout, handler)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing() and not self._in_headers:  # answered before its body ended
                self._close()

        def _headers_late(self) -> None:
            self._deadline = None
            if self.cycle is not None and not self.cycle.response_complete:
                self._close()  # a response is being written: no room for another one
            else:
                self._refuse(too_slow)

        def _body_late(self) -> None:
            self._deadline = None
            self._close()  # the application sees http.disconnect

        def _refuse(self, reply: bytes) -> None:
            self._arm(None, None)
            if not self.transport.is_closing():
                self.transport.write(reply)
            self._close()

        def _close(self) -> None:
            """Close now, and abort after a short linger: asyncio's TLS shutdown otherwise waits up to 30 s for
            the peer's close_notify, taking in whatever the peer still sends meanwhile."""
            if self._closing:
                return
            self._closing = True
            self.transport.close()
            self.loop.call_later(CLOSE_LINGER_SECONDS, self.transport.abort)

    return LimitedHttpToolsProtocol


def http_protocol_for(limits: LimitSettings) -> type:
    """The limited protocol as configured (``limits:`` in enclave.yaml). The raw header cap is 4x the
    configured total: it bounds what llhttp buffers, the exact check is SizeLimitMiddleware's."""
    return limited_httptools_protocol(4 * limits.max_header_bytes, header_timeout=limits.header_timeout_seconds,
                                      body_timeout=limits.body_timeout_seconds, max_connections=limits.max_connections)
