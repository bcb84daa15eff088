"""Splitting a backend's byte stream into whole events: SSE events (blank-line terminated) and NDJSON lines.

The relay forwards only whole events, each the moment its terminator arrives: several events that arrived
together leave together, an event split across reads waits for its end. A stream that breaks off mid-event
leaves a partial tail that is never forwarded (the client gets a well-formed error ending instead).
"""

from __future__ import annotations

#: SSE event terminators (a blank line, in any of the line endings the SSE specification allows).
SSE_TERMINATORS = (b"\n\n", b"\r\n\r\n", b"\r\r")
NDJSON_TERMINATORS = (b"\n",)
#: Largest event held while waiting for its terminator: a backend that never ends an event must not make the
#: gateway buffer without bound (real events are tokens, at most a few KiB; a whole tool call stays far below).
MAX_EVENT_BYTES = 16 * 1024 * 1024


class EventTooLarge(Exception):
    """The pending event grew beyond ``MAX_EVENT_BYTES`` without a terminator."""


class EventSplitter:
    """Whole events out of arbitrary chunks. The first terminator seen fixes the stream's style (servers
    do not mix line endings), after which one ``find`` per event is all the work. A partial event is kept in
    a bytearray and only its new bytes are searched, so a backend trickling a long event in tiny reads costs
    linear, not quadratic, time."""

    def __init__(self, terminators: tuple[bytes, ...], max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._candidates = terminators
        self._terminator: bytes | None = terminators[0] if len(terminators) == 1 else None
        self._longest = max(len(t) for t in terminators)
        self._max_event_bytes = max_event_bytes
        self._tail = bytearray()

    @property
    def terminator(self) -> bytes:
        return self._terminator or self._candidates[0]

    @property
    def pending(self) -> bytes:
        """Bytes of an event whose end has not arrived."""
        return bytes(self._tail)

    def _end_of_first(self, buf: bytes | bytearray, start: int) -> int:
        found = -1
        for terminator in self._candidates:
            at = buf.find(terminator, start)
            if at >= 0 and (found < 0 or at < found):
                found, self._terminator = at, terminator
        return found

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events ``chunk`` completes; ``EventTooLarge`` when the unfinished one exceeds the limit."""
        buf: bytes | bytearray
        if self._tail:
            # Bytes already searched cannot hold a terminator, except one straddling the old end.
            searched = max(0, len(self._tail) - self._longest + 1)
            self._tail += chunk
            buf = self._tail
        else:
            searched, buf = 0, chunk
        events: list[bytes] = []
        start = 0
        while True:
            at = (self._end_of_first(buf, max(start, searched)) if self._terminator is None
                  else buf.find(self._terminator, max(start, searched)))
            if at < 0:
                break
            end = at + len(self._terminator)  # type: ignore[arg-type]
            events.append(bytes(buf[start:end]))
            start = end
        if buf is self._tail:
            del self._tail[:start]
        elif start < len(buf):
            self._tail = bytearray(buf[start:])
        if len(self._tail) > self._max_event_bytes:
            self._tail = bytearray()
            raise EventTooLarge(f"an event is larger than {self._max_event_bytes} bytes")
        return events
