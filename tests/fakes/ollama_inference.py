"""Ollama 0.12's inference bodies and lines: native (api/types.go) and OpenAI-compatible (openai/openai.go).

Go's encoding/json writes struct fields in declaration order and drops ``omitempty`` fields that are zero; the
dicts below are built in that order and leave such fields out. Durations are integer nanoseconds.
"""

from __future__ import annotations

import json
import random
import string
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from tests.fakes.wire import SSE_DONE, go_json, ndjson_line, rfc3339_nano, sse_event


def now_rfc3339() -> str:
    return rfc3339_nano(datetime.now(timezone.utc))


@dataclass
class OllamaGeneration:
    """What the fake "generated" for one request (``model`` as the client sent it: Ollama echoes it)."""

    model: str
    tokens: list[str]
    prompt_tokens: int
    done_reason: str  # "stop" | "length"
    tool_call: tuple[str, str] | None = None

    def metrics(self) -> dict[str, int]:
        load, prompt_eval = 12_345_678, 1_000_000 * self.prompt_tokens
        evaluation = 20_000_000 * max(1, len(self.tokens))
        metrics = {"total_duration": load + prompt_eval + evaluation + 1_500_000, "load_duration": load,
                   "prompt_eval_count": self.prompt_tokens, "prompt_eval_duration": prompt_eval,
                   "eval_count": len(self.tokens), "eval_duration": evaluation}
        return {name: value for name, value in metrics.items() if value}  # omitempty

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens),
                "total_tokens": self.prompt_tokens + len(self.tokens)}


# native /api/chat and /api/generate --------------------------------------------------------------------
def _native_tool_calls(gen: OllamaGeneration) -> list[dict[str, Any]]:
    name, arguments = gen.tool_call or ("", "{}")
    return [{"function": {"index": 0, "name": name, "arguments": json.loads(arguments)}}]


def chat_line(gen: OllamaGeneration, content: str) -> dict[str, Any]:
    return {"model": gen.model, "created_at": now_rfc3339(), "message": {"role": "assistant", "content": content},
            "done": False}


def chat_final(gen: OllamaGeneration, content: str = "") -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if gen.tool_call and content == "":
        message["tool_calls"] = _native_tool_calls(gen)
    return {"model": gen.model, "created_at": now_rfc3339(), "message": message, "done_reason": gen.done_reason,
            "done": True, **gen.metrics()}


def chat_lines(gen: OllamaGeneration) -> list[bytes]:
    if gen.tool_call:
        tool_line = chat_line(gen, "")
        tool_line["message"]["tool_calls"] = _native_tool_calls(gen)
        final = chat_final(gen)
        final["message"].pop("tool_calls", None)
        return [ndjson_line(go_json(tool_line)), ndjson_line(go_json(final))]
    lines = [ndjson_line(go_json(chat_line(gen, token))) for token in gen.tokens]
    return lines + [ndjson_line(go_json(chat_final(gen)))]


def generate_line(gen: OllamaGeneration, response: str) -> dict[str, Any]:
    return {"model": gen.model, "created_at": now_rfc3339(), "response": response, "done": False}


def generate_final(gen: OllamaGeneration, response: str = "") -> dict[str, Any]:
    context = [128006 + (i * 7919) % 1000 for i in range(gen.prompt_tokens + len(gen.tokens))]
    return {"model": gen.model, "created_at": now_rfc3339(), "response": response, "done": True,
            "done_reason": gen.done_reason, "context": context, **gen.metrics()}


def generate_lines(gen: OllamaGeneration) -> list[bytes]:
    lines = [ndjson_line(go_json(generate_line(gen, token))) for token in gen.tokens]
    return lines + [ndjson_line(go_json(generate_final(gen)))]


# OpenAI compatibility (/v1/...) ------------------------------------------------------------------------
def openai_id(prefix: str) -> str:
    """Ollama's ids: ``chatcmpl-`` / ``cmpl-`` + ``rand.Intn(999)``."""
    return f"{prefix}-{random.randrange(999)}"


