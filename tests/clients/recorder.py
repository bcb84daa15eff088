"""A recording relay in front of an OpenAI-compatible server: what exactly does a client send?

The CLIs are black boxes; the tests (and the integrator, who re-points them through the gateway) need to
know which paths they call, with which headers and bodies. The relay forwards every request to the upstream
unchanged and streams the answer back chunk by chunk, keeping a copy of each request.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from tests.fakes.server import LoopbackServer

# Hop-by-hop headers (RFC 9110 §7.6.1), the ones the relay recomputes, and accept-encoding: the upstream
# then answers uncompressed, so what is recorded is readable and what is relayed is the upstream's bytes.
_NOT_FORWARDED = {
    "connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host", "content-length", "accept-encoding",
}


@dataclass(frozen=True)
class Exchange:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    status: int
    response: bytes  # the whole answer as relayed (SSE text for streams)

    def json(self) -> Any:
        return json.loads(self.body)

    def json_response(self) -> Any:
        return json.loads(self.response)

    def generated_text(self) -> str:
        """The assistant text of a chat answer, streamed (SSE deltas) or not."""
        text = self.response.decode(errors="replace")
        if not text.lstrip().startswith("data:"):
            return json.loads(text)["choices"][0]["message"]["content"] or ""
        parts = []
        for block in text.split("\n\n"):
            payload = block.strip().removeprefix("data:").strip()
            if payload and payload != "[DONE]":
                for choice in json.loads(payload).get("choices", []):
                    parts.append(choice.get("delta", {}).get("content") or "")
        return "".join(parts)


class RecordingRelay:
    """ASGI app relaying to ``upstream`` (a base URL such as ``http://127.0.0.1:P``) and recording."""

    def __init__(self, upstream: str) -> None:
        self._upstream = upstream.rstrip("/")
        self._lock = threading.Lock()
        self._exchanges: list[Exchange] = []

    @property
    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return list(self._exchanges)

    def clear(self) -> None:
        with self._lock:
            self._exchanges.clear()

    def paths(self) -> list[str]:
        return [f"{e.method} {e.path}" for e in self.exchanges]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        path = scope["path"] + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")
        forwarded = [(k, v) for k, v in headers if k.lower() not in _NOT_FORWARDED]
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
            request = client.build_request(scope["method"], self._upstream + path, headers=forwarded, content=bytes(body))
            response = await client.send(request, stream=True)
            reply_headers = [
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in response.headers.items()
                if k.lower() not in _NOT_FORWARDED
            ]
            await send({"type": "http.response.start", "status": response.status_code, "headers": reply_headers})
            relayed = bytearray()
            try:
                async for chunk in _chunks(response):
                    relayed += chunk
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                exchange = Exchange(scope["method"], path, {k.lower(): v for k, v in headers}, bytes(body),
                                    response.status_code, bytes(relayed))
                with self._lock:
                    self._exchanges.append(exchange)


async def _chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await response.aclose()


class RecordingServer:
    """A RecordingRelay on a loopback port; use as a context manager."""

    def __init__(self, upstream: str) -> None:
        self.relay = RecordingRelay(upstream)
        self._server = LoopbackServer(self.relay, name="recording-relay")

    def __enter__(self) -> RecordingServer:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    @property
    def base_url(self) -> str:
        return self._server.base_url
