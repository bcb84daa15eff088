"""Errors on the Ollama-native routes in Ollama's shape, ``{"error": "..."}``, with the same status and headers.

Every other part of the service answers errors in the OpenAI envelope, including the parts that run before
routing (authentication before the body, size limits, unknown routes, 405). Rather than teach each of them a
second shape, this middleware sits outside them and rewrites an error answer under ``/proxy/{domain}/api/``
from the envelope to Ollama's shape. Successful answers (streams included) pass through untouched; only a
JSON answer with status 400 or more is held until complete, and such answers are small.
"""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from enclave.inference.editors import compact

NATIVE_PATH = re.compile(r"^/proxy/[^/]+/api(?:/|$)")
#: Longest error body rewritten; a longer one (never ours) is replaced by a generic message.
MAX_ERROR_BODY = 64 * 1024
GENERIC_MESSAGE = "request failed"


def ollama_error(body: bytes) -> bytes:
    """``{"error": "<message>"}`` from an OpenAI envelope (an Ollama-shaped body is kept as it is)."""
    try:
        doc = json.loads(body) if len(body) <= MAX_ERROR_BODY else None
    except (UnicodeDecodeError, ValueError):
        doc = None
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return compact({"error": error["message"]})
    if isinstance(error, str):
        return compact({"error": error})
    return compact({"error": GENERIC_MESSAGE})


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k.lower() == b"content-type" and v.split(b";")[0].strip() == b"application/json" for k, v in headers)


class OllamaErrorShape:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not NATIVE_PATH.match(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        chunks: list[bytes] = []
        size = 0

        async def reshape(message: Message) -> None:
            nonlocal held, size
            if message["type"] == "http.response.start" and message["status"] >= 400 \
                    and _is_json(list(message.get("headers", []))):
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= MAX_ERROR_BODY:
                chunks.append(chunk)
            if message.get("more_body", False):
                return
            body = ollama_error(b"".join(chunks) if size <= MAX_ERROR_BODY else b"")
            headers = [(k, v) for k, v in held.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, reshape)
