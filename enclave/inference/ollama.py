"""Ollama's native API through the gateway: request bodies, inference relay, and the answers the gateway
assembles itself (``/api/tags`` from the registry, ``/api/ps`` filtered per key, ``/api/version``).

Access has been decided by the router (``enclave.access``) before anything here runs; ``allowed`` arguments
are that decision's per-model part (``access.model_rule``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from starlette.responses import Response

from enclave.backends.base import ModelCard
from enclave.inference.body import ClientBody, parse_body, upstream_body
from enclave.inference.editors import OllamaStreamEditor, compact, ollama_body_usage
from enclave.inference.gateway import NDJSON, Gateway
from enclave.inference.record import InferenceRecord
from enclave.inference.relay import StreamEditor
from enclave.inference.upstream import UpstreamFailure
from enclave.inference.usage import BYTES_PER_TOKEN, Usage, estimate, prompt_text_bytes

log = logging.getLogger("enclave.inference")

#: Native routes that generate (``stream`` defaults to true there, as in Ollama) and those that do not.
GENERATING_ROUTES = ("chat", "generate")
INFERENCE_ROUTES = (*GENERATING_ROUTES, "embed", "embeddings")
#: Where a model hosted on a vLLM backend is served instead, per native route (relative to the domain).
OPENAI_EQUIVALENT = {"chat": "POST /proxy/{domain}/v1/chat/completions", "generate": "POST /proxy/{domain}/v1/completions",
                     "embed": "POST /proxy/{domain}/v1/embeddings", "embeddings": "POST /proxy/{domain}/v1/embeddings",
                     "show": "GET /proxy/{domain}/v1/models/{model}"}

ModelAllowed = Callable[[str], Any]   # truthy when the key may use the model id


def parse_native_body(raw: bytes, route: str) -> ClientBody:
    """The client's body (``BodyError`` when unusable). The model may be named by ``model`` or Ollama's legacy
    ``name`` (``model`` wins, as in Ollama); only chat and generate stream, by default."""
    body = parse_body(raw, stream_default=route in GENERATING_ROUTES, model_keys=("model", "name"))
    if route not in GENERATING_ROUTES:
        body.stream = False
    return body


def find_card(registry: Any, name: str) -> ModelCard | None:
    """The registry card a native request names: the exact id, else ``name:latest`` for a name without a tag
    (Ollama's own default tag)."""
    card = registry.get(name)
    if card is None and ":" not in name.rsplit("/", 1)[-1]:
        card = registry.get(f"{name}:latest")
    return card


def served_elsewhere_message(route: str, domain_id: str, model: str) -> str:
    where = OPENAI_EQUIVALENT[route].format(domain=domain_id, model=model)
    return (f'model "{model}" is not served by the Ollama API here: it runs on a vLLM backend; use {where}')


def native_upstream_body(body: ClientBody, model: str) -> bytes:
    """What the backend gets: the client's body naming exactly the model that was checked (``model``; the
    legacy ``name`` removed, so the backend cannot read another one), without the fields the gateway owns."""
    doc = {key: value for key, value in body.doc.items() if key != "name"}
    doc["model"] = model
    return upstream_body(ClientBody(doc, model, body.stream, False), ask_usage=False, cache_salt=None)


def native_body_usage(body: bytes, prompt_bytes: int) -> Usage:
    """A whole native answer's counts, or an estimate (flagged) from its text when it reports none (the legacy
    ``/api/embeddings`` never does)."""
    usage = ollama_body_usage(body)
    if usage is not None:
        return usage
    text = 0
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        message = doc.get("message")
        for part in (message.get("content") if isinstance(message, dict) else None, doc.get("response")):
            if isinstance(part, str):
                text += len(part.encode())
    prompt = estimate(prompt_bytes, 0).prompt_tokens
    completion = -(-text // BYTES_PER_TOKEN)
    return Usage(prompt, completion, prompt + completion, estimated=True)


async def infer(gateway: Gateway, route: str, record: InferenceRecord, body: ClientBody) -> Response:
    """chat, generate (FIM through ``suffix``), embed, embeddings on the Ollama backend serving ``record.model``:
    NDJSON streams relayed line by line, usage from the final ``done`` line (else estimated)."""
    connections = gateway.connections(record.backend)
    prompt_bytes = prompt_text_bytes(body.doc)

    def usage_of(editor: StreamEditor | None, whole: bytes | None) -> Usage:
        if whole is not None:
            return native_body_usage(whole, prompt_bytes)
        assert isinstance(editor, OllamaStreamEditor)
        return editor.usage or estimate(prompt_bytes, editor.text_events)

    return await gateway.forward(record, connections, f"/api/{route}", native_upstream_body(body, record.model),
                                 stream=body.stream, fmt=NDJSON, editor=OllamaStreamEditor(), usage_of=usage_of)


async def show(gateway: Gateway, card: ModelCard, body: ClientBody) -> Response:
    """``/api/show`` relayed to the model's backend (not inference: no usage record)."""
    connections = gateway.connections(card.backend)
    upstream = await connections.open("/api/show", native_upstream_body(body, card.id))
    try:
        answer = await upstream.read_all()
    finally:
        await upstream.aclose()
    return Response(answer, media_type=upstream.content_type)


# ---- answers the gateway assembles ----------------------------------------------------------------------
def _rfc3339(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def tag_entry(card: ModelCard) -> dict[str, Any]:
    """One ``/api/tags`` entry from a card discovered on an Ollama backend (``extras`` keep Ollama's facts)."""
    extras = card.extras
    families = list(extras.get("families") or ())
    return {
        "name": card.id, "model": card.id,
        "modified_at": extras.get("modified_at") or _rfc3339(card.created),
        "size": extras.get("size", 0), "digest": extras.get("digest", ""),
        "details": {"parent_model": extras.get("parent_model", ""), "format": extras.get("format", ""),
                    "family": extras.get("family", ""), "families": families or None,
                    "parameter_size": extras.get("parameter_size", ""),
                    "quantization_level": extras.get("quantization_level", "")},
    }


def tags_body(cards: Sequence[ModelCard]) -> bytes:
    """Ollama's ``/api/tags`` for these cards (the Ollama-hosted ones), newest first as Ollama orders them."""
    ollama_cards = sorted((c for c in cards if c.kind == "ollama"), key=lambda c: (-c.created, c.id))
    return compact({"models": [tag_entry(card) for card in ollama_cards]})


def _up_ollama_backends(registry: Any) -> list[str]:
    return [status.name for status in registry.status() if status.up and status.kind == "ollama"]


async def _backend_json(gateway: Gateway, backend: str, path: str) -> Any:
    """``GET path`` on a backend, parsed; None (and a log line naming the backend, not the client) on any
    failure, so one failing backend only leaves its part out."""
    connections = gateway.upstreams.get(backend)
    if connections is None:
        return None
    try:
        return await connections.get_json(path)
    except UpstreamFailure as failure:
        log.warning("backend %s: GET %s failed (%s); left out", backend, path, failure.message)
        return None


def _visible_running(entry: Any, backend: str, registry: Any, allowed: ModelAllowed) -> bool:
    """A ``/api/ps`` entry this key may see: every name it carries is a model the key may use, routed to the
    backend that reported it (a shadowed copy elsewhere is not the key's business)."""
    if not isinstance(entry, dict):
        return False
    names = [entry.get(key) for key in ("name", "model") if key in entry]
    if not names or not all(isinstance(name, str) for name in names):
        return False
    for name in names:
        card = registry.get(name)
        if card is None or card.backend != backend or not allowed(card.id):
            return False
    return True


async def running_models(gateway: Gateway, registry: Any, allowed: ModelAllowed) -> bytes:
    """``/api/ps`` of every Ollama backend that is up, merged, keeping only what ``_visible_running`` admits."""
    backends = _up_ollama_backends(registry)
    answers = await asyncio.gather(*(_backend_json(gateway, name, "/api/ps") for name in backends))
    models: list[Any] = []
    for backend, answer in zip(backends, answers):
        entries = answer.get("models") if isinstance(answer, dict) else None
        models += [e for e in entries or () if _visible_running(e, backend, registry, allowed)]
    return compact({"models": models})


async def backend_version(gateway: Gateway, registry: Any) -> bytes:
    """``{"version": ...}`` of the first Ollama backend (configuration order) that is up and answers;
    ``UpstreamFailure`` 503 when none does."""
    for backend in _up_ollama_backends(registry):
        answer = await _backend_json(gateway, backend, "/api/version")
        if isinstance(answer, dict) and isinstance(answer.get("version"), str):
            return compact({"version": answer["version"]})
    raise UpstreamFailure(503, "backend_unavailable", "No Ollama backend is answering right now; try again shortly.")
