"""A wire-faithful fake of the Ollama HTTP API (real Ollama cannot run in the test environment).

Real behaviour mirrored (Ollama 0.12.x, server/routes.go and openai/openai.go; docs.ollama.com/api):

* ``GET /`` and ``HEAD /`` answer 200 ``Ollama is running`` (text/plain).
* ``GET /api/version`` -> ``{"version": "0.12.6"}``.
* ``GET /api/tags`` -> ``{"models": [{name, model, modified_at, size, digest, details{parent_model, format,
  family, families, parameter_size, quantization_level}}]}``, newest ``modified_at`` first; ``modified_at`` is
  Go RFC3339Nano with a zone offset (nanosecond fraction), ``digest`` is bare sha256 hex.
* ``POST /api/pull`` ``{"model"|"name", "stream"}``: ``stream`` defaults to true and the answer is
  ``application/x-ndjson`` with status 200 *before* the outcome is known, so failures arrive as an
  ``{"error": ...}`` line inside the 200 stream: ``pulling manifest``, then per layer
  ``{"status": "pulling <12 hex>", "digest": "sha256:<hex>", "total": n}`` followed by lines with
  ``completed`` (Go ``omitempty`` drops ``completed`` while it is 0), ``verifying sha256 digest``,
  ``writing manifest``, ``success``. A name absent from the registry gives ``pulling manifest`` then
  ``{"error": "pull model manifest: file does not exist"}``. ``stream: false`` gives one JSON object
  (``{"status": "success"}``, or 500 ``{"error": ...}``). A missing name is 400 ``{"error": "model is required"}``.
  Names without a tag get ``:latest``, as Ollama's ParseName does.
* ``DELETE /api/delete`` ``{"model"|"name"}`` -> 200 with an empty body, or 404
  ``{"error": "model '<name as sent>' not found"}``.
* ``GET /v1/models`` (OpenAI compatibility) -> ``{"object": "list", "data": [{"id": name, "object": "model",
  "created": modified_at as Unix seconds, "owned_by": namespace ("library" for official models)}]}``;
  ``GET /v1/models/{name}`` the same card, or 404 in the OpenAI envelope with ``type`` ``not_found_error``.
* No authentication (Ollama's API has none).

Test controls beyond the shared ones (``answering``, ``delay``, ``malformed``, ``requests``): ``catalog``
(what ``/api/pull`` can fetch), ``pull_error`` (an error line injected after the first layer progress),
``pull_step_delay`` (seconds between progress lines), ``add_model()`` / ``remove_model()``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.base import FakeBackend, as_json_safe

OLLAMA_VERSION = "0.12.6"
DEFAULT_MODIFIED_AT = "2025-03-14T09:26:53.589793238+01:00"


def normalize_name(name: str) -> str:
    """Ollama's short display name: the tag defaults to ``latest`` (the host/namespace stay as given)."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def namespace_of(name: str) -> str:
    """The namespace part of ``[host/][namespace/]model[:tag]``; ``library`` when absent."""
    parts = name.split("/")
    return parts[-2] if len(parts) >= 2 else "library"


def rfc3339_nano(moment: datetime) -> str:
    """Go's time.RFC3339Nano rendering (nanosecond fraction, trailing zeros trimmed, ``Z`` for UTC)."""
    base = moment.strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{moment.microsecond:06d}000".rstrip("0")
    offset = moment.strftime("%z")
    zone = "Z" if offset in ("+0000", "") else f"{offset[:3]}:{offset[3:]}"
    return f"{base}{'.' + fraction if fraction else ''}{zone}"


