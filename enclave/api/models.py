"""OpenAI-compatible model discovery per domain: exactly the registry models the caller may use."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from enclave.access import Principal, Scope, domain_access, may_use_model
from enclave.api.context import AppContext, check, uuid_param
from enclave.api.schemas import ERROR_RESPONSES, ErrorEnvelope, ModelList, ModelObject
from enclave.errors import ApiError, model_not_found
from enclave.store import Domain

router = APIRouter(tags=["models"])

_RESPONSES = {**ERROR_RESPONSES, 503: {"model": ErrorEnvelope, "description": "No backend answers"}}


def _no_backend() -> ApiError:
    return ApiError(503, "No model backend is answering right now; try again shortly.", code="backend_unavailable",
                    type="api_error")


def _all_backends_down(registry) -> bool:
    statuses = registry.status()
    return bool(statuses) and not any(s.up for s in statuses)


async def _domain_for(ctx: AppContext, principal: Principal, domain_id: str) -> Domain:
    uuid_param(domain_id, "domain_id")
    domain = await ctx.auth.domain(domain_id)
    check(domain_access(principal, domain_id, domain, Scope.MODELS_READ))
    assert domain is not None
    return domain


# The hot path authenticates inline rather than through Depends(): FastAPI's dependency solving costs about as
# much as the rest of the request. The OpenAPI security requirement is declared explicitly instead.
_SECURED = {"security": [{"PAT": []}]}


@router.get("/proxy/{domain_id}/v1/models", response_model=ModelList, responses=_RESPONSES,
            summary="List the models this API key may use in the domain", openapi_extra=_SECURED)
async def list_models(domain_id: str, request: Request) -> JSONResponse:
    ctx: AppContext = request.app.state.ctx
    principal = await ctx.auth.authenticate(request.headers.get("authorization"))
    domain = await _domain_for(ctx, principal, domain_id)
    registry = ctx.registry
    if _all_backends_down(registry):
        raise _no_backend()
    data = [card.to_openai() for card in registry.models()
            if may_use_model(principal, domain_id, domain, card.id, scope=Scope.MODELS_READ)]
    return JSONResponse({"object": "list", "data": data})


@router.get("/proxy/{domain_id}/v1/models/{model:path}", response_model=ModelObject, responses=_RESPONSES,
            summary="Retrieve one model (404 when unknown or not permitted alike)", openapi_extra=_SECURED)
async def retrieve_model(domain_id: str, model: str, request: Request) -> JSONResponse:
    ctx: AppContext = request.app.state.ctx
    principal = await ctx.auth.authenticate(request.headers.get("authorization"))
    domain = await _domain_for(ctx, principal, domain_id)
    registry = ctx.registry
    card = registry.get(model)
    if card is None and _all_backends_down(registry):
        raise _no_backend()
    if card is None or not may_use_model(principal, domain_id, domain, card.id, scope=Scope.MODELS_READ):
        raise model_not_found(model)
    return JSONResponse(card.to_openai())
