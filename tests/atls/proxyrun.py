"""The verifying proxy (attestation.proxy) run in a thread of its own for tests, and an upstream app to test it with."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from attestation.policy import Policy
from attestation.proxy.access import AccessRules
from attestation.proxy.forward import Upstream
from attestation.proxy.server import Limits, ProxyServer
from enclave.tls import TlsManager

from .conftest import enclave_like_app


class ProxyThread:
    """A ProxyServer on 127.0.0.1 (any free port) with its own event loop in a daemon thread."""

    def __init__(self, upstream_url: str, policy: Policy, *, pat: str | None = None,
                 limits: Limits = Limits(), access: AccessRules = AccessRules()) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._call(self._start(upstream_url, policy, pat, limits, access))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=20)

    async def _start(self, upstream_url: str, policy: Policy, pat: str | None, limits: Limits,
                     access: AccessRules) -> None:
        self.upstream = Upstream(upstream_url, policy, pat=pat)
        self.server = ProxyServer(self.upstream, limits, access)
        _, self.port = await self.server.start("127.0.0.1", 0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> bytes:
        """The Host header real clients send to it."""
        return f"127.0.0.1:{self.port}".encode()

    @property
    def attestor(self) -> Any:
        return self.upstream.client.attestor

    def close(self) -> None:
        async def stop() -> None:
            await self.server.close()
            await self.upstream.aclose()

        self._call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def make_proxy() -> Iterator[Callable[..., ProxyThread]]:
    started: list[ProxyThread] = []

    def make(upstream_url: str, policy: Policy, **options: Any) -> ProxyThread:
        proxy = ProxyThread(upstream_url, policy, **options)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.close()


def relay_test_app(tls: TlsManager) -> Any:
    """The enclave-like app plus routes that show what the proxy forwarded and how it streams.

    ``/echo/...`` answers 201 with what it received; ``/sse`` yields ``n`` events ``pause`` s apart and records
    when each was produced; ``/forever`` streams until its client goes away, then sets ``app.state.gone``.
    """
    app = enclave_like_app(tls)
    app.state.produced = []
    app.state.gone = threading.Event()
    app.state.gone_at = None

    @app.api_route("/echo/{rest:path}", methods=["GET", "POST", "PUT"])
    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        app.state.seen_authorization.append(request.headers.get("authorization", ""))
        return JSONResponse({"method": request.method, "raw_path": request.scope["raw_path"].decode(),
                             "query": request.scope["query_string"].decode(),
                             "headers": [[k.decode(), v.decode()] for k, v in request.scope["headers"]],
                             "body_sha256": hashlib.sha256(body).hexdigest(), "body_len": len(body)},
                            status_code=201, headers={"x-upstream-echo": "yes"})

    @app.get("/sse")
    async def sse(n: int = 4, pause: float = 0.3) -> StreamingResponse:
        async def events():
            for i in range(n):
                app.state.produced.append(time.monotonic())
                yield f"data: {{\"i\": {i}}}\n\n".encode()
                await asyncio.sleep(pause)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/forever")
    async def forever() -> StreamingResponse:
        async def events():
            try:
                i = 0
                while True:
                    yield f"{{\"line\": {i}}}\n".encode()
                    i += 1
                    await asyncio.sleep(0.1)
            finally:
                app.state.gone_at = time.monotonic()
                app.state.gone.set()

        return StreamingResponse(events(), media_type="application/x-ndjson")

    return app