def ollama_model(
    name: str,
    *,
    modified_at: str = DEFAULT_MODIFIED_AT,
    size: int = 2_019_393_189,
    digest: str | None = None,
    family: str = "llama",
    parameter_size: str = "3.2B",
    quantization_level: str = "Q4_K_M",
    parent_model: str = "",
) -> dict[str, Any]:
    """One ``/api/tags`` entry shaped exactly as Ollama renders it."""
    full = normalize_name(name)
    return {
        "name": full,
        "model": full,
        "modified_at": modified_at,
        "size": size,
        "digest": digest or hashlib.sha256(full.encode()).hexdigest(),
        "details": {
            "parent_model": parent_model,
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": parameter_size,
            "quantization_level": quantization_level,
        },
    }


def _complete(entry: dict[str, Any]) -> dict[str, Any]:
    """Fill a partial entry (at least ``name``) with Ollama's other fields."""
    entry = as_json_safe(entry)
    base = ollama_model(entry["name"])
    details = {**base["details"], **entry.get("details", {})}
    merged = {**base, **entry, "details": details}
    merged["name"] = normalize_name(merged["name"])
    merged.setdefault("model", merged["name"])
    return merged


def default_models() -> list[dict[str, Any]]:
    return [
        ollama_model("llama3.2:3b", modified_at="2025-03-14T09:26:53.589793238+01:00"),
        ollama_model(
            "jdoe/tinyllama:1.1b", modified_at="2024-11-02T18:01:07.12Z", size=637_700_138, parameter_size="1.1B"
        ),
        ollama_model(
            "hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M",
            modified_at="2025-01-20T07:45:00-05:00",
            size=397_807_936,
            family="qwen2",
            parameter_size="494.03M",
        ),
    ]


def default_catalog() -> list[dict[str, Any]]:
    return [
        ollama_model("qwen2.5:0.5b", size=397_821_319, family="qwen2", parameter_size="494.03M"),
        ollama_model("nomic-embed-text:v1.5", size=274_302_450, family="nomic-bert", parameter_size="137M",
                     quantization_level="F16"),
        ollama_model("llama3.2:3b"),
    ]


