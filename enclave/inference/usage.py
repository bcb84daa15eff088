"""Token usage of one inference request, exact when the backend reported it and flagged when estimated.

Never a silent zero: a backend that reports nothing (the llama.cpp server ignores
``stream_options.include_usage``) yields counts estimated from what was relayed, with ``estimated=True``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

#: Bytes per token assumed by estimates (a common rule of thumb for English text; only ever flagged as such).
BYTES_PER_TOKEN = 4
#: The largest count a backend may report (2**53 - 1: exact in every JSON reader, and sums of a few stay within
#: the ledger's 64-bit columns). A larger one is no count: the usage is estimated instead.
MAX_REPORTED_TOKENS = 2**53 - 1

_USAGE_KEY = re.compile(rb'"usage"\s*:\s*\{')
_decoder = json.JSONDecoder()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens, "estimated": self.estimated}


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_REPORTED_TOKENS:
        return value
    return None


def usage_from_openai(obj: Any) -> Usage | None:
    """An OpenAI ``usage`` object (chat, completions, embeddings) as Usage; None when it is not one."""
    if not isinstance(obj, dict):
        return None
    prompt = _count(obj.get("prompt_tokens"))
    if prompt is None:
        return None
    completion = _count(obj.get("completion_tokens"))
    completion = 0 if completion is None else completion   # embeddings report none: there is no completion
    total = _count(obj.get("total_tokens"))
    return Usage(prompt, completion, prompt + completion if total is None else total)


def find_openai_usage(body: bytes) -> Usage | None:
    """The top-level ``usage`` of an OpenAI JSON body, without parsing the whole body (an embeddings answer can
    be megabytes of floats): the last ``"usage": {`` key is decoded in place. A JSON string cannot contain an
    unescaped quote, so the pattern only matches keys."""
    last = None
    for last in _USAGE_KEY.finditer(body):
        pass
    if last is None:
        return None
    try:
        value, _ = _decoder.raw_decode(body[last.end() - 1:].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return usage_from_openai(value)


def usage_from_ollama(final: dict[str, Any]) -> Usage | None:
    """Counts from Ollama's final object (``done: true``). Go's ``omitempty`` drops a zero count, so an absent
    ``prompt_eval_count`` beside a present ``eval_count`` is an exact 0 (a fully cached prompt)."""
    completion = _count(final.get("eval_count"))
    prompt = _count(final.get("prompt_eval_count"))
    if completion is None and prompt is None:
        return None
    prompt, completion = prompt or 0, completion or 0
    return Usage(prompt, completion, prompt + completion)


def estimate(prompt_bytes: int, completion_events: int) -> Usage:
    """The estimate used when a backend reported nothing: the prompt's text bytes / 4, one token per relayed
    content event (streaming servers send one token per event)."""
    prompt = -(-prompt_bytes // BYTES_PER_TOKEN)
    completion = max(completion_events, 0)
    return Usage(prompt, completion, prompt + completion, estimated=True)


def prompt_text_bytes(body: dict[str, Any]) -> int:
    """UTF-8 bytes of what a request asks the model to read: messages, prompt, input, system, suffix, and the
    JSON of its tool definitions and response format; a token id counts as one token's bytes (a prompt given as
    token ids was estimated as no prompt at all)."""
    total = 0

    def add(value: Any) -> None:
        nonlocal total
        if isinstance(value, str):
            total += len(value.encode("utf-8", "replace"))
        elif isinstance(value, int) and not isinstance(value, bool):   # a token id (prompt or input as token ids)
            total += BYTES_PER_TOKEN
        elif isinstance(value, list):
            for item in value:
                add(item)
        elif isinstance(value, dict):
            add(value.get("content"))
            add(value.get("text"))

    for key in ("messages", "prompt", "input", "system", "suffix"):
        add(body.get(key))
    # Tool definitions are rendered into the prompt too (an agent's tools can outweigh its messages).
    for key in ("tools", "functions", "response_format"):
        if body.get(key) is not None:
            total += len(json.dumps(body[key], ensure_ascii=False, separators=(",", ":")).encode())
    return total