def openai_error(status: int, message: str) -> bytes:
    """``openai.NewError``: 400 invalid_request_error, 404 not_found_error, else api_error; param/code null."""
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return go_json({"error": {"message": message, "type": kind, "param": None, "code": None}})


def _openai_tool_calls(gen: OllamaGeneration) -> list[dict[str, Any]]:
    name, arguments = gen.tool_call or ("", "{}")
    call_id = "call_" + "".join(random.choices(string.ascii_lowercase + string.digits, k=8))
    return [{"id": call_id, "index": 0, "type": "function",
             "function": {"name": name, "arguments": json.dumps(json.loads(arguments), separators=(",", ":"))}}]


def openai_chat_body(gen: OllamaGeneration, request_id: str) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": "".join(gen.tokens)}
    finish = gen.done_reason
    if gen.tool_call:
        message["tool_calls"] = _openai_tool_calls(gen)
        finish = "tool_calls"
    return go_json({"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": gen.model,
                    "system_fingerprint": "fp_ollama",
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": gen.usage()})


def _usage_event(gen: OllamaGeneration, request_id: str, obj: str) -> bytes:
    return sse_event(go_json({"id": request_id, "object": obj, "created": int(time.time()), "model": gen.model,
                              "system_fingerprint": "fp_ollama", "choices": [], "usage": gen.usage()}))


def openai_chat_chunk(gen: OllamaGeneration, request_id: str, delta: dict[str, Any], finish: str | None) -> bytes:
    return sse_event(go_json({"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                              "model": gen.model, "system_fingerprint": "fp_ollama",
                              "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}))


def openai_chat_events(gen: OllamaGeneration, request_id: str, include_usage: bool) -> list[bytes]:
    if gen.tool_call:
        events = [openai_chat_chunk(gen, request_id, {"role": "assistant", "content": "",
                                                      "tool_calls": _openai_tool_calls(gen)}, None)]
        final = "tool_calls"
    else:
        events = [openai_chat_chunk(gen, request_id, {"role": "assistant", "content": t}, None) for t in gen.tokens]
        final = gen.done_reason
    events.append(openai_chat_chunk(gen, request_id, {"role": "assistant", "content": ""}, final))
    if include_usage:
        events.append(_usage_event(gen, request_id, "chat.completion.chunk"))
    return events + [SSE_DONE]


def openai_completion_body(gen: OllamaGeneration, request_id: str) -> bytes:
    return go_json({"id": request_id, "object": "text_completion", "created": int(time.time()), "model": gen.model,
                    "system_fingerprint": "fp_ollama",
                    "choices": [{"text": "".join(gen.tokens), "index": 0, "finish_reason": gen.done_reason}],
                    "usage": gen.usage()})


def openai_completion_chunk(gen: OllamaGeneration, request_id: str, text: str, finish: str | None) -> bytes:
    # CompletionChunk declares choices before model.
    return sse_event(go_json({"id": request_id, "object": "text_completion", "created": int(time.time()),
                              "choices": [{"text": text, "index": 0, "finish_reason": finish}], "model": gen.model,
                              "system_fingerprint": "fp_ollama"}))


def openai_completion_events(gen: OllamaGeneration, request_id: str, include_usage: bool) -> list[bytes]:
    events = [openai_completion_chunk(gen, request_id, token, None) for token in gen.tokens]
    events.append(openai_completion_chunk(gen, request_id, "", gen.done_reason))
    if include_usage:
        events.append(_usage_event(gen, request_id, "text_completion"))
    return events + [SSE_DONE]


def openai_embeddings_body(model: str, vectors: list[list[float]], prompt_tokens: int) -> bytes:
    data = [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)]
    return go_json({"object": "list", "data": data, "model": model,
                    "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})
