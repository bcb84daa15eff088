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

Test controls beyond the shared ones (``answering``, ``delay``, ``malformed``, ``requests``): ``served``
(the cards' static fields; edit through ``set_served()``), ``healthy``.
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

from tests.fakes.base import FakeBackend, as_json_safe

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
