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

Inference (server/routes.go ChatHandler/GenerateHandler/EmbedHandler/EmbeddingsHandler/ShowHandler/PsHandler,
api/types.go; bodies and lines in ``tests.fakes.ollama_inference``). Go's encoding/json: compact, HTML-safe
escapes (``<`` as ``\u003c``), ``omitempty`` fields absent when zero; ``model`` echoes the name as sent.

* ``POST /api/chat`` / ``/api/generate``: ``stream`` defaults to **true**: ``application/x-ndjson``, one object
  per line — chat ``{model, created_at, message: {role: "assistant", content: tok}, done: false}``, generate
  ``{model, created_at, response: tok, done: false}`` — and a final line with ``done: true``, ``done_reason``
  (``"stop"``, or ``"length"`` when ``options.num_predict`` cut it), ``total_duration``, ``load_duration``,
  ``prompt_eval_count``, ``prompt_eval_duration``, ``eval_count``, ``eval_duration`` (ns); generate's also has
  ``context: [ints]``. ``stream: false``: one object with the whole content and the final fields
  (``application/json; charset=utf-8``). ``suffix``, ``raw``, ``system``, ``images``, ``think`` are accepted
  (``requests`` shows them). A chat tool call (``tools`` sent, ``tool_call`` control set):
  ``message.tool_calls [{function: {index, name, arguments: {...}}}]`` (arguments an object, not a string).
  Unknown model: 404 ``{"error": "model \"<name>\" not found, try pulling it first"}``; no model: 400
  ``model is required``. A model used is "loaded" (see ``/api/ps``).
* Mid-stream failures arrive as an ``{"error": "..."}`` line inside the 200 stream (control
  ``error_line_after``, message ``error_message``), and the stream ends there.
* ``POST /api/embed`` ``{model, input: str | [str]}`` -> ``{model, embeddings: [[...]], total_duration,
  load_duration, prompt_eval_count}`` (L2-normalised vectors); ``POST /api/embeddings`` (legacy)
  ``{model, prompt}`` -> ``{embedding: [...]}`` (not normalised).
* ``POST /api/show`` ``{model}`` (or legacy ``{name}``) -> ``{license, modelfile, parameters, template,
  details, model_info, capabilities, modified_at}``; unknown: 404 ``{"error": "model '<name>' not found"}``.
* ``GET /api/ps`` -> ``{models: [{name, model, size, digest, details, expires_at, size_vram,
  context_length}]}`` for the loaded models (control ``loaded``: names).
* OpenAI compatibility (openai/openai.go and its middleware): ``POST /v1/chat/completions``,
  ``/v1/completions`` (``suffix`` honoured), ``/v1/embeddings``. Ids ``chatcmpl-<n>`` / ``cmpl-<n>``
  (n < 999), ``system_fingerprint: "fp_ollama"``, ``usage {prompt_tokens, completion_tokens, total_tokens}``
  always in non-streamed bodies. Streams (``stream`` defaults to false here): ``text/event-stream``, one chunk
  per token with ``delta {role: "assistant", content: tok}``, a final chunk with empty content and
  ``finish_reason``; the usage chunk (``choices: []``) only with ``stream_options.include_usage``; then
  ``data: [DONE]``. Errors in the envelope ``{"error": {message, type, param: null, code: null}}`` with type
  ``invalid_request_error`` (400), ``not_found_error`` (404) or ``api_error``. With ``error_line_after`` a /v1
  stream gets ``data: {"error": {...api_error...}}`` and ends without ``[DONE]`` (a simplification: the real
  middleware renders the native error line less tidily).

Test controls beyond the shared ones (``answering``, ``delay``, ``malformed``, ``requests`` and the inference
controls of FakeBackend): ``catalog`` (what ``/api/pull`` can fetch), ``pull_error`` (an error line injected
after the first layer progress), ``pull_step_delay`` (seconds between progress lines), ``add_model()`` /
``remove_model()``, ``capabilities`` (name -> list, overriding the default), ``loaded``, ``error_line_after``,
``error_message``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes import ollama_inference as shapes
from tests.fakes.base import FakeBackend, as_json_safe
from tests.fakes.generation import (count_prompt_tokens, embedding_for, embedding_inputs, limit_tokens,
                                    text_of)
from tests.fakes.streaming import Reply
from tests.fakes.wire import go_json, ndjson_line, parse_json_object, rfc3339_nano, sse_event

