"""Connections to the backends for inference: a keep-alive pool and an admission queue per backend, timeouts
that bound silence rather than length, and every failure turned into one typed ``UpstreamFailure``.

Discovery keeps its own short-timeout client (``enclave.backends``); inference gets a pool sized to the
backend's ``max_in_flight``, so a long generation never waits behind discovery or the other way round.

The inference client is aiohttp, not httpx: measured against the same local backend, httpx added about 1 ms
to every request's first byte (1.38 ms against 0.39 ms for aiohttp and for a bare socket), which alone is
more than the gateway's whole latency budget. aiohttp's C HTTP parser adds almost nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from enclave.backends.base import BackendConfig
from enclave.inference.admission import Admission, Overloaded

log = logging.getLogger("enclave.inference")

#: Largest non-streamed answer relayed (embeddings of a large batch are the biggest); beyond it 502.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
#: Longest backend error body read to find its message.
MAX_ERROR_BYTES = 64 * 1024
#: How long the rest of a finished stream (the chunked terminator) may take to arrive before the
#: connection is dropped instead of kept for the next request.
DRAIN_SECONDS = 1.0
MAX_DRAIN_BYTES = 64 * 1024
MAX_MESSAGE = 500


@dataclass
class UpstreamFailure(Exception):
    """Why the backend gave no usable answer, as the client will be told (status, code, message)."""

    status: int
    code: str
    message: str
    retry_after: int | None = None

    def __str__(self) -> str:
        return self.message


def _quoted(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def backend_message(body: bytes) -> tuple[str | None, str | None]:
    """(message, code) from a backend error body: OpenAI ``{"error": {...}}``, vLLM's older
    ``{"object": "error", "message"}``, Ollama's ``{"error": "..."}``."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        text = body.decode("utf-8", "replace").strip()
        return (_quoted(text) if text else None), None
    if isinstance(doc, dict):
        error = doc.get("error")
        if isinstance(error, dict):
            message, code = error.get("message"), error.get("code")
            return (_quoted(message) if isinstance(message, str) else None), (code if isinstance(code, str) else None)
        if isinstance(error, str):
            return _quoted(error), None
        if isinstance(doc.get("message"), str):
            return _quoted(doc["message"]), None
        if isinstance(doc.get("detail"), str):
            return _quoted(doc["detail"]), None
    return None, None


class UpstreamBroken(Exception):
    """The backend connection failed mid-body (reset, cut inside a chunk, closed early)."""


