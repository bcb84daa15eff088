"""Splitting a backend's byte stream into whole events: SSE events (blank-line terminated) and NDJSON lines.

The relay forwards only whole events, each the moment its terminator arrives: several events that arrived
together leave together, an event split across reads waits for its end. A stream that breaks off mid-event
leaves a partial tail that is never forwarded (the client gets a well-formed error ending instead).
"""

from __future__ import annotations

#: SSE event terminators (a blank line, in any of the line endings the SSE specification allows).
SSE_TERMINATORS = (b"\n\n", b"\r\n\r\n", b"\r\r")
NDJSON_TERMINATORS = (b"\n",)


class EventSplitter:
    """Whole events out of arbitrary chunks. The first terminator seen fixes the stream's style (servers
    do not mix line endings), after which one ``find`` per event is all the work."""

    def __init__(self, terminators: tuple[bytes, ...]) -> None:
        self._candidates = terminators
        self._terminator: bytes | None = terminators[0] if len(terminators) == 1 else None
        self._tail = b""

    @property
    def terminator(self) -> bytes:
        return self._terminator or self._candidates[0]

    @property
    def pending(self) -> bytes:
        """Bytes of an event whose end has not arrived."""
        return self._tail

    def _end_of_first(self, buf: bytes, start: int) -> int:
        found = -1
        for terminator in self._candidates:
            at = buf.find(terminator, start)
            if at >= 0 and (found < 0 or at < found):
                found, self._terminator = at, terminator
        return found

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._tail + chunk if self._tail else chunk
        events: list[bytes] = []
        start = 0
        while True:
            if self._terminator is None:
                at = self._end_of_first(buf, start)
            else:
                at = buf.find(self._terminator, start)
            if at < 0:
                break
            end = at + len(self._terminator)  # type: ignore[arg-type]
            events.append(buf[start:end])
            start = end
        self._tail = buf[start:] if start < len(buf) else b""
        return events
