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

from tests.fakes.server import LoopbackServer

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
    """

    name = "fake"

    def __init__(self) -> None:
        self.delay: float = 0.0
        self.malformed: Malformation | None = None
        self.trickle: float = 0.0
        self.requests: list[SeenRequest] = []
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

    # helpers for handlers ------------------------------------------------------------------
    async def _seen(self, request: Request) -> bytes:
        body = await request.body()
        self.requests.append(
            SeenRequest(request.method, request.url.path, {k.lower(): v for k, v in request.headers.items()}, body)
        )
        await self._wait_delay()
        return body

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
