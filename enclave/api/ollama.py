"""Ollama's native API per domain, under ``/proxy/{domain_id}/api/``, for models hosted on Ollama backends.

* ``chat``, ``generate`` (FIM through ``suffix``), ``embed``, ``embeddings`` (legacy): scope ``models:infer``
  and the same ``access.may_use_model`` decision as ``/v1/models`` lists; unknown and forbidden models get the
  same 404. A permitted model on a vLLM backend gets a 404 naming the OpenAI route that serves it.
* ``show``: scope ``models:read``, the same model decision, relayed to the model's backend.
* ``tags`` (from the registry: exactly the Ollama-hosted models ``/v1/models`` lists for the key), ``ps``
  (running models the key may use), ``version``.
* ``pull``, ``push``, ``create``, ``copy``, ``delete``: never proxied (403 naming the admin API).

Errors use Ollama's shape ``{"error": "..."}`` (``enclave.api.ollama_errors``).
"""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from enclave.access import (
    OLLAMA_MANAGEMENT_ROUTES,
    Principal,
    Scope,
    may_infer_in_domain,
    may_list_models,
    may_manage_models_through_proxy,
    may_read_backend_version,
    may_use_model,
    model_rule,
)
from enclave.api.context import AppContext, check, decided_domain_id
from enclave.api.inference import client_gone, failure_error
from enclave.api.schemas import DomainRef
from enclave.backends.base import ModelCard
from enclave.errors import ApiError
from enclave.inference import ollama as native
from enclave.inference.body import BodyError, ClientBody
from enclave.inference.client_gone import ClientGone, unless_client_leaves
from enclave.inference.record import InferenceRecord
from enclave.inference.upstream import UpstreamFailure
from enclave.store import Domain
from enclave.request_id import request_id_of

router = APIRouter(tags=["ollama"])


class OllamaError(BaseModel):
    error: str


_ERRORS = {
    400: "Invalid request", 401: "Missing, malformed, unknown, expired or revoked API key",
    403: "Not a member, or the key lacks the scope", 404: "Unknown model, or one this key may not use",
    413: "Body larger than the configured limit", 502: "The backend failed or cannot be reached",
    503: "No backend answers, or the backend is at capacity (Retry-After)", 504: "The backend did not answer in time",
}
_RESPONSES = {status: {"model": OllamaError, "description": text} for status, text in _ERRORS.items()}
_SECURED = {"security": [{"PAT": []}]}


def _request_body(summary: str, required: tuple[str, ...]) -> dict:
    """The OpenAPI request body: an object naming a model; every other field is Ollama's to interpret."""
    return {**_SECURED, "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": list(required), "additionalProperties": True, "description": summary,
        "properties": {"model": {"type": "string", "minLength": 1}, "stream": {"type": "boolean"}}}}}}}


def _answer(description: str, *, ndjson: bool = False) -> dict:
    content: dict = {"application/json": {"schema": {"type": "object"}}}
    if ndjson:
        content["application/x-ndjson"] = {"schema": {"type": "string"}}
    return {200: {"description": description, "content": content}}


def model_not_found(model: str) -> ApiError:
    model = model if len(model) <= 200 else model[:200] + "..."
    return ApiError(404, f'model "{model}" not found', code="model_not_found", param="model")


def _no_backend() -> ApiError:
    return ApiError(503, "No model backend is answering right now; try again shortly.", code="backend_unavailable",
                    type="api_error")


def _all_backends_down(registry) -> bool:
    return not registry.any_up() and bool(registry.status())


async def _admitted(request: Request, domain_ref: str, decide) -> tuple[AppContext, Principal, Domain]:
    """Authenticate, find the domain, and apply the route's domain-level decision."""
    ctx: AppContext = request.app.state.ctx
    principal = await ctx.auth.authenticate(request.headers.get("authorization"))
    domain = await ctx.auth.domain(domain_ref)
    check(decide(principal, decided_domain_id(domain_ref, domain), domain))
    assert domain is not None
    return ctx, principal, domain


async def _model_request(request: Request, domain_ref: str, route: str,
                         scope: Scope) -> tuple[AppContext, Principal, Domain, ClientBody, ModelCard]:
    """Everything a model route needs once it is admitted: the body and the card of an Ollama-hosted model the
    key may use (404 alike for unknown and forbidden ones)."""
    decide = may_infer_in_domain if scope is Scope.MODELS_INFER else may_list_models
    ctx, principal, domain = await _admitted(request, domain_ref, decide)
    try:
        body = native.parse_native_body(await request.body(), route)
    except BodyError as e:
        raise ApiError(400, e.message, code=e.code, param=e.param) from None
    card = native.find_card(ctx.registry, body.model)
    if card is None and _all_backends_down(ctx.registry):
        raise _no_backend()
    if card is None or not may_use_model(principal, domain.id, domain, card.id, scope=scope):
        raise model_not_found(body.model)
    if card.kind != "ollama":
        raise ApiError(404, native.served_elsewhere_message(route, domain.id, card.id), code="model_not_found",
                       param="model")
    return ctx, principal, domain, body, card