class UpstreamResponse:
    """A backend answer with status 2xx whose body is still to be read; ``aclose`` frees the backend slot."""

    def __init__(self, response: aiohttp.ClientResponse, connections: "BackendConnections") -> None:
        self.response = response
        self._connections = connections
        self._closed = False

    @property
    def content_type(self) -> str:
        return self.response.headers.get("content-type", "application/json")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (decoded if the backend compressed it anyway); ``TimeoutError`` after
        ``idle_timeout`` of silence, ``UpstreamBroken`` when the connection fails."""
        idle = self._connections.config.idle_timeout
        content = self.response.content
        while True:
            # One deadline per read: it must not run while the consumer writes to the client between reads.
            try:
                async with asyncio.timeout(idle):
                    chunk = await content.readany()
            except aiohttp.ClientError as exc:
                raise UpstreamBroken(type(exc).__name__) from None
            if not chunk:
                if not content.is_eof():   # pragma: no cover - readany returns b"" only at EOF
                    continue
                return
            yield chunk

    async def read_all(self) -> bytes:
        body = bytearray()
        try:
            async for chunk in self.chunks():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise UpstreamFailure(502, "backend_error",
                                          f"The backend's answer is larger than {MAX_ANSWER_BYTES} bytes.")
        except TimeoutError:
            raise UpstreamFailure(504, "backend_timeout", "The backend stopped answering mid-response.") from None
        except UpstreamBroken:
            raise UpstreamFailure(502, "backend_error", "The model's backend closed the connection.") from None
        return bytes(body)

    async def drain(self) -> None:
        """After the stream's last event: read what is left of the body (normally only the chunked terminator)
        so the connection can serve the next request; anything more, or a slow end, and it is dropped."""
        content = self.response.content
        left = MAX_DRAIN_BYTES
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                while not content.at_eof() and left > 0:
                    left -= len(await content.readany())
        except (TimeoutError, aiohttp.ClientError):
            pass

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.response.content.at_eof():
                self.response.release()   # fully read: the connection goes back to the pool
            else:
                self.response.close()     # mid-body: the connection is closed, so the backend sees it
        finally:
            self._connections.admission.release()


class BackendConnections:
    """One backend's inference pool and admission queue."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.admission = Admission(config.max_in_flight, config.max_queued, config.queue_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def session(self) -> aiohttp.ClientSession:
        """The backend's pool, made on first use in the running loop (a pool cannot move between loops)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            # identity: bodies are relayed as they arrive, and the client must get what it can read; a backend
            # compressing anyway is decoded (aiohttp's auto_decompress).
            headers = {"User-Agent": "cube-ai-enclave", "Accept-Encoding": "identity"}
            if self.config.api_key is not None:
                headers["Authorization"] = f"Bearer {self.config.api_key.get_secret_value()}"
            connector = aiohttp.TCPConnector(limit=self.config.max_in_flight, limit_per_host=0,
                                             keepalive_timeout=60.0, use_dns_cache=True, ttl_dns_cache=60)
            self._session = aiohttp.ClientSession(
                base_url=self.config.base_url + "/", headers=headers, connector=connector, trust_env=False,
                auto_decompress=True, raise_for_status=False, skip_auto_headers=("Content-Type",),
                # Reads are bounded by the gateway's own deadlines (first byte, idle), not by aiohttp.
                timeout=aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout,
                                              sock_connect=self.config.connect_timeout, sock_read=None),
            )
            self._loop = loop
        return self._session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            try:
                await session.close()
            except RuntimeError:   # its event loop is gone; nothing left to close
                pass

    def _url(self, path: str) -> str:
        return path.lstrip("/")   # relative to base_url (which may carry a path prefix)

    def broken(self, exc: BaseException) -> UpstreamFailure:
        log.warning("backend %s: %s", self.config.name, type(exc).__name__)
        if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
            return UpstreamFailure(502, "backend_unavailable", "The model's backend cannot be reached.")
        if isinstance(exc, (aiohttp.ServerTimeoutError, TimeoutError)):
            return UpstreamFailure(504, "backend_timeout", "The model's backend did not answer in time.")
        return UpstreamFailure(502, "backend_error", "The model's backend closed the connection.")

    async def get_json(self, path: str) -> Any:
        """``GET path`` parsed as JSON, within ``read_timeout`` (for small side calls such as Ollama's
        ``/api/ps``); ``UpstreamFailure`` otherwise."""
        try:
            async with asyncio.timeout(self.config.connect_timeout + self.config.read_timeout):
                async with self.session().get(self._url(path), allow_redirects=False) as response:
                    if response.status != 200:
                        raise UpstreamFailure(502, "backend_error", f"HTTP {response.status} from GET {path}")
                    return json.loads(await response.content.read(MAX_ANSWER_BYTES))
        except UpstreamFailure:
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise self.broken(exc) from None

    async def open(self, path: str, body: bytes, *, accept: str = "application/json") -> UpstreamResponse:
        """POST ``body`` to ``path`` and wait (at most ``first_byte_timeout``) for a 2xx answer's headers."""
        try:
            await self.admission.acquire()
        except Overloaded as exc:
            log.warning("backend %s overloaded: %s", self.config.name, exc.reason)
            raise UpstreamFailure(503, "backend_overloaded",
                                  "The model's backend is at capacity; retry shortly.", exc.retry_after) from None
        try:
            try:
                async with asyncio.timeout(self.config.first_byte_timeout):
                    response = await self.session().post(
                        self._url(path), data=body, allow_redirects=False,
                        headers={"Content-Type": "application/json", "Accept": accept})
            except TimeoutError:
                raise UpstreamFailure(504, "backend_timeout",
                                      f"The model's backend did not answer within {self.config.first_byte_timeout:g} s.") from None
            except aiohttp.ClientError as exc:
                raise self.broken(exc) from None
            if response.status >= 300:
                raise await self._refusal(response)
        except BaseException:
            self.admission.release()
            raise
        return UpstreamResponse(response, self)

    async def _refusal(self, response: aiohttp.ClientResponse) -> UpstreamFailure:
        body = b""
        try:
            async with asyncio.timeout(self.config.connect_timeout + 5):
                body = await response.content.read(MAX_ERROR_BYTES)
        except (TimeoutError, aiohttp.ClientError):
            pass
        finally:
            response.close()
        status = response.status
        message, code = backend_message(body)
        log.warning("backend %s answered HTTP %d", self.config.name, status)
        if status in (401, 403, 407):
            # The backend refused the gateway's own credentials: not the client's fault, and its 401 would make
            # clients think their key is bad.
            return UpstreamFailure(502, "backend_error", f"The model's backend refused the gateway (HTTP {status}).")
        if 400 <= status < 500:
            retry_after = response.headers.get("retry-after")
            return UpstreamFailure(status, code or "backend_rejected", message or f"The backend refused the request "
                                   f"(HTTP {status}).", int(retry_after) if retry_after and retry_after.isdigit() else None)
        return UpstreamFailure(502, "backend_error",
                               f"The model's backend failed (HTTP {status})" + (f": {message}" if message else "."))


class Upstreams:
    """The inference connections of every configured backend, by name."""

    def __init__(self, backends: Sequence[BackendConfig]) -> None:
        self._by_name = {config.name: BackendConnections(config) for config in backends}

    def get(self, backend: str) -> BackendConnections | None:
        return self._by_name.get(backend)

    async def aclose(self) -> None:
        for connections in self._by_name.values():
            await connections.aclose()
