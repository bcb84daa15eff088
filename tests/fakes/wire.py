"""JSON and framing as the real servers put them on the wire (pydantic for vLLM, Go's encoding/json for Ollama)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

SSE_DONE = b"data: [DONE]\n\n"


def pydantic_json(value: Any) -> bytes:
    """pydantic's ``model_dump_json``: compact, UTF-8 (no ``\\u`` escapes for non-ASCII)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def go_json(value: Any) -> bytes:
    """Go's ``json.Marshal``: compact, UTF-8, and HTML-safe (``<``, ``>``, ``&``, U+2028/9 escaped).

    Replacing the characters in the rendered text is exact: outside strings JSON never contains them.
    """
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text.encode()


def sse_event(encoded: bytes) -> bytes:
    """One server-sent event carrying a JSON document (``data: ...`` and the blank line)."""
    return b"data: " + encoded + b"\n\n"


def ndjson_line(encoded: bytes) -> bytes:
    return encoded + b"\n"


def parse_json_object(body: bytes) -> dict[str, Any] | None:
    """The request body as a JSON object, or None when it is not one."""
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def rfc3339_nano(moment: datetime) -> str:
    """Go's time.RFC3339Nano rendering (nanosecond fraction, trailing zeros trimmed, ``Z`` for UTC)."""
    base = moment.strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{moment.microsecond:06d}000".rstrip("0")
    offset = moment.strftime("%z")
    zone = "Z" if offset in ("+0000", "") else f"{offset[:3]}:{offset[3:]}"
    return f"{base}{'.' + fraction if fraction else ''}{zone}"
