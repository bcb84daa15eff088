"""The client's JSON body: what the gateway reads from it, owns in it, and sends on.

The gateway owns ``model`` (checked against the caller's access; forwarded unchanged) and ``priority``
(dropped, so no client jumps the backend's queue); it sets ``stream_options.include_usage`` on streams so
every stream is counted, and vLLM's ``cache_salt`` when the backend asks for per-domain salts. Every other
field reaches the backend with its meaning unchanged (the body is re-encoded, never reinterpreted).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from enclave.inference.editors import compact

#: Fields a client may not set for itself.
DROPPED_FIELDS = ("priority",)


class BodyError(Exception):
    """The body cannot be relayed: ``code`` and ``param`` as the OpenAI envelope names them."""

    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@dataclass
class ClientBody:
    doc: dict[str, Any]
    model: str
    stream: bool
    wants_usage: bool


def parse_body(raw: bytes, *, stream_default: bool = False, model_keys: tuple[str, ...] = ("model",)) -> ClientBody:
    """The parsed body; ``BodyError`` for a body that is not a JSON object with a model. ``model_keys``: where
    the model may be named (Ollama's legacy ``name``)."""
    if not raw.strip():
        raise BodyError("The request body is empty; send a JSON object.", "invalid_json")
    try:
        doc = json.loads(raw, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BodyError("The request body is not valid JSON.", "invalid_json") from None
    if not isinstance(doc, dict):
        raise BodyError("The request body must be a JSON object.", "invalid_json")
    model = next((doc[key] for key in model_keys if doc.get(key) is not None), None)
    if model is None:
        raise BodyError("You must provide a model parameter.", "missing_required_parameter", "model")
    if not isinstance(model, str) or not model:
        raise BodyError("`model` must be a non-empty string.", "invalid_type", "model")
    stream = doc.get("stream", stream_default)
    if not isinstance(stream, bool):
        raise BodyError("`stream` must be a boolean.", "invalid_type", "stream")
    options = doc.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BodyError("`stream_options` must be an object.", "invalid_type", "stream_options")
    wants_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
    return ClientBody(doc, model, stream, wants_usage)


def domain_cache_salt(domain_id: str) -> str:
    """The prefix-cache salt of a domain: fixed per domain, and set by the gateway alone, so another tenant
    can neither choose it nor share it."""
    return hashlib.sha256(b"cube-ai/cache-salt/" + domain_id.encode()).hexdigest()


def upstream_body(body: ClientBody, *, ask_usage: bool, cache_salt: str | None) -> bytes:
    """The JSON sent to the backend (see the module docstring for what changes)."""
    doc = dict(body.doc)
    for name in DROPPED_FIELDS:
        doc.pop(name, None)
    if ask_usage and body.stream:
        doc["stream_options"] = {**(doc.get("stream_options") or {}), "include_usage": True}
    if cache_salt is not None:
        doc["cache_salt"] = cache_salt
    return compact(doc)
