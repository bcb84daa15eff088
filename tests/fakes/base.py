"""What both backend fakes share: lifecycle, failure controls and a log of the requests they saw."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tests.fakes.generation import DEFAULT_EMBEDDING_DIM, DEFAULT_TOKEN_COUNT, default_tokens
from tests.fakes.server import LoopbackServer
from tests.fakes.streaming import Reply, ReplyResponse

#: ``"not_json"``: a truncated JSON document; ``"bad_shape"``: valid JSON of the wrong shape;
#: ``"html"``: a 200 HTML page (what a misconfigured reverse proxy in front of a backend returns).
Malformation = Literal["not_json", "bad_shape", "html"]


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = field(repr=False, default=b"")


class FakeBackend:
    """Base of FakeOllama / FakeVllm.

    Controls (safe to flip from the test thread while the server runs):

    * ``answering`` — ``False`` closes the listening socket and open connections, so new connections
      are refused; ``True`` serves again on the same port.
    * ``delay`` — seconds every request waits before it is answered (for client read timeouts).
    * ``malformed`` — the model-listing endpoint answers 200 with a broken body (see ``Malformation``).
    * ``trickle`` — seconds between the bytes of the model listing (a backend that answers, but crawls).
    * ``requests`` — every request seen, oldest first (method, path, lower-cased headers, body).

    Inference controls (the ``/v1/chat/completions``-style routes; see ``tests.fakes.streaming``):

    * ``delay`` also holds back an inference answer's headers (``delay = 3600``: a backend that never answers);
      a client that leaves meanwhile is noticed and counted.
    * ``event_interval`` — seconds between stream events (a slow CPU backend).
    * ``fail_after`` — after N events, half of the next one is written and the connection closed (no final
      chunk, no ``[DONE]``, no terminating HTTP chunk): a backend killed mid-stream.
    * ``stall_after`` — after N events, silence with the connection open (idle-timeout tests).
    * ``upstream_status`` — ``(status, message)``: inference answers that status with the backend's own error body.
    * ``tokens`` — the completion's tokens (default: a varied sequence derived from the request);
      ``token_count`` — the default sequence's length; ``embedding_dim`` — the vectors' length.
    * ``tool_call`` — ``(name, arguments JSON)``: a request carrying ``tools`` is answered with this tool call.

    Observation (read from the test thread): ``in_flight``, ``max_in_flight_seen``, ``streams_started``,
    ``streams_finished`` (ended normally), ``streams_errored`` (ended by an error line), ``streams_failed``
    (cut by ``fail_after``), ``streams_cancelled`` (the client went away mid-stream), ``requests_cancelled`` (the
    client went away before any inference answer was complete, streamed or not) and ``cancelled_at``: for each of
    those, the ``time.monotonic()`` at which the fake noticed the closed connection.
    """

    name = "fake"

    def __init__(self) -> None:
        self.delay: float = 0.0
        self.malformed: Malformation | None = None
        self.trickle: float = 0.0
        self.requests: list[SeenRequest] = []
        self.event_interval: float = 0.0
        self.fail_after: int | None = None
        self.stall_after: int | None = None
        self.upstream_status: tuple[int, str] | None = None
        self.tokens: list[str] | None = None
        self.token_count: int = DEFAULT_TOKEN_COUNT
        self.embedding_dim: int = DEFAULT_EMBEDDING_DIM
        self.tool_call: tuple[str, str] | None = None
        self.in_flight = 0
        self.max_in_flight_seen = 0
        self.streams_started = 0
        self.streams_finished = 0
        self.streams_errored = 0
        self.streams_failed = 0
        self.streams_cancelled = 0
        self.requests_cancelled = 0
        self.cancelled_at: list[float] = []
        self._state_lock = threading.RLock()
        self._stopping = threading.Event()
        self._server = LoopbackServer(self._build_app(), name=self.name)

    # lifecycle -------------------------------------------------------------------------------
    def _build_app(self) -> Starlette:
        raise NotImplementedError

    def start(self) -> str:
        """Serve on 127.0.0.1 (OS-chosen port, kept across restarts); returns the base URL."""
        self._stopping.clear()
        return self._server.start()

    def stop(self) -> None:
        self._stopping.set()
        self._server.stop()

    @property
    def base_url(self) -> str:
        return self._server.base_url

    @property
    def answering(self) -> bool:
        return self._server.running

    @answering.setter
    def answering(self, value: bool) -> None:
        if value:
            self.start()
        else:
            self.stop()

    def __enter__(self) -> "FakeBackend":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # helpers for handlers ------------------------------------------------------------------
    async def _record(self, request: Request) -> bytes:
        body = await request.body()
        self.requests.append(
            SeenRequest(request.method, request.url.path, {k.lower(): v for k, v in request.headers.items()}, body)
        )
        return body

    async def _seen(self, request: Request) -> bytes:
        body = await self._record(request)
        await self._wait_delay()
        return body

    def json_bodies(self, path: str) -> list[Any]:
        """The parsed bodies of the requests seen on ``path`` (what the gateway forwarded), oldest first."""
        return [json.loads(r.body) for r in self.requests if r.path == path and r.body]

    def generated_tokens(self, seed: Any) -> list[str]:
        """The completion for a request: the ``tokens`` control, else a sequence derived from ``seed``."""
        if self.tokens is not None:
            return list(self.tokens)
        return default_tokens(seed, self.token_count)

    # inference bookkeeping (called on the server's loop by tests.fakes.streaming) ---------------
    def _flight(self, step: int) -> None:
        with self._state_lock:
            self.in_flight += step
            self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)

    def _stream_started(self) -> None:
        with self._state_lock:
            self.streams_started += 1

    def _stream_ended(self, how: str) -> None:
        with self._state_lock:
            name = f"streams_{how}"
            setattr(self, name, getattr(self, name) + 1)

    def _client_left(self, noticed_at: float, streamed: bool) -> None:
        with self._state_lock:
            self.cancelled_at.append(noticed_at)
            self.requests_cancelled += 1
            if streamed:
                self.streams_cancelled += 1

    def _drop_connection(self, client: tuple[str, int]) -> bool:
        return self._server.close_connection(client)

    def reply(self, reply: Reply) -> Response:
        """An inference answer played under the inference controls."""
        return ReplyResponse(self, reply)

    async def _wait_delay(self) -> None:
        """Sleep ``delay`` seconds in small steps, so a stopping server is not held up by it."""
        deadline = time.monotonic() + self.delay
        while time.monotonic() < deadline and not self._stopping.is_set():
            await asyncio.sleep(min(0.02, max(0.0, deadline - time.monotonic())))

    def _malformed_response(self) -> Response | None:
        kind = self.malformed
        if kind is None:
            return None
        if kind == "not_json":
            return Response(b'{"models": [{"name": "trunc', media_type="application/json")
        if kind == "bad_shape":
            return Response(b'{"models": {"name": 3}, "data": "nope"}', media_type="application/json")
        if kind == "html":
            return Response(b"<html><body>502 Bad Gateway</body></html>", media_type="text/html")
        raise ValueError(f"unknown malformation {kind!r}")

    def listing_response(self, payload: Any) -> Response:
        """The model listing as JSON, honouring ``malformed`` and ``trickle``."""
        malformed = self._malformed_response()
        if malformed is not None:
            return malformed
        if not self.trickle:
            return JSONResponse(payload)
        body = json.dumps(payload, separators=(",", ":")).encode()
        pause = self.trickle

        async def crawl() -> AsyncIterator[bytes]:
            for index in range(len(body)):
                if self._stopping.is_set():
                    return
                yield body[index : index + 1]
                await asyncio.sleep(pause)

        return StreamingResponse(crawl(), media_type="application/json")

    def paths_seen(self) -> list[str]:
        return [f"{r.method} {r.path}" for r in self.requests]


def as_json_safe(value: Any) -> Any:
    """Deep copy through plain containers (so a test mutating its dict does not change the fake)."""
    if isinstance(value, dict):
        return {k: as_json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_json_safe(v) for v in value]
    return value