async def _infer(request: Request, domain_ref: str, route: str) -> Response:
    ctx, principal, domain, body, card = await _model_request(request, domain_ref, route, Scope.MODELS_INFER)
    record = InferenceRecord(domain_id=domain.id, user_id=principal.user.id, pat_id=principal.pat.id,
                             model=card.id, backend=card.backend, route=f"api/{route}", stream=body.stream,
                             request_id=request_id_of(request),
                             request_sha256=hashlib.sha256(await request.body()).hexdigest())   # read already: cached
    request.state.inference = record
    ticket = await ctx.quotas.admit(record)   # limits and budgets (enclave.quotas): 429 when one is reached
    try:
        answer = await unless_client_leaves(request.receive, native.infer(ctx.gateway, route, record, body))
        return ticket.headed(answer)
    except UpstreamFailure as failure:
        raise ticket.headed_error(failure_error(failure)) from None
    except ClientGone:
        return client_gone()
    finally:
        ticket.settle()


@router.post("/proxy/{domain_id}/api/chat", responses={**_RESPONSES, **_answer(
             "The reply, or its NDJSON chunks (the default; `stream: false` for one object)", ndjson=True)},
             summary="Ollama chat with a model this key may use",
             openapi_extra=_request_body("An Ollama chat request", ("model", "messages")))
async def chat(domain_id: DomainRef, request: Request) -> Response:
    return await _infer(request, domain_id, "chat")


@router.post("/proxy/{domain_id}/api/generate", responses={**_RESPONSES, **_answer(
             "The completion, or its NDJSON chunks (the default)", ndjson=True)},
             summary="Ollama generate (with `suffix` for fill-in-the-middle)",
             openapi_extra=_request_body("An Ollama generate request", ("model",)))
async def generate(domain_id: DomainRef, request: Request) -> Response:
    return await _infer(request, domain_id, "generate")


@router.post("/proxy/{domain_id}/api/embed", responses={**_RESPONSES, **_answer("Embedding vectors")},
             summary="Ollama embeddings", openapi_extra=_request_body("An Ollama embed request", ("model", "input")))
async def embed(domain_id: DomainRef, request: Request) -> Response:
    return await _infer(request, domain_id, "embed")


@router.post("/proxy/{domain_id}/api/embeddings", responses={**_RESPONSES, **_answer("One embedding vector")},
             summary="Ollama embeddings (legacy)",
             openapi_extra=_request_body("A legacy Ollama embeddings request", ("model", "prompt")))
async def embeddings(domain_id: DomainRef, request: Request) -> Response:
    return await _infer(request, domain_id, "embeddings")


@router.post("/proxy/{domain_id}/api/show", responses={**_RESPONSES, **_answer("The model's details")},
             summary="Ollama show: details of a model this key may use",
             openapi_extra=_request_body("`model` (or the legacy `name`)", ()))
async def show(domain_id: DomainRef, request: Request) -> Response:
    ctx, _, _, body, card = await _model_request(request, domain_id, "show", Scope.MODELS_READ)
    try:
        return await unless_client_leaves(request.receive, native.show(ctx.gateway, card, body))
    except UpstreamFailure as failure:
        raise failure_error(failure) from None
    except ClientGone:
        return client_gone()


@router.get("/proxy/{domain_id}/api/tags", responses={**_RESPONSES, **_answer("The models this key may use")},
            summary="Ollama tags: the Ollama-hosted models `/v1/models` lists for this key", openapi_extra=_SECURED)
async def tags(domain_id: DomainRef, request: Request) -> Response:
    ctx, principal, domain = await _admitted(request, domain_id, may_list_models)
    if _all_backends_down(ctx.registry):
        raise _no_backend()
    allowed = model_rule(principal, domain)
    cards = [card for card in ctx.registry.models() if allowed(card.id)]
    return Response(native.tags_body(cards), media_type="application/json")


@router.get("/proxy/{domain_id}/api/ps", responses={**_RESPONSES, **_answer("Loaded models this key may use")},
            summary="Ollama ps: running models this key may use", openapi_extra=_SECURED)
async def ps(domain_id: DomainRef, request: Request) -> Response:
    ctx, principal, domain = await _admitted(request, domain_id, may_list_models)
    body = await native.running_models(ctx.gateway, ctx.registry, model_rule(principal, domain))
    return Response(body, media_type="application/json")


@router.get("/proxy/{domain_id}/api/version", responses={**_RESPONSES, **_answer("An Ollama backend's version")},
            summary="Ollama version of a backend that is up", openapi_extra=_SECURED)
async def version(domain_id: DomainRef, request: Request) -> Response:
    ctx, _, _ = await _admitted(request, domain_id, may_read_backend_version)
    try:
        return Response(await native.backend_version(ctx.gateway, ctx.registry), media_type="application/json")
    except UpstreamFailure as failure:
        raise failure_error(failure) from None


def _management_route(action: str):
    async def refuse(domain_id: str, request: Request) -> Response:
        ctx: AppContext = request.app.state.ctx
        principal = await ctx.auth.authenticate(request.headers.get("authorization"))
        decision = may_manage_models_through_proxy(principal, action)
        check(decision)
        raise AssertionError("fail closed: the gateway never proxies model management")

    refuse.__name__ = f"refuse_{action}"
    return refuse


#: Every method is refused alike (Ollama uses POST, and DELETE for ``delete``), so none gets a 405 instead.
MANAGEMENT_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
for _action in OLLAMA_MANAGEMENT_ROUTES:
    router.add_api_route(f"/proxy/{{domain_id}}/api/{_action}", _management_route(_action),
                         methods=MANAGEMENT_METHODS, include_in_schema=False)
