"""Send an inference answer the way a real backend's socket does, with the faults the gateway must survive.

A fake's handler decides *what* to answer (a ``Reply``: a JSON body, or a list of wire events); ``ReplyResponse``
decides *how* it reaches the wire: after ``delay`` (no response headers until then), one event every
``event_interval`` seconds, and then — if a control says so — cut off in the middle of an event
(``fail_after``), gone silent with the connection open (``stall_after``), or ended by an error line
(``error_line_after``, the fake supplies the line).

Why not Starlette's ``StreamingResponse``: the fakes must notice a client that goes away *while idle* between
events (the gateway must cancel upstream within 1 s), and must be able to drop the TCP connection mid-event.
uvicorn reports a closed connection to a pending ``receive()`` at once (``http.disconnect``, from the protocol's
``connection_lost``) but silently ignores ``send()`` after it, so a response that only sends would not notice
until the end; here a watcher task waits on ``receive()`` for the whole exchange.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

if TYPE_CHECKING:
    from tests.fakes.base import FakeBackend

#: How often a long pause re-checks whether the fake is stopping (a disconnect ends a pause at once).
_STOP_POLL = 0.05


@dataclass
class Reply:
    """What to answer: ``events`` (streamed, in order) or ``body`` (one JSON document)."""

    status: int = 200
    media_type: str = "application/json"
    body: bytes = b""
    events: list[bytes] | None = None
    #: The line an ``error_line_after`` control sends instead of the next event (the fake's own error shape).
    error_line: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


class ReplyResponse(Response):
    """An ASGI response playing a ``Reply`` under the fake's controls (see the module docstring)."""

    def __init__(self, fake: "FakeBackend", reply: Reply) -> None:
        self.fake = fake
        self.reply = reply
        self.status_code = reply.status
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = _Exchange(self.fake, self.reply, scope, receive, send)
        await exchange.run()


class _Exchange:
    """One request's answer: watches the client, paces the events, applies the fault controls."""

    def __init__(self, fake: "FakeBackend", reply: Reply, scope: Scope, receive: Receive, send: Send) -> None:
        self.fake = fake
        self.reply = reply
        self.client = tuple(scope["client"]) if scope.get("client") else None
        self.receive = receive
        self.send = send
        self.gone = asyncio.Event()
        self.gone_at: float | None = None
        self.dropped_by_us = False
        self.completed = False

    async def _watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                if self.completed:  # uvicorn also says "disconnect" once the response is complete
                    return
                self.gone_at = time.monotonic()
                self.gone.set()
                return

    async def _pause(self, seconds: float) -> bool:
        """Wait ``seconds``; False when the client went away (or the fake stops) first."""
        deadline = time.monotonic() + seconds
        while not self.gone.is_set() and not self.fake.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            try:
                await asyncio.wait_for(self.gone.wait(), min(left, _STOP_POLL))
            except asyncio.TimeoutError:
                pass
        return False

    async def run(self) -> None:
        watcher = asyncio.create_task(self._watch())
        self.fake._flight(+1)
        streamed = False
        try:
            if not await self._pause(self.fake.delay):
                return
            if self.reply.events is None:
                await self._send_whole()
                return
            streamed = True
            await self._stream()
        finally:
            self.fake._flight(-1)
            if self.gone_at is not None and not self.dropped_by_us:
                self.fake._client_left(self.gone_at, streamed)
            watcher.cancel()

    async def _start(self) -> None:
        headers = [(b"content-type", self.reply.media_type.encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in self.reply.headers.items()]
        if self.reply.events is None:
            headers.append((b"content-length", str(len(self.reply.body)).encode()))
        await self.send({"type": "http.response.start", "status": self.reply.status, "headers": headers})

    async def _send_whole(self) -> None:
        await self._start()
        await self._end(self.reply.body)

    async def _stream(self) -> None:
        events = self.reply.events or []
        fake = self.fake
        await self._start()
        fake._stream_started()
        for index, event in enumerate(events):
            if index and fake.event_interval and not await self._pause(fake.event_interval):
                return
            if self.gone.is_set():
                return
            if fake.fail_after is not None and index >= fake.fail_after:
                await self._cut(event)
                return
            if fake.stall_after is not None and index >= fake.stall_after:
                await self._pause(float("inf"))
                return
            error_after = getattr(fake, "error_line_after", None)
            if error_after is not None and index >= error_after and self.reply.error_line is not None:
                await self._body(self.reply.error_line)
                await self._end()
                fake._stream_ended("errored")
                return
            await self._body(event)
            await asyncio.sleep(0)  # let the watcher see a disconnect before the next event
        if self.gone.is_set():
            return
        await self._end()
        fake._stream_ended("finished")

    async def _end(self, chunk: bytes = b"") -> None:
        self.completed = True
        await self.send({"type": "http.response.body", "body": chunk, "more_body": False})

    async def _body(self, chunk: bytes) -> None:
        await self.send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def _cut(self, event: bytes) -> None:
        """Half of ``event`` on the wire, then the connection closed: what a killed backend leaves behind."""
        self.dropped_by_us = True
        await self._body(event[: max(1, len(event) // 2)])
        self.fake._stream_ended("failed")
        if self.client is None or not self.fake._drop_connection(self.client):
            raise RuntimeError("fail_after: the fake could not find its own connection to drop")
        # Returning before uvicorn sees the close would make it log "returned without completing response".
        try:
            await asyncio.wait_for(self.gone.wait(), 2.0)
        except asyncio.TimeoutError:
            pass