class FakeOllama(FakeBackend):
    """Ollama on a loopback socket; see the module docstring for the real behaviour mirrored."""

    name = "fake-ollama"

    def __init__(self, models: list[dict] | None = None, *, catalog: list[dict] | None = None) -> None:
        self._models: dict[str, dict[str, Any]] = {}
        self.catalog: dict[str, dict[str, Any]] = {}
        self.pull_error: str | None = None
        self.pull_step_delay: float = 0.0
        super().__init__()
        for entry in default_models() if models is None else models:
            self.add_model(entry)
        for entry in default_catalog() if catalog is None else catalog:
            complete = _complete(entry)
            self.catalog[complete["name"]] = complete

    # model set ---------------------------------------------------------------------------------
    def add_model(self, entry: dict[str, Any] | str) -> dict[str, Any]:
        complete = _complete({"name": entry} if isinstance(entry, str) else entry)
        with self._state_lock:
            self._models[complete["name"]] = complete
        return complete

    def remove_model(self, name: str) -> None:
        with self._state_lock:
            self._models.pop(normalize_name(name), None)

    @property
    def model_names(self) -> list[str]:
        with self._state_lock:
            return sorted(self._models)

    def tags(self) -> list[dict[str, Any]]:
        with self._state_lock:
            entries = [as_json_safe(m) for m in self._models.values()]
        entries.sort(key=lambda m: datetime.fromisoformat(m["modified_at"]).timestamp(), reverse=True)
        return entries

    # ASGI app ------------------------------------------------------------------------------------
    def _build_app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/", self._root, methods=["GET", "HEAD"]),
                Route("/api/version", self._version, methods=["GET"]),
                Route("/api/tags", self._tags, methods=["GET", "HEAD"]),
                Route("/api/pull", self._pull, methods=["POST"]),
                Route("/api/delete", self._delete, methods=["DELETE"]),
                Route("/v1/models", self._openai_list, methods=["GET"]),
                Route("/v1/models/{model:path}", self._openai_get, methods=["GET"]),
            ]
        )

    async def _root(self, request: Request) -> Response:
        await self._seen(request)
        return PlainTextResponse("Ollama is running")

    async def _version(self, request: Request) -> Response:
        await self._seen(request)
        return JSONResponse({"version": OLLAMA_VERSION})

    async def _tags(self, request: Request) -> Response:
        await self._seen(request)
        return self.listing_response({"models": self.tags()})

    @staticmethod
    def _openai_card(entry: dict[str, Any]) -> dict[str, Any]:
        created = int(datetime.fromisoformat(entry["modified_at"]).timestamp() // 1)
        return {"id": entry["name"], "object": "model", "created": created, "owned_by": namespace_of(entry["name"])}

    async def _openai_list(self, request: Request) -> Response:
        await self._seen(request)
        return self.listing_response({"object": "list", "data": [self._openai_card(m) for m in self.tags()]})

    async def _openai_get(self, request: Request) -> Response:
        await self._seen(request)
        name = request.path_params["model"]
        with self._state_lock:
            entry = self._models.get(normalize_name(name))
        if entry is None:
            error = {"message": f"model '{name}' not found", "type": "not_found_error", "param": None, "code": None}
            return JSONResponse({"error": error}, status_code=404)
        return JSONResponse(self._openai_card(entry))

    async def _model_request(self, request: Request) -> tuple[str, dict[str, Any]] | Response:
        """(model name, JSON body) of a delete or pull, or Ollama's 400 answer when the body names none."""
        body = await self._seen(request)
        try:
            payload = json.loads(body or b"{}")
        except json.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            return JSONResponse({"error": "invalid character in request body"}, status_code=400)
        name = payload.get("model") or payload.get("name")
        if not isinstance(name, str) or not name:
            return JSONResponse({"error": "model is required"}, status_code=400)
        return name, payload

    async def _delete(self, request: Request) -> Response:
        asked = await self._model_request(request)
        if isinstance(asked, Response):
            return asked
        name, _ = asked
        with self._state_lock:
            found = self._models.pop(normalize_name(name), None)
        if found is None:
            return JSONResponse({"error": f"model '{name}' not found"}, status_code=404)
        return Response(status_code=200)

    async def _pull(self, request: Request) -> Response:
        asked = await self._model_request(request)
        if isinstance(asked, Response):
            return asked
        name, payload = asked
        stream = payload.get("stream", True) is not False
        if not stream:
            last: dict[str, Any] = {}
            async for line in self._pull_progress(normalize_name(name)):
                last = line
                if "error" in line:
                    return JSONResponse(line, status_code=500)
            return JSONResponse(last)

        async def ndjson() -> AsyncIterator[bytes]:
            async for line in self._pull_progress(normalize_name(name)):
                yield json.dumps(line, separators=(",", ":")).encode() + b"\n"

        return StreamingResponse(ndjson(), media_type="application/x-ndjson")

    async def _pull_progress(self, name: str) -> AsyncIterator[dict[str, Any]]:
        async def step(line: dict[str, Any]) -> dict[str, Any]:
            if self.pull_step_delay:
                await asyncio.sleep(self.pull_step_delay)
            return line

        yield await step({"status": "pulling manifest"})
        entry = self.catalog.get(name)
        if entry is None:
            yield await step({"error": "pull model manifest: file does not exist"})
            return
        layers = [
            (entry["digest"], int(entry["size"])),
            (hashlib.sha256(b"params" + name.encode()).hexdigest(), 96),
        ]
        for index, (digest, total) in enumerate(layers):
            yield await step({"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}", "total": total})
            for part in (1, 2, 3):
                completed = total * part // 3
                yield await step(
                    {"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}", "total": total,
                     "completed": completed}
                )
            if index == 0 and self.pull_error:
                yield await step({"error": self.pull_error})
                return
        yield await step({"status": "verifying sha256 digest"})
        yield await step({"status": "writing manifest"})
        added = dict(entry, modified_at=rfc3339_nano(datetime.now(timezone.utc)))
        with self._state_lock:
            self._models[name] = added
        yield await step({"status": "success"})
