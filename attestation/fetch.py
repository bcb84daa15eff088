"""Fetching collateral over HTTP with bounded backoff, and writing cache files atomically.

One implementation for the AMD KDS client, the Intel PCS client and the host agent's collateral
cache. A GET succeeds only on 200. 429 and 5xx answers and transport errors (refused, reset, timed
out) are retried with exponential backoff ``backoff_base * 2**attempt``, raised to a Retry-After the
server sent (delta-seconds or HTTP-date) and capped at ``backoff_max``; any other status fails at
once. The body is read as a stream and given up on as soon as it passes ``max_bytes``, so a broken
or hostile upstream cannot make the caller buffer more than that.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx

from .errors import FetchError

DEFAULT_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class Fetched:
    """A 200 answer, read in full (at most ``max_bytes``)."""

    url: str
    headers: httpx.Headers
    content: bytes


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def is_retryable(status: int) -> bool:
    """429 (rate limited) and 5xx (outage) are worth another try; other statuses are not."""
    return status == 429 or 500 <= status <= 599


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent or garbled."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - now).total_seconds())


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Pause after failed attempt ``attempt`` (0-based): exponential, at least Retry-After, at most ``cap``."""
    return min(max(base * (2**attempt), retry_after or 0.0), cap)


class _Attempts:
    """The retry loop's state and rules, shared by the sync and async twins (which only do the I/O)."""

    def __init__(self, url: str, *, what: str, attempts: int, backoff_base: float, backoff_max: float,
                 clock: Callable[[], datetime], max_bytes: int, on_attempt: Callable[[], None] | None) -> None:
        self.url, self.what, self.clock, self.max_bytes = url, what, clock, max_bytes
        self.attempts, self.base, self.cap = max(1, attempts), backoff_base, backoff_max
        self.on_attempt = on_attempt
        self.done = 0
        self.size = 0
        self.retry_after: float | None = None
        self.last = ""
        self.status: int | None = None
        self.cause: BaseException | None = None

    def another(self) -> bool:
        """True (and counted) while attempts remain."""
        if self.done >= self.attempts:
            return False
        self.done += 1
        self.size, self.retry_after = 0, None
        if self.on_attempt is not None:
            self.on_attempt()
        return True

    def pause(self) -> float | None:
        """Seconds to wait before the next attempt; None after the last one."""
        if self.done >= self.attempts:
            return None
        return backoff_delay(self.done - 1, self.base, self.cap, self.retry_after)

    def error(self, detail: str, *, status: int | None, reason: str) -> FetchError:
        return FetchError(f"{self.what} {self.url}: {detail}", status=status, reason=reason)

    def chunk(self, data: bytes) -> bytes:
        """A body chunk, passed through; FetchError (not retried) once the body passes ``max_bytes``."""
        self.size += len(data)
        if self.size > self.max_bytes:
            raise self.error(f"response too large (over {self.max_bytes} bytes)", status=200, reason="too_large")
        return data

    def refused(self, response: httpx.Response) -> None:
        """A non-200 answer: FetchError at once unless it is retryable; note its Retry-After."""
        self.last, self.status, self.cause = f"HTTP {response.status_code}", response.status_code, None
        if not is_retryable(response.status_code):
            raise self.error(self.last, status=response.status_code, reason="status")
        self.retry_after = retry_after_seconds(response.headers.get("Retry-After"), self.clock())

    def unreachable(self, exc: httpx.HTTPError) -> None:
        self.last, self.status, self.cause = f"{type(exc).__name__}: {exc}", None, exc

    def give_up(self) -> FetchError:
        plural = "s" if self.attempts != 1 else ""
        error = self.error(f"giving up after {self.attempts} attempt{plural} ({self.last})", status=self.status,
                           reason="status" if self.status is not None else "unreachable")
        error.__cause__ = self.cause
        return error


def fetch_with_backoff(
    client: httpx.Client,
    url: str,
    *,
    attempts: int = 4,
    backoff_base: float = 0.5,
    backoff_max: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], datetime] = _utc_now,
    max_bytes: int = DEFAULT_MAX_BYTES,
    what: str = "upstream",
    on_attempt: Callable[[], None] | None = None,
) -> Fetched:
    """GET ``url`` (absolute, or relative to the client's base_url) per the module docstring.

    ``what`` names the service in error messages; ``on_attempt`` is called before every request
    (for counters); ``clock`` dates an HTTP-date Retry-After. Raises FetchError, whose ``status`` and
    ``reason`` say what the last attempt met.
    """
    state = _Attempts(url, what=what, attempts=attempts, backoff_base=backoff_base, backoff_max=backoff_max,
                      clock=clock, max_bytes=max_bytes, on_attempt=on_attempt)
    while state.another():
        try:
            with client.stream("GET", url) as response:
                if response.status_code == 200:
                    return Fetched(url, response.headers, b"".join([state.chunk(c) for c in response.iter_bytes()]))
                state.refused(response)
        except httpx.HTTPError as exc:
            state.unreachable(exc)
        if (pause := state.pause()) is not None:
            sleep(pause)
    raise state.give_up()


async def afetch_with_backoff(
    client: httpx.AsyncClient,
    url: str,
    *,
    attempts: int = 4,
    backoff_base: float = 0.5,
    backoff_max: float = 30.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], datetime] = _utc_now,
    max_bytes: int = DEFAULT_MAX_BYTES,
    what: str = "upstream",
    on_attempt: Callable[[], None] | None = None,
) -> Fetched:
    """fetch_with_backoff for an httpx.AsyncClient: the same rules and errors."""
    state = _Attempts(url, what=what, attempts=attempts, backoff_base=backoff_base, backoff_max=backoff_max,
                      clock=clock, max_bytes=max_bytes, on_attempt=on_attempt)
    while state.another():
        try:
            async with client.stream("GET", url) as response:
                if response.status_code == 200:
                    body = b"".join([state.chunk(c) async for c in response.aiter_bytes()])
                    return Fetched(url, response.headers, body)
                state.refused(response)
        except httpx.HTTPError as exc:
            state.unreachable(exc)
        if (pause := state.pause()) is not None:
            await sleep(pause)
    raise state.give_up()


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` in one step: readers see the old file or the new one, never a part.

    The bytes go to a temporary file in the same directory (so os.replace stays on one file system),
    which is removed again if anything fails. Parent directories are created as needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")  # short: cache names can be long
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
