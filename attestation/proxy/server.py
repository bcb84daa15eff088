"""The proxy's client side: an HTTP/1.1 server on asyncio streams, parsed with h11, one task per connection.

Each request is read whole (bounded: 413 beyond ``max_body_bytes``, 431 for oversized headers, 400 for bad
HTTP), sent upstream through :class:`~attestation.proxy.forward.Upstream`, and the response is streamed back
as it arrives: each upstream chunk is written and drained at once (chunked transfer when the upstream sent no
length), so SSE events and NDJSON lines reach the client one by one. While a response streams, the client's
side is watched: the client going away cancels the relay, which closes the upstream response and its
connection, so the enclave sees the cancellation at once. Connections are kept alive between requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import h11
import httpx

from .access import AccessRules
from .envelope import ProxyError, bad_request
from .forward import Upstream, end_to_end_headers

log = logging.getLogger("cube.proxy")

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class Limits:
    """What one client connection may take: body and header sizes, and how long it may keep us waiting."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_header_bytes: int = 64 * 1024
    header_timeout: float = 30.0      # for a request's head, once its first byte arrived
    body_timeout: float = 120.0       # for the whole body after the head
    keep_alive_timeout: float = 300.0  # an idle keep-alive connection is closed after this
    max_connections: int = 128        # open client connections; beyond, 503 and close (file descriptors)


class _ClientGone(Exception):
    """The client closed its connection (or its socket failed) before the exchange finished."""


