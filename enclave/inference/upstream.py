"""Connections to the backends for inference: a keep-alive pool and an admission queue per backend, timeouts
that bound silence rather than length, and every failure turned into one typed ``UpstreamFailure``.

Discovery keeps its own short-timeout client (``enclave.backends``); inference gets a pool sized to the
backend's ``max_in_flight``, so a long generation never waits behind discovery or the other way round.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import httpx

from enclave.backends.base import BackendConfig
from enclave.inference.admission import Admission, Overloaded

log = logging.getLogger("enclave.inference")

#: Largest non-streamed answer relayed (embeddings of a large batch are the biggest); beyond it 502.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
#: Longest backend error body read to find its message.
MAX_ERROR_BYTES = 64 * 1024
WRITE_TIMEOUT = 30.0
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


class UpstreamResponse:
    """A backend answer with status 2xx whose body is still to be read; ``aclose`` frees the backend slot."""

    def __init__(self, response: httpx.Response, connections: "BackendConnections") -> None:
        self.response = response
        self._connections = connections
        self._closed = False

    @property
    def content_type(self) -> str:
        return self.response.headers.get("content-type", "application/json")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; ``TimeoutError`` after ``idle_timeout`` of silence, ``httpx`` errors as the
        transport reports them."""
        idle = self._connections.config.idle_timeout
        stream = self.response.aiter_bytes()   # decoded per content-encoding; no re-chunking (no chunk size)
        while True:
            # One deadline per read: it must not run while the consumer writes to the client between reads.
            async with asyncio.timeout(idle):
                try:
                    chunk = await anext(stream)
                except StopAsyncIteration:
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
        except httpx.HTTPError as exc:
            raise self._connections.broken(exc) from None
        return bytes(body)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.response.aclose()   # mid-body: httpcore drops the connection, so the backend sees it
        finally:
            self._connections.admission.release()


class BackendConnections:
    """One backend's inference pool and admission queue."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.admission = Admission(config.max_in_flight, config.max_queued, config.queue_timeout)
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop or self._client.is_closed:
            # identity: bodies are relayed as they arrive, and the client must get what it can read (httpx would
            # otherwise ask for gzip); a backend compressing anyway is decoded (``aiter_bytes``).
            headers = {"User-Agent": "cube-ai-enclave", "Accept-Encoding": "identity"}
            if self.config.api_key is not None:
                headers["Authorization"] = f"Bearer {self.config.api_key.get_secret_value()}"
            size = self.config.max_in_flight
            self._client = httpx.AsyncClient(
                base_url=self.config.base_url, headers=headers, trust_env=False, follow_redirects=False,
                # Reads are bounded by the gateway's own deadlines (first byte, idle), not by httpx.
                timeout=httpx.Timeout(None, connect=self.config.connect_timeout, write=WRITE_TIMEOUT,
                                      pool=self.config.connect_timeout + self.config.queue_timeout),
                limits=httpx.Limits(max_connections=size, max_keepalive_connections=size, keepalive_expiry=60.0),
            )
            self._loop = loop
        return self._client

    def broken(self, exc: httpx.HTTPError) -> UpstreamFailure:
        log.warning("backend %s: %s", self.config.name, type(exc).__name__)
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return UpstreamFailure(502, "backend_unavailable", "The model's backend cannot be reached.")
        if isinstance(exc, httpx.TimeoutException):
            return UpstreamFailure(504, "backend_timeout", "The model's backend did not answer in time.")
        return UpstreamFailure(502, "backend_error", "The model's backend closed the connection.")

    async def open(self, path: str, body: bytes, *, accept: str = "application/json") -> UpstreamResponse:
        """POST ``body`` to ``path`` and wait (at most ``first_byte_timeout``) for a 2xx answer's headers."""
        try:
            await self.admission.acquire()
        except Overloaded as exc:
            log.warning("backend %s overloaded: %s", self.config.name, exc.reason)
            raise UpstreamFailure(503, "backend_overloaded",
                                  "The model's backend is at capacity; retry shortly.", exc.retry_after) from None
        try:
            request = self.client().build_request(
                "POST", path, content=body, headers={"content-type": "application/json", "accept": accept})
            try:
                async with asyncio.timeout(self.config.first_byte_timeout):
                    response = await self.client().send(request, stream=True)
            except TimeoutError:
                raise UpstreamFailure(504, "backend_timeout",
                                      f"The model's backend did not answer within {self.config.first_byte_timeout:g} s.") from None
            except httpx.HTTPError as exc:
                raise self.broken(exc) from None
            if response.status_code >= 300:
                raise await self._refusal(response)
        except BaseException:
            self.admission.release()
            raise
        return UpstreamResponse(response, self)

    async def _refusal(self, response: httpx.Response) -> UpstreamFailure:
        body = bytearray()
        try:
            async with asyncio.timeout(self.config.connect_timeout + 5):
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_ERROR_BYTES:
                        break
        except (TimeoutError, httpx.HTTPError):
            pass
        finally:
            await response.aclose()
        status = response.status_code
        message, code = backend_message(bytes(body))
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
            client, connections._client = connections._client, None
            if client is not None and not client.is_closed:
                try:
                    await client.aclose()
                except RuntimeError:
                    pass
