"""Ollama driver: discovery from ``/api/tags``, add with ``/api/pull`` (streamed), remove with ``/api/delete``.

Cards follow what Ollama's own OpenAI-compatible ``/v1/models`` shows (openai/openai.go): ``id`` = the tag
name, ``created`` = ``modified_at`` in Unix seconds, ``owned_by`` = the name's namespace (``library`` for
official models).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import httpx
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from enclave.backends.base import (
    Backend,
    ModelCard,
    check_model_name,
    describe_transport_error,
    quote_text,
)
from enclave.backends.errors import BackendUnavailable, ModelNotFound, PullError, PullModelNotFound

DEFAULT_NAMESPACE = "library"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# Ollama's message when its registry has no manifest for the name (server/images.go pullModelManifest).
_MANIFEST_MISSING = "file does not exist"


def ollama_namespace(name: str) -> str:
    """Namespace of an Ollama model name, as Ollama's ``model.ParseName`` splits it.

    ``[scheme://][host/][namespace/]model[:tag][@digest]``: the model is the last ``/`` segment, the namespace
    the one before it, the rest is the host. ``llama3.2:3b`` -> ``library``; ``jdoe/m:1`` -> ``jdoe``;
    ``registry.example/ns/m:tag`` -> ``ns``; ``hf.co/bartowski/Qwen-GGUF:Q4_K_M`` -> ``bartowski``.
    """
    reference = name.split("@", 1)[0]
    segments = reference.split("/")
    if len(segments) < 2 or not segments[-2]:
        return DEFAULT_NAMESPACE
    return segments[-2]


def unix_seconds(moment: datetime) -> int:
    """Whole seconds since the epoch, floored (Go's ``Time.Unix()``), exact for any fraction."""
    return (moment - _EPOCH) // timedelta(seconds=1)


class _Details(BaseModel):
    model_config = ConfigDict(extra="ignore")
    parent_model: str = ""
    format: str = ""
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class _Tag(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)
    model: str | None = None
    modified_at: AwareDatetime
    size: int = Field(ge=0)
    digest: str = ""
    details: _Details = Field(default_factory=_Details)


class _Tags(BaseModel):
    model_config = ConfigDict(extra="ignore")
    models: list[_Tag] | None  # Ollama renders an empty list as null in some versions


class OllamaBackend(Backend):
    kind: ClassVar[str] = "ollama"
    can_pull: ClassVar[bool] = True
    can_delete: ClassVar[bool] = True

    async def discover(self) -> list[ModelCard]:
        tags: _Tags = self.parse(_Tags, await self.get_json("/api/tags"), "GET /api/tags")
        cards: dict[str, ModelCard] = {}
        for tag in tags.models or []:
            if tag.name in cards:
                continue
            details = tag.details
            cards[tag.name] = ModelCard(
                id=tag.name,
                created=unix_seconds(tag.modified_at),
                owned_by=ollama_namespace(tag.name),
                backend=self.name,
                kind=self.kind,
                extras={
                    "size": tag.size,
                    "digest": tag.digest,
                    "modified_at": tag.modified_at.isoformat(),
                    "format": details.format,
                    "family": details.family,
                    "families": tuple(details.families or ()),
                    "parameter_size": details.parameter_size,
                    "quantization_level": details.quantization_level,
                    "parent_model": details.parent_model,
                },
            )
        return list(cards.values())

    async def pull(self, model: str) -> AsyncIterator[dict[str, Any]]:  # type: ignore[override]
        """Stream Ollama's progress objects as they arrive; an ``{"error": ...}`` line, a broken line or a
        stream that ends before ``success`` raises ``PullError`` (``PullModelNotFound`` for an unknown name)."""
        check_model_name(model)
        timeout = httpx.Timeout(self.config.pull_timeout, connect=self.config.connect_timeout)
        succeeded = False
        try:
            async with self.client().stream(
                "POST", "/api/pull", json={"model": model, "stream": True}, timeout=timeout
            ) as response:
                if response.status_code != 200:
                    body = await response.aread()
                    raise self._pull_failure(model, _error_text(body) or f"HTTP {response.status_code}")
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        progress = json.loads(line)
                    except json.JSONDecodeError:
                        raise PullError(self.name, model, f"malformed progress line: {quote_text(line)}") from None
                    if not isinstance(progress, dict):
                        raise PullError(self.name, model, f"malformed progress line: {quote_text(line)}")
                    if "error" in progress:
                        raise self._pull_failure(model, str(progress["error"]))
                    yield progress
                    if progress.get("status") == "success":
                        succeeded = True
        except httpx.HTTPError as exc:
            raise BackendUnavailable(self.name, describe_transport_error(exc, self.config)) from None
        if not succeeded:
            raise PullError(self.name, model, "the progress stream ended before success")

    def _pull_failure(self, model: str, message: str) -> PullError:
        if _MANIFEST_MISSING in message:
            return PullModelNotFound(self.name, model, message)
        return PullError(self.name, model, message)

    async def delete(self, model: str) -> None:
        check_model_name(model)
        try:
            response = await self.client().request("DELETE", "/api/delete", json={"model": model})
        except httpx.HTTPError as exc:
            raise BackendUnavailable(self.name, describe_transport_error(exc, self.config)) from None
        if response.status_code == 200:
            return
        if response.status_code == 404:
            raise ModelNotFound(model, self.name, _error_text(response.content) or None)
        raise BackendUnavailable(self.name, self.describe_status("DELETE /api/delete", response.status_code,
                                                                 response.content))


def _error_text(body: bytes) -> str:
    """Ollama's ``{"error": "..."}`` message, or a short excerpt of whatever came instead."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return quote_text(body)
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return quote_text(data["error"])
    return quote_text(body)