class ProxyServer:
    """Serves local clients on a listening socket and relays each request to ``upstream``."""

    def __init__(self, upstream: Upstream, limits: Limits = Limits(), access: AccessRules = AccessRules()) -> None:
        self.upstream = upstream
        self.limits = limits
        self.access = access
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (port 0: any free one); returns the address actually bound."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=READ_SIZE)
        bound = self._server.sockets[0].getsockname()
        self.port = bound[1]
        return bound[0], bound[1]

    async def close(self) -> None:
        """Stop listening, cancel every open connection (their upstream responses close with them)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            connection = _Connection(self, reader, writer)
            if len(self._connections) > self.limits.max_connections:
                await connection.refuse(ProxyError(503, "too_many_connections", "the proxy has too many open "
                                                   "connections; retry later", close=True))
            else:
                await connection.run()
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass


class _Connection:
    """One client connection: a loop of request, upstream exchange, streamed response."""

    def __init__(self, proxy: ProxyServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.limits = proxy.limits
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        self.must_close = False

    async def run(self) -> None:
        while not self.must_close:
            try:
                served = await self._exchange()
            except _ClientGone:
                return
            if not served or self.must_close or h11.MUST_CLOSE in (self.conn.our_state, self.conn.their_state):
                return
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:  # not both sides DONE (e.g. an aborted response)
                return

    async def refuse(self, error: ProxyError) -> None:
        """Answer ``error`` without reading a request (over the connection cap), then close."""
        try:
            await self._send_error(error)
        except _ClientGone:
            pass

    # -- reading ------------------------------------------------------------------------------------
    async def _receive(self, timeout: float) -> None:
        if self.conn.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        try:
            data = await asyncio.wait_for(self.reader.read(READ_SIZE), timeout)
        except (ConnectionError, OSError):
            raise _ClientGone() from None
        self.conn.receive_data(data)  # b"": end of stream, reported by h11 as ConnectionClosed or an error

    async def _next_event(self, deadline: float) -> h11.Event | type[h11.PAUSED]:
        """The next h11 event; TimeoutError at ``deadline`` (monotonic) in total, however the bytes trickle in."""
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError()
            await self._receive(remaining)

    async def _read_request(self) -> h11.Request | None:
        """The next request's head, or None when the client closed or idled out between requests."""
        try:
            if not self.conn.trailing_data[0]:  # nothing buffered: wait (long) for the next request to begin
                await self._receive(self.limits.keep_alive_timeout)
            event = await self._next_event(time.monotonic() + self.limits.header_timeout)
        except TimeoutError:
            return None
        except h11.RemoteProtocolError as exc:
            raise _protocol_error(exc) from None
        if not isinstance(event, h11.Request):
            return None  # ConnectionClosed
        # h11 bounds only a head still arriving; one that came whole in a single read is measured here
        size = len(event.method) + len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
        if size > self.limits.max_header_bytes:
            raise _header_too_large()
        names = {name for name, _ in event.headers}
        if {b"content-length", b"transfer-encoding"} <= names:  # h11 lets chunked win; refuse the ambiguity
            raise bad_request("both Content-Length and Transfer-Encoding: ambiguous framing, refused")
        return event

    async def _read_body(self, request: h11.Request) -> bytes | None:
        declared = _content_length(request)
        if declared is not None and declared > self.limits.max_body_bytes:
            raise _too_large(self.limits.max_body_bytes)
        chunked = any(name == b"transfer-encoding" for name, _ in request.headers)
        body = bytearray()
        deadline = time.monotonic() + self.limits.body_timeout
        while True:
            try:
                event = await self._next_event(deadline)
            except TimeoutError:
                raise bad_request("the request body did not arrive in time", status=408,
                                  code="request_timeout") from None
            except h11.RemoteProtocolError as exc:
                raise _protocol_error(exc) from None
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.limits.max_body_bytes:
                    raise _too_large(self.limits.max_body_bytes)
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body) if (body or declared is not None or chunked) else None
            else:  # ConnectionClosed mid-body
                raise _ClientGone()

    # -- writing ------------------------------------------------------------------------------------
    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            try:
                self.writer.write(data)
                await self.writer.drain()
            except (ConnectionError, OSError):
                raise _ClientGone() from None

    async def _send_error(self, error: ProxyError) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.must_close = True
            return
        body = error.body()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if error.close:
            headers.append((b"connection", b"close"))
            self.must_close = True
        try:
            await self._send(h11.Response(status_code=error.status, headers=headers))
            await self._send(h11.Data(data=body))
            await self._send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self.must_close = True

    # -- one exchange -------------------------------------------------------------------------------
    async def _exchange(self) -> bool:
        started = time.monotonic()
        request: h11.Request | None = None
        try:
            request = await self._read_request()
            if request is None:
                return False
            if not request.target.startswith(b"/"):
                raise bad_request("the proxy serves origin-form targets only (a path such as /proxy/<domain>/v1/"
                                  "models), not absolute URLs or '*'")
            self.proxy.access.check(request, self.proxy.port)
            body = await self._read_body(request)
            response = await self.proxy.upstream.open(request.method, request.target, list(request.headers), body)
        except ProxyError as error:
            await self._send_error(error)
            _log_exchange(request, error.status, started, error.code)
            return not error.close
        try:
            await self._stream(response)
        finally:
            await response.aclose()  # unread (client gone, upstream failed): closes the upstream connection
        _log_exchange(request, response.status_code, started)
        return True

    async def _stream(self, response: httpx.Response) -> None:
        headers = end_to_end_headers(list(response.headers.raw))
        await self._send(h11.Response(status_code=response.status_code, headers=headers,
                                      reason=response.reason_phrase.encode("latin-1", "replace")))
        relay = asyncio.create_task(self._relay_body(response))
        watch = asyncio.create_task(self._watch_client())
        try:
            done, _ = await asyncio.wait({relay, watch}, return_when=asyncio.FIRST_COMPLETED)
            if relay not in done and not watch.result():  # the client went away: stop generating upstream
                self.must_close = True
                raise _ClientGone()
            await relay  # the relay finished first, or the client pipelined its next request: finish it
        finally:
            for task in (relay, watch):
                task.cancel()
            await asyncio.gather(relay, watch, return_exceptions=True)

    async def _relay_body(self, response: httpx.Response) -> None:
        try:
            async for chunk in response.aiter_raw():
                if chunk:
                    await self._send(h11.Data(data=chunk))
        except httpx.HTTPError as exc:  # the upstream failed mid-body: end the client's message as broken
            log.warning("upstream failed mid-response (%s); closing the client connection", type(exc).__name__)
            self.must_close = True
            return
        await self._send(h11.EndOfMessage())

    async def _watch_client(self) -> bool:
        """Wait for the client's side: False when it closed (or failed), True when it sent more (pipelining)."""
        try:
            data = await self.reader.read(READ_SIZE)
        except (ConnectionError, OSError):
            return False
        if not data:
            return False
        self.conn.receive_data(data)  # kept for the next cycle; watching stops (bounded buffering)
        return True


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)  # h11 validated it
    return None


def _too_large(limit: int) -> ProxyError:
    return bad_request(f"the request body is larger than the proxy's limit of {limit} bytes (--max-body-bytes)",
                       status=413, code="request_too_large")


def _header_too_large() -> ProxyError:
    return bad_request("the request headers are too large", status=431, code="request_header_fields_too_large")


def _protocol_error(exc: h11.RemoteProtocolError) -> ProxyError:
    status = exc.error_status_hint
    if status == 431:
        return _header_too_large()
    return bad_request(f"malformed HTTP/1.1 request: {str(exc)[:120]}", status=status if 400 <= status < 500 else 400)


def _log_exchange(request: h11.Request | None, status: int, started: float, code: str = "") -> None:
    """One access line: method, path without its query (values there may be secrets), status, duration."""
    if request is None:
        what = "-"
    else:
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        what = f"{request.method.decode('ascii', 'replace')} {path}"
    extra = f" {code}" if code else ""
    log.info("%s -> %d%s (%.0f ms)", what, status, extra, (time.monotonic() - started) * 1000)
