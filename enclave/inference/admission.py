"""At most N requests in flight per backend; a bounded FIFO queue behind them; refusal beyond it.

A slot is handed from the finishing request straight to the oldest waiter, so a waiter is never overtaken
by a newcomer. Cancellation (the client went away while queued) leaves the queue without losing a slot.
"""

from __future__ import annotations

import asyncio
import collections
import math


class Overloaded(Exception):
    """No slot within the queue's bounds; ``retry_after`` is a suggested wait in whole seconds."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Admission:
    def __init__(self, max_in_flight: int, max_queued: int, queue_timeout: float) -> None:
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def _retry_after(self) -> int:
        return max(1, math.ceil(min(self.queue_timeout, 30.0)))

    async def acquire(self) -> None:
        if self.in_flight < self.max_in_flight and not self._waiters:
            self.in_flight += 1
            return
        if len(self._waiters) >= self.max_queued:
            raise Overloaded(f"{self.in_flight} requests in flight and {len(self._waiters)} queued",
                             self._retry_after())
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # the slot arrived as the deadline fired: keep it
            self._leave(waiter)
            raise Overloaded(f"no slot within {self.queue_timeout:g} s", self._retry_after()) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot, but the request is gone: pass it on
            else:
                self._leave(waiter)
            raise

    def _leave(self, waiter: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass
        waiter.cancel()

    def release(self) -> None:
        """Give the slot to the oldest live waiter, else free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)   # the slot moves over; in_flight is unchanged
                return
        self.in_flight -= 1
