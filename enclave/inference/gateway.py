"""From an admitted request to the backend's answer: body rewrite, backend call, relay, usage, record.

Access has been decided by the router before anything here runs (``enclave.access``); this module only moves
bytes and counts tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starlette.responses import Response

from enclave.backends.base import BackendConfig
from enclave.inference.body import ClientBody, domain_cache_salt, upstream_body
from enclave.inference.editors import OpenAIStreamEditor, edit_openai_body
from enclave.inference.framing import NDJSON_TERMINATORS, SSE_TERMINATORS, EventSplitter
from enclave.inference.record import InferenceRecord, Recorder
from enclave.inference.relay import CANCELLED, COMPLETED, StreamEditor, StreamRelay, ndjson_error_ending, sse_error_ending
from enclave.inference.upstream import BackendConnections, UpstreamFailure, Upstreams
from enclave.inference.usage import Usage, estimate, prompt_text_bytes
from enclave.metrics import Metrics

#: The OpenAI routes the gateway serves, relative to ``/v1/`` on the client side and on the backend.
OPENAI_ROUTES = ("chat/completions", "completions", "embeddings")
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
NO_USAGE = Usage(0, 0, 0)
#: The status recorded for a request whose client left before its answer (nginx's convention).
CLIENT_CLOSED = 499


@dataclass(frozen=True)
class StreamFormat:
    """How a route's streams are framed and ended: SSE for the OpenAI routes, NDJSON for Ollama's."""

    media_type: str
    terminators: tuple[bytes, ...]
    error_ending: Callable[[str, bytes], bytes]


SSE = StreamFormat("text/event-stream", SSE_TERMINATORS, sse_error_ending)
NDJSON = StreamFormat("application/x-ndjson", NDJSON_TERMINATORS, ndjson_error_ending)


class Gateway:
    def __init__(self, backends: Sequence[BackendConfig], metrics: Metrics) -> None:
        self.upstreams = Upstreams(backends)
        self.recorder = Recorder(metrics)

    async def aclose(self) -> None:
        await self.upstreams.aclose()

    def connections(self, backend: str) -> BackendConnections:
        connections = self.upstreams.get(backend)
        if connections is None:   # the registry routes to a backend this gateway was not configured with
            raise UpstreamFailure(503, "backend_unavailable", "The model's backend is not available.")
        return connections

    async def forward(self, record: InferenceRecord, connections: BackendConnections, path: str, payload: bytes, *,
                      stream: bool, fmt: StreamFormat, editor: StreamEditor,
                      usage_of: Callable[[StreamEditor | None, bytes | None], Usage]) -> Response:
        """Send ``payload`` and answer with the relayed stream or the whole body. ``usage_of(editor, None)``
        gives a stream's usage when it ends, ``usage_of(None, body)`` a whole body's. ``UpstreamFailure``
        before the first byte."""
        headers = {"x-request-id": record.request_id}
        try:
            upstream = await connections.open(path, payload, accept=fmt.media_type if stream else "application/json")
        except UpstreamFailure as failure:
            self.recorder.finish(record, NO_USAGE, outcome="refused", status=failure.status, ttft=None)
            raise
        except asyncio.CancelledError:   # the client left (``unless_client_leaves``)
            self.recorder.finish(record, NO_USAGE, outcome=CANCELLED, status=CLIENT_CLOSED, ttft=None)
            raise
        if stream and upstream.content_type.split(";")[0].strip() == fmt.media_type:
            def finished(outcome: str, ttft: float | None, sent_sha256: str) -> None:
                record.response_sha256 = sent_sha256
                self.recorder.finish(record, usage_of(editor, None), outcome=outcome, status=200, ttft=ttft)

            return StreamRelay(upstream, splitter=EventSplitter(fmt.terminators), editor=editor,
                               error_ending=fmt.error_ending, media_type=upstream.content_type,
                               headers={**SSE_HEADERS, **headers}, started=record.started, on_finish=finished)
        try:
            body = await upstream.read_all()
        except UpstreamFailure as failure:
            self.recorder.finish(record, NO_USAGE, outcome="backend_error", status=failure.status, ttft=None)
            raise
        except asyncio.CancelledError:
            self.recorder.finish(record, NO_USAGE, outcome=CANCELLED, status=CLIENT_CLOSED, ttft=None)
            raise
        finally:
            await upstream.aclose()
        answer, usage = body, usage_of(None, body)
        if isinstance(editor, OpenAIStreamEditor) and editor.strip_tool_calls:
            answer, _ = edit_openai_body(body, strip_tool_calls=True)
        record.response_sha256 = hashlib.sha256(answer).hexdigest()   # the exact body the Response sends
        self.recorder.finish(record, usage, outcome=COMPLETED, status=200,
                             ttft=time.perf_counter() - record.started)
        return Response(answer, status_code=200, media_type=upstream.content_type, headers=headers)

    async def openai(self, route: str, record: InferenceRecord, body: ClientBody, domain_id: str) -> Response:
        """An OpenAI route (``OPENAI_ROUTES``) on the backend serving ``record.model``: both kinds serve the OpenAI
        API under ``/v1`` (Ollama's compatibility layer)."""
        connections = self.connections(record.backend)
        config = connections.config
        salt = domain_cache_salt(domain_id) if config.cache_salt else None
        payload = upstream_body(body, ask_usage=route != "embeddings", cache_salt=salt)
        editor = OpenAIStreamEditor(drop_usage_chunk=not body.wants_usage, strip_tool_calls=config.kind == "vllm")
        prompt_bytes = prompt_text_bytes(body.doc)

        def usage_of(stream_editor: StreamEditor | None, whole: bytes | None) -> Usage:
            if whole is not None:
                return openai_body_usage(whole, prompt_bytes)
            assert isinstance(stream_editor, OpenAIStreamEditor)
            return stream_editor.usage or estimate(prompt_bytes, stream_editor.text_events)

        return await self.forward(record, connections, f"/v1/{route}", payload, stream=body.stream, fmt=SSE,
                                  editor=editor, usage_of=usage_of)


def openai_body_usage(body: bytes, prompt_bytes: int) -> Usage:
    """A whole OpenAI answer's usage, or an estimate from its generated text when it reports none."""
    _, usage = edit_openai_body(body, strip_tool_calls=False)
    if usage is not None:
        return usage
    text = 0
    try:
        doc = json.loads(body)
        for choice in doc.get("choices") or ():
            message = choice.get("message") or {}
            for part in (message.get("content"), choice.get("text")):
                if isinstance(part, str):
                    text += len(part.encode())
    except (ValueError, AttributeError, TypeError):
        text = len(body)
    estimated = estimate(prompt_bytes, 0)
    completion = -(-text // 4)
    return Usage(estimated.prompt_tokens, completion, estimated.prompt_tokens + completion, estimated=True)
