"""Every response carries ``x-request-id``: the one id the logs, the usage record and (later) the ledger and
receipts name a request by. Made here, outermost, so refusals (401, 404, 413, 429...) carry one too; a client's own
``x-request-id`` header is never taken (it would let one request be confused with another in the records)."""

from __future__ import annotations

import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = b"x-request-id"


def request_id_of(request: Any) -> str:
    """The id ``RequestIdMiddleware`` gave this request (a fresh one where the app runs without it)."""
    state = request.scope.get("state") or {}
    return state.get("request_id") or uuid.uuid4().hex


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        value = request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(name.lower() == REQUEST_ID_HEADER for name, _ in headers):
                    message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, value)]}
            await send(message)

        await self.app(scope, receive, send_with_id)