GO_JSON = "application/json; charset=utf-8"
NDJSON = "application/x-ndjson"
DEFAULT_CONTEXT_LENGTH = 4096

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
        self.capabilities: dict[str, list[str]] = {}
        self.loaded: set[str] = set()
        self.error_line_after: int | None = None
        self.error_message = "an error was encountered while running the model: unexpected EOF"
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
                Route("/api/chat", self._chat, methods=["POST"]),
                Route("/api/generate", self._generate, methods=["POST"]),
                Route("/api/embed", self._embed, methods=["POST"]),
                Route("/api/embeddings", self._embeddings, methods=["POST"]),
                Route("/api/show", self._show, methods=["POST"]),
                Route("/api/ps", self._ps, methods=["GET"]),
                Route("/v1/chat/completions", self._openai_chat, methods=["POST"]),
                Route("/v1/completions", self._openai_completions, methods=["POST"]),
                Route("/v1/embeddings", self._openai_embeddings, methods=["POST"]),
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

    # inference: common -------------------------------------------------------------------------------
    def _native_error(self, status: int, message: str) -> Response:
        return self.reply(Reply(status=status, media_type=GO_JSON, body=go_json({"error": message})))

    def _openai_error(self, status: int, message: str) -> Response:
        return self.reply(Reply(status=status, media_type=GO_JSON, body=shapes.openai_error(status, message)))

    async def _accept(self, request: Request, *, openai: bool) -> tuple[dict[str, Any], str] | Response:
        """(JSON body, model as sent) of an inference request, or Ollama's error answer; marks the model loaded."""
        fail = self._openai_error if openai else self._native_error
        payload = parse_json_object(await self._record(request))
        if payload is None:
            return fail(400, "invalid character in request body")
        name = payload.get("model") or payload.get("name")
        if not isinstance(name, str) or not name:
            return fail(400, "model is required")
        with self._state_lock:
            known = normalize_name(name) in self._models
        if not known:
            return fail(404, f'model "{name}" not found, try pulling it first')
        if self.upstream_status is not None:
            return fail(*self.upstream_status)
        with self._state_lock:
            self.loaded.add(normalize_name(name))
        return payload, name

    def _generation(self, model: str, seed: Any, prompt: Any, limit: Any, tools: Any) -> shapes.OllamaGeneration:
        tokens, cut = limit_tokens(self.generated_tokens([normalize_name(model), seed]), limit)
        calls_tool = bool(tools) and self.tool_call is not None
        return shapes.OllamaGeneration(model=model, tokens=[] if calls_tool else tokens,
                                       prompt_tokens=count_prompt_tokens(prompt),
                                       done_reason="length" if cut and not calls_tool else "stop",
                                       tool_call=self.tool_call if calls_tool else None)

    @staticmethod
    def _num_predict(payload: dict[str, Any]) -> Any:
        options = payload.get("options")
        return options.get("num_predict") if isinstance(options, dict) else None

    def _native_answer(self, payload: dict[str, Any], whole: dict[str, Any], lines: list[bytes]) -> Response:
        if payload.get("stream", True) is False:
            return self.reply(Reply(media_type=GO_JSON, body=go_json(whole)))
        error = ndjson_line(go_json({"error": self.error_message}))
        return self.reply(Reply(media_type=NDJSON, events=lines, error_line=error))

    # native routes -------------------------------------------------------------------------------------
    async def _chat(self, request: Request) -> Response:
        accepted = await self._accept(request, openai=False)
        if isinstance(accepted, Response):
            return accepted
        payload, model = accepted
        messages = payload.get("messages") or []
        gen = self._generation(model, messages, messages, self._num_predict(payload), payload.get("tools"))
        return self._native_answer(payload, shapes.chat_final(gen, "".join(gen.tokens)), shapes.chat_lines(gen))

    async def _generate(self, request: Request) -> Response:
        accepted = await self._accept(request, openai=False)
        if isinstance(accepted, Response):
            return accepted
        payload, model = accepted
        seed = [payload.get(k) for k in ("prompt", "suffix", "system", "raw")]
        gen = self._generation(model, seed, [payload.get("system") or "", payload.get("prompt") or ""],
                               self._num_predict(payload), None)
        return self._native_answer(payload, shapes.generate_final(gen, "".join(gen.tokens)),
                                   shapes.generate_lines(gen))

    async def _embed(self, request: Request) -> Response:
        accepted = await self._accept(request, openai=False)
        if isinstance(accepted, Response):
            return accepted
        payload, model = accepted
        raw = payload.get("input")
        inputs = [] if raw in (None, "", []) else embedding_inputs(raw)
        if inputs is None:
            return self._native_error(400, "invalid input type")
        vectors = [embedding_for([normalize_name(model), i], self.embedding_dim, normalize=True) for i in inputs]
        count = sum(count_prompt_tokens(i) for i in inputs)
        body: dict[str, Any] = {"model": model, "embeddings": vectors}
        if inputs:
            body.update(total_duration=14_000_000 + 1_000_000 * count, load_duration=12_345_678,
                        prompt_eval_count=count)
        return self.reply(Reply(media_type=GO_JSON, body=go_json(body)))

    async def _embeddings(self, request: Request) -> Response:
        accepted = await self._accept(request, openai=False)
        if isinstance(accepted, Response):
            return accepted
        payload, model = accepted
        prompt = payload.get("prompt") or ""
        vector = embedding_for([normalize_name(model), prompt], self.embedding_dim) if prompt else []
        return self.reply(Reply(media_type=GO_JSON, body=go_json({"embedding": vector})))

    def _capabilities_of(self, entry: dict[str, Any]) -> list[str]:
        if entry["name"] in self.capabilities:
            return list(self.capabilities[entry["name"]])
        family = entry["details"]["family"]
        if "embed" in entry["name"] or family.endswith("bert"):
            return ["embedding"]
        return ["completion", "tools", "insert"] if family == "qwen2" else ["completion", "tools"]

    async def _show(self, request: Request) -> Response:
        payload = parse_json_object(await self._record(request))
        if payload is None:
            return JSONResponse({"error": "invalid character in request body"}, status_code=400)
        name = payload.get("model") or payload.get("name")
        if not isinstance(name, str) or not name:
            return JSONResponse({"error": "model is required"}, status_code=400)
        with self._state_lock:
            entry = as_json_safe(self._models.get(normalize_name(name)))
        if entry is None:
            return Response(go_json({"error": f"model '{name}' not found"}), 404, media_type=GO_JSON)
        family = entry["details"]["family"]
        show = {
            "license": "LLAMA 3.2 COMMUNITY LICENSE AGREEMENT (fake)",
            "modelfile": f'# Modelfile generated by "ollama show"\nFROM {entry["name"]}\nTEMPLATE {{{{ .Prompt }}}}\n',
            "parameters": 'stop                           "<|eot_id|>"',
            "template": "{{ if .System }}{{ .System }}{{ end }}{{ .Prompt }}",
            "details": entry["details"],
            "model_info": {"general.architecture": family, "general.parameter_count": 3212749888,
                           f"{family}.context_length": 131072, f"{family}.embedding_length": 3072},
            "capabilities": self._capabilities_of(entry),
            "modified_at": entry["modified_at"],
        }
        return Response(go_json(show), media_type=GO_JSON)

    async def _ps(self, request: Request) -> Response:
        await self._seen(request)
        expires = rfc3339_nano(datetime.now(timezone.utc).replace(microsecond=0) + timedelta(minutes=5))
        with self._state_lock:
            entries = [as_json_safe(self._models[n]) for n in sorted(self.loaded) if n in self._models]
        models = [{"name": e["name"], "model": e["model"], "size": e["size"], "digest": e["digest"],
                   "details": e["details"], "expires_at": expires, "size_vram": e["size"],
                   "context_length": DEFAULT_CONTEXT_LENGTH} for e in entries]
        return Response(go_json({"models": models}), media_type=GO_JSON)

    # OpenAI compatibility -----------------------------------------------------------------------------
    def _openai_answer(self, payload: dict[str, Any], body: bytes, events: list[bytes]) -> Response:
        if payload.get("stream") is not True:
            return self.reply(Reply(media_type=GO_JSON, body=body))
        error = {"message": self.error_message, "type": "api_error", "param": None, "code": None}
        return self.reply(Reply(media_type="text/event-stream", events=events,
                                error_line=sse_event(go_json({"error": error}))))

    @staticmethod
    def _include_usage(payload: dict[str, Any]) -> bool:
        options = payload.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    async def _openai_chat(self, request: Request) -> Response:
        accepted = await self._accept(request, openai=True)
        if isinstance(accepted, Response):
            return accepted
        payload, model = accepted
        messages = payload.get("messages") or []
        gen = self._generation(model, messages, messages, payload.get("max_tokens"), payload.get("tools"))
        request_id = shapes.openai_id("chatcmpl")
        return self._openai_answer(payload, shapes.openai_chat_body(gen, request_id),
                                   shapes.openai_chat_events(gen, request_id, self._include_usage(payload)))

    async def _openai_completions(self, request: Request) -> Response:
        accepted = await self._accept(request, openai=True)
        if isinstance(accepted, Response):
            return accepted
        payload, model = accepted
        seed = [payload.get("prompt"), payload.get("suffix") or "", None, False]
        gen = self._generation(model, seed, payload.get("prompt") or "", payload.get("max_tokens"), None)
        request_id = shapes.openai_id("cmpl")
        return self._openai_answer(payload, shapes.openai_completion_body(gen, request_id),
                                   shapes.openai_completion_events(gen, request_id, self._include_usage(payload)))

    async def _openai_embeddings(self, request: Request) -> Response:
        accepted = await self._accept(request, openai=True)
        if isinstance(accepted, Response):
            return accepted
        payload, model = accepted
        inputs = embedding_inputs(payload.get("input"))
        if not inputs:
            return self._openai_error(400, "invalid input")
        vectors = [embedding_for([normalize_name(model), i], self.embedding_dim, normalize=True) for i in inputs]
        count = sum(count_prompt_tokens(text_of(i)) for i in inputs)
        return self.reply(Reply(media_type=GO_JSON, body=shapes.openai_embeddings_body(model, vectors, count)))

