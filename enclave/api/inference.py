"""OpenAI-compatible inference per domain: chat completions, completions (with ``suffix``), embeddings.

The model a request names must be one ``GET /v1/models`` lists for the same key (``access.may_use_model``,
scope ``models:infer``): unknown and forbidden models both get 404 ``model_not_found``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.routing import iter_route_contexts
from starlette.types import ASGIApp, Receive, Scope, Send

from enclave.access import may_infer_in_domain, may_use_model
from enclave.api.context import AppContext, check, decided_domain_id, request_principal
from enclave.api.schemas import ERROR_RESPONSES, DomainRef, ErrorEnvelope
from enclave.errors import ApiError, model_not_found
from enclave.inference.body import BodyError, ClientBody, parse_body
from enclave.inference.client_gone import ClientGone, unless_client_leaves
from enclave.inference.gateway import CLIENT_CLOSED
from enclave.inference.record import InferenceRecord
from enclave.inference.upstream import UpstreamFailure
from enclave.request_id import request_id_of

router = APIRouter(tags=["inference"])

_RESPONSES = {
    **ERROR_RESPONSES,
    413: {"model": ErrorEnvelope, "description": "Body larger than the configured limit"},
    502: {"model": ErrorEnvelope, "description": "The backend failed or cannot be reached"},
    503: {"model": ErrorEnvelope, "description": "No backend answers, or the backend is at capacity (Retry-After)"},
    504: {"model": ErrorEnvelope, "description": "The backend did not answer in time"},
}


def _request_body(summary: str, required: tuple[str, ...]) -> dict:
    """The OpenAPI request body: an object naming a model; every other field is the backend's to interpret."""
    return {
        "security": [{"PAT": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": list(required), "additionalProperties": True,
            "description": summary,
            "properties": {"model": {"type": "string", "minLength": 1}, "stream": {"type": "boolean"}},
        }}}},
    }


def _answer(description: str) -> dict:
    return {200: {"description": description, "content": {
        "application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {"type": "string"}}}}}


def failure_error(failure: UpstreamFailure) -> ApiError:
    headers = {"Retry-After": str(failure.retry_after)} if failure.retry_after is not None else None
    return ApiError(failure.status, failure.message, code=failure.code, headers=headers)


async def _infer(request: Request, domain_ref: str, route: str) -> Response:
    ctx: AppContext = request.app.state.ctx
    principal = await request_principal(request)
    domain = await ctx.auth.domain(domain_ref)
    check(may_infer_in_domain(principal, decided_domain_id(domain_ref, domain), domain))
    assert domain is not None
    raw = await request.body()
    try:
        body: ClientBody = parse_body(raw)
    except BodyError as e:
        raise ApiError(400, e.message, code=e.code, param=e.param) from None
    card = ctx.registry.get(body.model)
    if card is None and not ctx.registry.any_up() and ctx.registry.status():
        raise ApiError(503, "No model backend is answering right now; try again shortly.",
                       code="backend_unavailable", type="api_error")
    if card is None or not may_use_model(principal, domain.id, domain, card.id):
        raise model_not_found(body.model)
    record = InferenceRecord(domain_id=domain.id, user_id=principal.user.id, pat_id=principal.pat.id,
                             model=card.id, backend=card.backend, route=route, stream=body.stream,
                             request_id=request_id_of(request), request_sha256=hashlib.sha256(raw).hexdigest())
    request.state.inference = record
    ticket = await ctx.quotas.admit(record)   # limits and budgets (enclave.quotas): 429 when one is reached
    try:
        answer = await unless_client_leaves(request.receive, ctx.gateway.openai(route, record, body, domain.id))
        return ticket.headed(answer)
    except UpstreamFailure as failure:
        raise ticket.headed_error(failure_error(failure)) from None
    except ClientGone:
        return client_gone()
    finally:
        ticket.settle()


def client_gone() -> Response:
    """What a request whose client left gets: nobody reads it."""
    return Response(status_code=CLIENT_CLOSED)


@router.post("/proxy/{domain_id}/v1/chat/completions", responses={**_RESPONSES, **_answer("A chat completion, or "
             "its chunks as server-sent events when `stream` is true")},
             summary="Create a chat completion with a model this key may use",
             openapi_extra=_request_body("An OpenAI chat completion request", ("model", "messages")))
async def chat_completions(domain_id: DomainRef, request: Request) -> Response:
    return await _infer(request, domain_id, "chat/completions")


@router.post("/proxy/{domain_id}/v1/completions", responses={**_RESPONSES, **_answer("A text completion, or its "
             "chunks as server-sent events when `stream` is true")},
             summary="Create a text completion (with `suffix` for fill-in-the-middle)",
             openapi_extra=_request_body("An OpenAI completion request", ("model", "prompt")))
async def completions(domain_id: DomainRef, request: Request) -> Response:
    return await _infer(request, domain_id, "completions")


@router.post("/proxy/{domain_id}/v1/embeddings", responses={**_RESPONSES, **_answer("Embedding vectors")},
             summary="Create embeddings",
             openapi_extra=_request_body("An OpenAI embeddings request", ("model", "input")))
async def embeddings(domain_id: DomainRef, request: Request) -> Response:
    return await _infer(request, domain_id, "embeddings")


_FAST_PATH = re.compile(r"^/proxy/([^/]{1,100})/v1/(chat/completions|completions|embeddings)$")


class InferenceFastPath:
    """Sends ``POST /proxy/{domain}/v1/{chat/completions,completions,embeddings}`` straight to its handler.

    FastAPI's route matching and endpoint machinery cost about 0.4 ms of every request's time to first token
    (measured with the benchmark's backend), more than the rest of the gateway's own work. The routes stay
    declared on ``router`` (OpenAPI, the route table) and this dispatch must behave exactly like them: any other
    method, path or an over-long domain reference goes on to FastAPI unchanged. It sits inside every middleware
    (limits, metrics, error shapes), so only the routing is skipped.
    """

    def __init__(self, app: ASGIApp, routes: dict[str, Any]) -> None:
        self.app = app
        self.routes = routes   # route name ("chat/completions", ...) -> its APIRoute, for the metrics template

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _FAST_PATH.match(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        domain_ref, route = match.groups()
        scope["route"] = self.routes[route]
        scope["path_params"] = {"domain_id": domain_ref}
        request = Request(scope, receive, send)
        try:
            response = await _infer(request, domain_ref, route)
        except ApiError as e:
            response = e.response()
        await response(scope, receive, send)


def fast_path_routes(app: Any) -> dict[str, Any]:
    """The declared APIRoutes the fast path stands in for, by route name."""
    found: dict[str, Any] = {}
    for route in iter_route_contexts(app.routes):
        path = getattr(route, "path", "")
        for name in ("chat/completions", "completions", "embeddings"):
            if path == f"/proxy/{{domain_id}}/v1/{name}":
                found[name] = route
    missing = {"chat/completions", "completions", "embeddings"} - found.keys()
    if missing:
        raise RuntimeError(f"inference routes not declared: {sorted(missing)}")
    return found
