"""The ASGI response that relays a backend stream to the client event by event.

* Each whole event is sent the moment its terminator arrives (``EventSplitter``); nothing is held back to
  fill a buffer, and there is no limit on a stream's length, only on silence (the backend's ``idle_timeout``).
* The client going away (``http.disconnect``, watched concurrently, so it is seen even while the backend is
  silent) cancels the relay at once, which closes the backend connection: the backend stops generating.
* A backend that fails mid-stream yields a well-formed ending (``error_ending``): a partial event is never
  forwarded, and the stream closes. So does an event that outgrows ``MAX_EVENT_BYTES`` without its end.
* The stream's last event (``[DONE]``, Ollama's ``done: true`` line) ends the relay: nothing a backend sends
  after it reaches the client.
* Every body chunk handed to ``send`` (the ending included) is hashed as it goes (SHA-256, for receipts), and
  ``on_finish`` gets the digest of all of them: exactly what was sent, also when the client left early.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from enclave.inference.editors import compact
from enclave.inference.framing import MAX_EVENT_BYTES, EventSplitter, EventTooLarge
from enclave.inference.upstream import UpstreamBroken, UpstreamResponse


class StreamEditor(Protocol):
    done: bool

    def edit(self, event: bytes) -> bytes | None: ...


#: How a relayed stream ended.
COMPLETED, CANCELLED, BACKEND_ERROR, IDLE_TIMEOUT = "completed", "cancelled", "backend_error", "idle_timeout"


class StreamRelay(Response):
    def __init__(self, upstream: UpstreamResponse, *, splitter: EventSplitter, editor: StreamEditor,
                 error_ending: Callable[[str, bytes], bytes], media_type: str, headers: Mapping[str, str],
                 started: float, on_finish: Callable[[str, float | None, str], None]) -> None:
        super().__init__(content=None, status_code=200, headers=dict(headers), media_type=media_type)
        # No length: the body is as long as the backend makes it (chunked transfer).
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.upstream = upstream
        self.splitter = splitter
        self.editor = editor
        self.error_ending = error_ending
        self.started = started
        self.on_finish = on_finish   # (outcome, time to first byte, SHA-256 hex of the body sent)
        self.sent = hashlib.sha256()

    def _edited(self, events: list[bytes]) -> list[bytes]:
        """The events to forward, edited; none after the one that ends the stream (``editor.done``)."""
        edited = []
        for event in events:
            out = self.editor.edit(event)
            if out is not None:
                edited.append(out)
            if self.editor.done:
                break
        return edited

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay = asyncio.current_task()
        assert relay is not None
        client_gone = False

        async def watch_client() -> None:
            nonlocal client_gone
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    client_gone = True
                    relay.cancel()
                    return

        watcher = asyncio.create_task(watch_client())
        outcome = COMPLETED
        failure: str | None = None
        first: float | None = None
        finished = False
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            try:
                async for chunk in self.upstream.chunks():
                    edited = self._edited(self.splitter.feed(chunk))
                    if edited:
                        if first is None:
                            first = time.perf_counter() - self.started
                        body = edited[0] if len(edited) == 1 else b"".join(edited)
                        self.sent.update(body)
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                    if self.editor.done:
                        # The stream's last event: whatever a backend sends after it is not relayed, only read
                        # (briefly, bounded) so the connection can be kept for the next request.
                        await self.upstream.drain()
                        break
            except TimeoutError:
                outcome = IDLE_TIMEOUT
            except EventTooLarge:
                outcome, failure = BACKEND_ERROR, (f"The model's backend sent an event larger than "
                                                   f"{MAX_EVENT_BYTES} bytes; the stream was ended.")
            except UpstreamBroken:
                outcome = BACKEND_ERROR
            if outcome == COMPLETED and not self.editor.done and self.splitter.pending.strip():
                outcome = BACKEND_ERROR   # the stream ended inside an event: that half event is dropped
            ending = b""
            if outcome != COMPLETED:
                message = failure or ("The model's backend stopped sending for too long; the stream was ended."
                                      if outcome == IDLE_TIMEOUT else "The model's backend failed mid-stream.")
                ending = self.error_ending(message, self.splitter.terminator)
            elif getattr(self.editor, "backend_error", False):
                outcome = BACKEND_ERROR   # the backend reported an error inside its 200 stream (Ollama)
            # Slot freed and record made before the client sees the end, so whoever reads them next (the
            # client's next request, the ledger) finds them done.
            finished = True
            self.sent.update(ending)   # hashed before the record is made: it is part of what the client gets
            await self._finish(outcome, first)
            await send({"type": "http.response.body", "body": ending, "more_body": False})
        except asyncio.CancelledError:
            if not client_gone:
                raise
            relay.uncancel()
            outcome = CANCELLED
        except OSError:   # the transport is gone (uvicorn raises on send after a disconnect)
            outcome = CANCELLED
        finally:
            watcher.cancel()
            if not finished:
                await self._finish(outcome, first)

    async def _finish(self, outcome: str, first: float | None) -> None:
        await self.upstream.aclose()
        self.on_finish(outcome, first, self.sent.hexdigest())


def sse_error_ending(message: str, terminator: bytes) -> bytes:
    """The last SSE event of a stream that broke: the error envelope as a data event (openai-python raises it
    as ``APIError``)."""
    line_end = terminator[: len(terminator) // 2]
    payload = compact({"error": {"message": message, "type": "api_error", "param": None, "code": "backend_error"}})
    return b"data: " + payload + line_end + line_end


def ndjson_error_ending(message: str, terminator: bytes) -> bytes:
    """Ollama's way to end a stream that failed: an ``{"error": ...}`` line."""
    return compact({"error": message}) + b"\n"


