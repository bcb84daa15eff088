"""vLLM 0.11's inference bodies and stream events, field for field (see FakeVllm's docstring for the sources).

vLLM renders non-streamed answers with ``model_dump()`` (every field, ``null`` included), chat stream chunks with
``model_dump_json(exclude_unset=True)`` (only the fields it set), completion stream chunks with
``exclude_unset=False`` (every field, ``"usage": null`` included) and the final usage chunk with
``exclude_none=True`` (no ``prompt_tokens_details``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from tests.fakes.wire import SSE_DONE, pydantic_json, sse_event


def random_hex() -> str:
    """vLLM's ``random_uuid()``: 32 hex digits."""
    return uuid.uuid4().hex


def error_type(status: int) -> str:
    return {400: "BadRequestError", 401: "Unauthorized", 404: "NotFoundError", 422: "UnprocessableEntityError",
            429: "TooManyRequestsError", 503: "ServiceUnavailableError"}.get(status, "InternalServerError")


def error_body(status: int, message: str, err_type: str | None = None) -> bytes:
    """vLLM >= 0.9's ``ErrorResponse``: the OpenAI envelope with ``code`` = the HTTP status as an int."""
    kind = err_type or error_type(status)
    return pydantic_json({"error": {"message": message, "type": kind, "param": None, "code": status}})


@dataclass
class Generation:
    """What the fake "generated" for one request."""

    request_id: str
    model: str
    tokens: list[str]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length" | "tool_calls"
    tool_call: tuple[str, str] | None = None
    include_usage: bool = False

    @property
    def created(self) -> int:
        return int(time.time())

    def usage(self, *, details: bool = True) -> dict[str, Any]:
        completion = len(self.tokens)
        usage: dict[str, Any] = {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens + completion,
                                 "completion_tokens": completion}
        if details:
            usage["prompt_tokens_details"] = None
        return usage


def _tool_calls(gen: Generation) -> list[dict[str, Any]]:
    name, arguments = gen.tool_call or ("", "")
    return [{"id": f"chatcmpl-tool-{random_hex()}", "type": "function",
             "function": {"name": name, "arguments": arguments}}]


def chat_body(gen: Generation) -> bytes:
    content = None if gen.tool_call else "".join(gen.tokens)
    message = {"role": "assistant", "content": content, "refusal": None, "annotations": None, "audio": None,
               "function_call": None, "tool_calls": _tool_calls(gen) if gen.tool_call else [],
               "reasoning_content": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": gen.finish_reason,
              "stop_reason": None, "token_ids": None}
    return pydantic_json({
        "id": gen.request_id, "object": "chat.completion", "created": gen.created, "model": gen.model,
        "choices": [choice], "service_tier": None, "system_fingerprint": None, "usage": gen.usage(),
        "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None,
    })


def _usage_event(gen: Generation, obj: str) -> bytes:
    return sse_event(pydantic_json({"id": gen.request_id, "object": obj, "created": gen.created,
                                    "model": gen.model, "choices": [], "usage": gen.usage(details=False)}))


def chat_events(gen: Generation) -> list[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None, last: bool = False) -> bytes:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        if last:
            choice["stop_reason"] = None
        return sse_event(pydantic_json({"id": gen.request_id, "object": "chat.completion.chunk",
                                        "created": gen.created, "model": gen.model, "choices": [choice]}))

    events = [chunk({"role": "assistant", "content": ""})]
    if gen.tool_call:
        name, arguments = gen.tool_call
        events.append(chunk({"tool_calls": [{"id": f"chatcmpl-tool-{random_hex()}", "type": "function", "index": 0,
                                             "function": {"name": name}}]}))
        third = max(1, len(arguments) // 3)
        for start in range(0, len(arguments), third):
            events.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments[start:start + third]}}]}))
        events.append(chunk({}, gen.finish_reason, last=True))
    else:
        for index, token in enumerate(gen.tokens):
            last = index == len(gen.tokens) - 1
            events.append(chunk({"content": token}, gen.finish_reason if last else None, last=last))
        if not gen.tokens:
            events.append(chunk({"content": ""}, gen.finish_reason, last=True))
    if gen.include_usage:
        events.append(_usage_event(gen, "chat.completion.chunk"))
    events.append(SSE_DONE)
    return events


def completion_body(gen: Generation) -> bytes:
    choice = {"index": 0, "text": "".join(gen.tokens), "logprobs": None, "finish_reason": gen.finish_reason,
              "stop_reason": None, "prompt_logprobs": None, "prompt_token_ids": None, "token_ids": None}
    return pydantic_json({
        "id": gen.request_id, "object": "text_completion", "created": gen.created, "model": gen.model,
        "choices": [choice], "service_tier": None, "system_fingerprint": None, "usage": gen.usage(),
        "kv_transfer_params": None,
    })


def completion_events(gen: Generation) -> list[bytes]:
    events = []
    tokens = gen.tokens or [""]
    for index, token in enumerate(tokens):
        last = index == len(tokens) - 1
        choice = {"index": 0, "text": token, "logprobs": None, "finish_reason": gen.finish_reason if last else None,
                  "stop_reason": None, "prompt_token_ids": None, "token_ids": None}
        events.append(sse_event(pydantic_json({"id": gen.request_id, "object": "text_completion",
                                               "created": gen.created, "model": gen.model, "choices": [choice],
                                               "usage": None})))
    if gen.include_usage:
        events.append(_usage_event(gen, "text_completion"))
    events.append(SSE_DONE)
    return events


def embeddings_body(request_id: str, model: str, vectors: list[list[float]], prompt_tokens: int) -> bytes:
    data = [{"index": i, "object": "embedding", "embedding": v} for i, v in enumerate(vectors)]
    return pydantic_json({
        "id": request_id, "object": "list", "created": int(time.time()), "model": model, "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0,
                  "prompt_tokens_details": None},
    })
