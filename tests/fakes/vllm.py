"""A wire-faithful fake of vLLM's OpenAI-compatible server (real vLLM cannot run in the test environment).

Real behaviour mirrored (vllm/entrypoints/openai: engine/protocol.py ModelCard/ModelList/ModelPermission,
models/serving.py show_available_models, the ``--api-key`` authentication middleware, serve/instrumentator):

* ``GET /v1/models`` -> ``ModelList {"object": "list", "data": [ModelCard...]}``. A base model card has
  ``id`` (served name), ``object: "model"``, ``created = int(time.time())`` *at request time* (so it changes on
  every call), ``owned_by: "vllm"``, ``root`` (the model path), ``parent: null``, ``max_model_len`` and
  ``permission: [ModelPermission]`` with a fresh ``modelperm-<uuid hex>`` id each time. A LoRA adapter card has
  ``root`` = adapter path, ``parent`` = the base model's served name and ``max_model_len: null``.
* ``--api-key``: requests to ``/v1/...`` must carry ``Authorization: Bearer <key>``; the key is compared as a
  SHA-256 digest with a constant-time comparison, and a failure is 401 ``{"error": "Unauthorized"}`` (not the
  OpenAI envelope). ``/health``, ``/ping`` and ``/version`` stay public.
* ``GET /health`` -> 200 with an empty body (503 empty when the engine is dead: ``healthy = False`` here).
* ``GET /version`` -> ``{"version": "0.11.0"}``.
* vLLM has no endpoint to add or delete models: its models are fixed at launch (LoRA aside).

Inference (vllm/entrypoints/openai protocol.py, serving_chat.py, serving_completion.py, serving_embedding.py,
api_server.py exception handlers; bodies in ``tests.fakes.vllm_inference``):

* ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` behind the same ``--api-key`` check.
  Ids are ``chatcmpl-`` / ``cmpl-`` / ``embd-`` + the ``X-Request-Id`` header when sent, else 32 hex digits.
  An absent ``model`` means the first served model.
* Non-streamed chat: every field of ``ChatCompletionResponse`` including the nulls, and vLLM's quirk
  ``message.tool_calls: []`` (an empty list) when there is no tool call. A tool call (``tools`` in the request,
  ``tool_choice`` not ``"none"``, the ``tool_call`` control set) gives ``content: null``,
  ``tool_calls: [{id: "chatcmpl-tool-<hex>", type: "function", function: {name, arguments}}]`` and
  ``finish_reason: "tool_calls"``.
* Streams (``stream: true``): ``text/event-stream; charset=utf-8``, ``data: <compact json>\n\n`` per event,
  ``data: [DONE]\n\n`` last. Chat chunks carry only the fields vLLM sets: first ``delta {role: "assistant",
  content: ""}``, then one ``delta {content: tok}`` per token, the last with ``finish_reason`` and
  ``stop_reason``; **no** ``usage`` key in them even with ``include_usage`` (vLLM sets ``usage`` only for
  ``continuous_usage_stats``, unlike OpenAI's ``"usage": null``). Completion chunks carry every field, so
  ``"usage": null`` is in each. With ``stream_options.include_usage`` one extra chunk ``choices: []`` with
  ``usage {prompt_tokens, total_tokens, completion_tokens}`` comes before ``[DONE]``. A streamed tool call:
  a ``delta.tool_calls [{id, type, index: 0, function: {name}}]`` chunk, then ``{index: 0, function:
  {arguments: <fragment>}}`` chunks, then an empty delta with ``finish_reason: "tool_calls"``.
* ``max_tokens`` (or ``max_completion_tokens``) cuts the tokens: ``finish_reason: "length"``.
* ``suffix`` on completions: vLLM 0.11 rejects it, 400 ``suffix is not currently supported`` (control
  ``accept_suffix = True`` makes the fake a server that accepts it, as llama.cpp's does; ``requests`` shows it).
* Embeddings: ``input`` a string, a list of strings, a token array or a list of them; one deterministic vector
  per input; ``usage.completion_tokens: 0``.
* Errors: the ``ErrorResponse`` envelope of vLLM >= 0.9 (the current one; older releases sent
  ``{"object": "error", "message", "type", "param", "code"}``): ``{"error": {"message", "type", "param": null,
  "code": <HTTP status as int>}}``. Unknown model: 404 ``The model `<id>` does not exist.``, type
  ``NotFoundError``; a body that is not a JSON object: 400, type ``Bad Request`` (the request-validation
  handler uses the status phrase).

Test controls beyond the shared ones (``answering``, ``delay``, ``malformed``, ``requests`` and the inference
controls of FakeBackend): ``served`` (the cards' static fields; edit through ``set_served()``), ``healthy``,
``accept_suffix``.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes import vllm_inference as shapes
from tests.fakes.base import FakeBackend, as_json_safe
from tests.fakes.generation import count_prompt_tokens, embedding_for, embedding_inputs, limit_tokens
from tests.fakes.streaming import Reply
from tests.fakes.wire import parse_json_object

VLLM_VERSION = "0.11.0"
BASE_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def vllm_model(id: str, *, root: str | None = None, max_model_len: int = 8192) -> dict[str, Any]:
    """A served base model: ``root`` defaults to the served name (vLLM's default when no --served-model-name)."""
    return {"id": id, "root": root or id, "parent": None, "max_model_len": max_model_len}


def vllm_lora(id: str, *, parent: str, root: str | None = None) -> dict[str, Any]:
    """A LoRA adapter (``--lora-modules id=path``): parent = base served name, no max_model_len."""
    return {"id": id, "root": root or f"/adapters/{id}", "parent": parent, "max_model_len": None}


def default_served() -> list[dict[str, Any]]:
    return [
        vllm_model(BASE_MODEL, root="/models/Llama-3.1-8B-Instruct", max_model_len=131072),
        vllm_lora("sql-lora", parent=BASE_MODEL, root="/adapters/sql-lora"),
    ]


def _permission(created: int) -> dict[str, Any]:
    return {
        "id": f"modelperm-{uuid.uuid4().hex}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }


class FakeVllm(FakeBackend):
    """vLLM on a loopback socket; see the module docstring for the real behaviour mirrored."""

    name = "fake-vllm"
    guarded_prefixes = ("/v1", "/v2", "/inference", "/cohere")

    def __init__(self, served: list[dict] | None = None, api_key: str | None = None) -> None:
        self._served: list[dict[str, Any]] = []
        self._key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.healthy = True
        self.accept_suffix = False
        super().__init__()
        self.set_served(default_served() if served is None else served)

    def set_served(self, served: list[dict[str, Any]]) -> None:
        cards = []
        for entry in served:
            card = {"parent": None, "max_model_len": None, **as_json_safe(entry)}
            card.setdefault("root", card["id"])
            cards.append(card)
        with self._state_lock:
            self._served = cards

    @property
    def served_ids(self) -> list[str]:
        with self._state_lock:
            return [c["id"] for c in self._served]

    def _build_app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/ping", self._health, methods=["GET", "POST"]),
                Route("/version", self._version, methods=["GET"]),
            ]
        )

    def _authorized(self, request: Request) -> bool:
        if self._key_digest is None or not request.url.path.startswith(self.guarded_prefixes):
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return secrets.compare_digest(hashlib.sha256(token.encode()).digest(), self._key_digest)

    async def _models(self, request: Request) -> Response:
        await self._seen(request)
        if not self._authorized(request):
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        now = int(time.time())
        with self._state_lock:
            served = [dict(c) for c in self._served]
        data = []
        for card in served:
            data.append(
                {
                    "id": card["id"],
                    "object": "model",
                    "created": now,
                    "owned_by": card.get("owned_by", "vllm"),
                    "root": card["root"],
                    "parent": card["parent"],
                    "max_model_len": card["max_model_len"],
                    "permission": [_permission(now)],
                }
            )
        return self.listing_response({"object": "list", "data": data})

    async def _health(self, request: Request) -> Response:
        await self._seen(request)
        return Response(status_code=200 if self.healthy else 503)

    async def _version(self, request: Request) -> Response:
        await self._seen(request)
        return JSONResponse({"version": VLLM_VERSION})

    # inference ---------------------------------------------------------------------------------------
    def _error(self, status: int, message: str, err_type: str | None = None) -> Response:
        return self.reply(Reply(status=status, body=shapes.error_body(status, message, err_type)))

    async def _accept(self, request: Request) -> tuple[dict[str, Any], str] | Response:
        """(JSON body, served model) of an inference request, or the error vLLM answers instead."""
        body = await self._record(request)
        if not self._authorized(request):
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        payload = parse_json_object(body)
        if payload is None:
            return self._error(400, "[{'type': 'json_invalid', 'loc': ('body',), 'msg': 'JSON decode error'}]",
                               "Bad Request")
        served = self.served_ids
        model = payload.get("model") or (served[0] if served else "")
        if model not in served:
            return self._error(404, f"The model `{model}` does not exist.", "NotFoundError")
        if self.upstream_status is not None:
            return self._error(*self.upstream_status)
        return payload, model

    def _generation(self, request: Request, payload: dict[str, Any], model: str, prefix: str,
                    prompt: Any, *, tools: bool = False) -> shapes.Generation:
        limit = payload.get("max_tokens")
        tokens, cut = limit_tokens(self.generated_tokens([model, prompt]),
                                   limit if limit is not None else payload.get("max_completion_tokens"))
        wants_tool = (tools and bool(payload.get("tools")) and payload.get("tool_choice") != "none"
                      and self.tool_call is not None)
        options = payload.get("stream_options") or {}
        return shapes.Generation(
            request_id=f"{prefix}-{request.headers.get('x-request-id') or shapes.random_hex()}",
            model=model,
            tokens=[] if wants_tool else tokens,
            prompt_tokens=count_prompt_tokens(prompt),
            finish_reason="tool_calls" if wants_tool else ("length" if cut else "stop"),
            tool_call=self.tool_call if wants_tool else None,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        )

    def _answer(self, payload: dict[str, Any], body: bytes, events: list[bytes]) -> Response:
        if payload.get("stream") is True:
            return self.reply(Reply(media_type="text/event-stream; charset=utf-8", events=events))
        return self.reply(Reply(body=body))

    async def _chat(self, request: Request) -> Response:
        accepted = await self._accept(request)
        if isinstance(accepted, Response):
            return accepted
        payload, model = accepted
        gen = self._generation(request, payload, model, "chatcmpl", payload.get("messages"), tools=True)
        return self._answer(payload, shapes.chat_body(gen), shapes.chat_events(gen))

    async def _completions(self, request: Request) -> Response:
        accepted = await self._accept(request)
        if isinstance(accepted, Response):
            return accepted
        payload, model = accepted
        if payload.get("suffix") is not None and not self.accept_suffix:
            return self._error(400, "suffix is not currently supported")
        gen = self._generation(request, payload, model, "cmpl", [payload.get("prompt"), payload.get("suffix")])
        return self._answer(payload, shapes.completion_body(gen), shapes.completion_events(gen))

    async def _embeddings(self, request: Request) -> Response:
        accepted = await self._accept(request)
        if isinstance(accepted, Response):
            return accepted
        payload, model = accepted
        inputs = embedding_inputs(payload.get("input"))
        if inputs is None:
            return self._error(400, "input must be a string, a list of strings or token arrays")
        vectors = [embedding_for([model, item], self.embedding_dim) for item in inputs]
        prompt_tokens = sum(len(i) if isinstance(i, list) else count_prompt_tokens(i) for i in inputs)
        request_id = f"embd-{request.headers.get('x-request-id') or shapes.random_hex()}"
        return self.reply(Reply(body=shapes.embeddings_body(request_id, model, vectors, prompt_tokens)))
