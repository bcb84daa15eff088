"""What the gateway changes in a backend's answer, event by event, and what it learns from it (usage).

Changes are few and named: the usage-only chunk the gateway asked for is removed when the client did not ask
for usage; vLLM's empty ``tool_calls: []`` arrays are removed (clients such as the AI SDK treat an empty list
as a tool call in progress). Every other event is forwarded as the very bytes the backend sent; only events
that may need a change are parsed at all.
"""

from __future__ import annotations

import json
import re
from typing import Any

from enclave.inference.usage import Usage, find_openai_usage, usage_from_ollama, usage_from_openai

_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_EMPTY_TOOL_CALLS = re.compile(rb'"tool_calls"\s*:\s*\[\s*\]')
# A chunk that carries no generated text: the role-only first delta, an empty final delta, an empty text.
_NO_TEXT = re.compile(rb'"(?:content|text)"\s*:\s*(?:""|null)\s*[,}]|"delta"\s*:\s*\{\s*\}')
_DONE_TRUE = re.compile(rb'"done"\s*:\s*true')
_ERROR_KEY = re.compile(rb'^\s*\{\s*"error"\s*:')


def compact(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def strip_empty_tool_calls(doc: Any) -> bool:
    """Remove ``tool_calls: []`` from every choice's message and delta; True when something was removed."""
    changed = False
    choices = doc.get("choices") if isinstance(doc, dict) else None
    for choice in choices if isinstance(choices, list) else ():
        for part in ("message", "delta"):
            holder = choice.get(part) if isinstance(choice, dict) else None
            if isinstance(holder, dict) and holder.get("tool_calls") == []:
                del holder["tool_calls"]
                changed = True
    return changed


def edit_openai_body(body: bytes, *, strip_tool_calls: bool) -> tuple[bytes, Usage | None]:
    """A non-streamed OpenAI answer: its usage, and the body with vLLM's empty tool_calls removed."""
    usage = find_openai_usage(body)
    if strip_tool_calls and _EMPTY_TOOL_CALLS.search(body):
        try:
            doc = json.loads(body)
        except ValueError:
            return body, usage
        if strip_empty_tool_calls(doc):
            body = compact(doc)
    return body, usage


class OpenAIStreamEditor:
    """SSE events of a chat/completions stream. ``edit`` returns the bytes to forward (None: drop)."""

    def __init__(self, *, drop_usage_chunk: bool, strip_tool_calls: bool) -> None:
        self.drop_usage_chunk = drop_usage_chunk
        self.strip_tool_calls = strip_tool_calls
        self.usage: Usage | None = None
        self.text_events = 0
        self.done = False

    def edit(self, event: bytes) -> bytes | None:
        if event.startswith(b"data: [DONE]") or event.startswith(b"data:[DONE]"):
            self.done = True
            return event
        has_usage = _USAGE_OBJECT.search(event) is not None
        strip = self.strip_tool_calls and _EMPTY_TOOL_CALLS.search(event) is not None
        if not has_usage and not strip:
            if event.startswith(b"data:") and _NO_TEXT.search(event) is None:
                self.text_events += 1
            return event
        return self._edit_parsed(event, has_usage, strip)

    def _edit_parsed(self, event: bytes, has_usage: bool, strip: bool) -> bytes | None:
        lines = event.splitlines(keepends=True)
        data_at = [i for i, line in enumerate(lines) if line.startswith(b"data:")]
        if len(data_at) != 1:
            return event
        line = lines[data_at[0]]
        payload = line[5:].strip()
        try:
            doc = json.loads(payload)
        except ValueError:
            return event
        if not isinstance(doc, dict):
            return event
        choices = doc.get("choices")
        if has_usage:
            usage = usage_from_openai(doc.get("usage"))
            if usage is not None:
                self.usage = usage
            if self.drop_usage_chunk and choices == []:
                return None
        if isinstance(choices, list) and choices and _NO_TEXT.search(payload) is None:
            self.text_events += 1
        if strip and strip_empty_tool_calls(doc):
            ending = line[len(line.rstrip(b"\r\n")):]
            lines[data_at[0]] = b"data: " + compact(doc) + ending
            return b"".join(lines)
        return event


class OllamaStreamEditor:
    """NDJSON lines of an Ollama stream: the final ``done: true`` line carries the counts. Lines are never
    changed."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.text_events = 0
        self.done = False
        self.backend_error = False

    def edit(self, line: bytes) -> bytes | None:
        if _DONE_TRUE.search(line) is not None:
            try:
                doc = json.loads(line)
            except ValueError:
                return line
            if isinstance(doc, dict) and doc.get("done") is True:
                self.done = True
                self.usage = usage_from_ollama(doc)
            return line
        if _ERROR_KEY.match(line) is not None:
            self.backend_error = True
        elif line.strip():
            self.text_events += 1
        return line


def ollama_body_usage(body: bytes) -> Usage | None:
    """Counts of a non-streamed Ollama answer (chat, generate, embed)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return usage_from_ollama(doc) if isinstance(doc, dict) else None
