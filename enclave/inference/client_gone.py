"""Giving up on the backend the moment the client goes away before a stream starts.

A streamed answer watches the client itself once it is relaying (``StreamRelay``); before that — queued for a
slot, waiting for the backend's first byte, or reading a non-streamed answer that takes minutes to generate —
nothing would notice, so a client could leave a backend generating (and holding a slot) for nobody.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected while ``unless_client_leaves`` waited; the work was cancelled."""


async def unless_client_leaves(receive: Receive, work: Awaitable[T]) -> T:
    """``await work``, cancelled at once when the client disconnects (then ``ClientGone``). Call it only once
    the request body has been read: from then on ``receive`` reports nothing but the disconnect."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        raise ClientGone() from None
    finally:
        watcher.cancel()
