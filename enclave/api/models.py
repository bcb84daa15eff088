"""OpenAI-compatible model discovery per domain: exactly the registry models the caller may use."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from enclave.access import Principal, Scope, may_list_models, may_use_model, model_rule
from enclave.api.context import AppContext, check, decided_domain_id
from enclave.api.schemas import ERROR_RESPONSES, DomainRef, ErrorEnvelope, ModelList, ModelObject
from enclave.errors import ApiError, model_not_found
from enclave.registry import openai_model_list
from enclave.store import Domain

router = APIRouter(tags=["models"])

_RESPONSES = {**ERROR_RESPONSES, 503: {"model": ErrorEnvelope, "description": "No backend answers"}}


def _no_backend() -> ApiError:
    return ApiError(503, "No model backend is answering right now; try again shortly.", code="backend_unavailable",
                    type="api_error")


def _all_backends_down(registry) -> bool:
    """Backends are configured and none answered (with none configured, the lists are simply empty)."""
    return not registry.any_up() and bool(registry.status())


async def _domain_for(ctx: AppContext, principal: Principal, ref: str) -> Domain:
    """The domain named by id (any case) or name in the path, once the principal may list models there; an
    unknown domain looks like a foreign one."""
    domain = await ctx.auth.domain(ref)
    check(may_list_models(principal, decided_domain_id(ref, domain), domain))
    assert domain is not None
    return domain


# The hot path authenticates inline rather than through Depends(): FastAPI's dependency solving costs about as
# much as the rest of the request. The OpenAPI security requirement is declared explicitly instead.
_SECURED = {"security": [{"PAT": []}]}


@router.get("/proxy/{domain_id}/v1/models", response_model=ModelList, responses=_RESPONSES,
            summary="List the models this API key may use in the domain", openapi_extra=_SECURED)
async def list_models(domain_id: DomainRef, request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    principal = await ctx.auth.authenticate(request.headers.get("authorization"))
    domain = await _domain_for(ctx, principal, domain_id)
    registry = ctx.registry
    if _all_backends_down(registry):
        raise _no_backend()
    # The domain-level part of may_use_model was decided by _domain_for; only the model part varies per card.
    allowed = model_rule(principal, domain)
    body = openai_model_list(card for card in registry.models() if allowed(card.id))
    return Response(body, media_type="application/json")


@router.get("/proxy/{domain_id}/v1/models/{model:path}", response_model=ModelObject, responses=_RESPONSES,
            summary="Retrieve one model (404 when unknown or not permitted alike)", openapi_extra=_SECURED)
async def retrieve_model(domain_id: DomainRef, model: str, request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    principal = await ctx.auth.authenticate(request.headers.get("authorization"))
    domain = await _domain_for(ctx, principal, domain_id)
    registry = ctx.registry
    card = registry.get(model)
    if card is None and _all_backends_down(registry):
        raise _no_backend()
    if card is None or not may_use_model(principal, domain.id, domain, card.id, scope=Scope.MODELS_READ):
        raise model_not_found(model)
    return Response(card.openai_json(), media_type="application/json")
