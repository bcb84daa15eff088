"""Request size limits enforced before routing, answered with the OpenAI error envelope."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from enclave.errors import envelope


async def _reply(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps(envelope(message, type="invalid_request_error", code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class SizeLimitMiddleware:
    """Refuses header blocks over ``max_header_bytes`` (431) and bodies over ``max_body_bytes`` (413).

    Bodies are counted as they arrive (also when chunked, without Content-Length); an oversized body is
    answered with 413 before the application sees any of it. The refused remainder is read and discarded up to
    a bound (8 MiB or 4x the limit), then the connection is closed.
    """

    def __init__(self, app: ASGIApp, *, max_header_bytes: int, max_body_bytes: int) -> None:
        self.app = app
        self.max_header = max_header_bytes
        self.max_body = max_body_bytes

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
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE") and not length:
            await self.app(scope, receive, send)
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


def limited_httptools_protocol(max_header_bytes: int) -> type:
    """uvicorn's httptools protocol with a cap on the bytes a request may send before its headers end.

    httptools (llhttp) itself buffers header lines without limit, so the ASGI-level check alone would let a
    client make the server hold megabytes of headers; this cuts the connection (with a 431 envelope) as soon as
    the header section grows past ``max_header_bytes``. Pass it as ``uvicorn.Config(http=...)``.
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    body = json.dumps(envelope(f"Request headers are larger than {max_header_bytes} bytes.",
                               type="invalid_request_error", code="headers_too_large")).encode()
    reply = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
             b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        _header_bytes = 0
        _in_headers = True

        def data_received(self, data: bytes) -> None:
            if self._in_headers:
                self._header_bytes += len(data)
            super().data_received(data)
            if self._in_headers and self._header_bytes > max_header_bytes and not self.transport.is_closing():
                self.transport.write(reply)
                self.transport.close()

        def on_headers_complete(self) -> None:
            self._in_headers = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_headers = True
            self._header_bytes = 0

    return LimitedHttpToolsProtocol
