"""Liveness, readiness and Prometheus metrics.

``/health`` and ``/ready`` answer anyone, with a status word only: readiness reasons carry backend error text
(internal URLs, upstream excerpts) and metrics describe the deployment, so both need an operator's key
(``access.may_read_operations``): ``/ready`` with such a key adds the reasons, ``/metrics`` requires one.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from enclave.access import Principal, may_read_operations
from enclave.api.context import AppContext, check
from enclave.api.schemas import ERROR_RESPONSES, ReadyOut

router = APIRouter(tags=["operations"])

_OPERATOR_ERRORS = {k: ERROR_RESPONSES[k] for k in (401, 403)}


async def _operator(request: Request) -> Principal:
    """The caller, admitted by ``may_read_operations`` (401/403 envelope otherwise)."""
    ctx: AppContext = request.app.state.ctx
    principal = await ctx.auth.authenticate(request.headers.get("authorization"))
    check(may_read_operations(principal))
    return principal


@router.get("/health", summary="Liveness: the process answers")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", response_model=ReadyOut, response_model_exclude_none=True,
            responses={503: {"model": ReadyOut}, **_OPERATOR_ERRORS},
            summary="Readiness: the store answers and some backend serves (or none is configured)",
            description="Without `Authorization`: `{\"status\": \"ready\"}` or 503 `{\"status\": \"not_ready\"}`. "
                        "With an operator's key (superadmin, `manage`, bound to no domain) the store and every "
                        "backend are reported too, down ones with their error; any other key is refused.")
async def ready(request: Request) -> JSONResponse:
    ctx: AppContext = request.app.state.ctx
    detailed = request.headers.get("authorization") is not None
    if detailed:
        await _operator(request)
    store = {"ok": True, "error": None}
    try:
        await asyncio.wait_for(ctx.store.ping(), timeout=5)
    except Exception as e:  # report, never raise: readiness must always answer
        store = {"ok": False, "error": f"store unreachable ({type(e).__name__})"}
    statuses = ctx.registry.status()
    ok = store["ok"] and (not statuses or any(s.up for s in statuses))
    body: dict = {"status": "ready" if ok else "not_ready"}
    if detailed:
        body["store"] = store
        body["backends"] = [{"name": s.name, "kind": s.kind, "up": s.up, "error": s.error,
                             "last_ok": s.last_ok.isoformat() if s.last_ok else None, "models": s.models}
                            for s in statuses]
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics (operators only)", response_class=Response,
            responses=_OPERATOR_ERRORS,
            description="Needs an operator's key (superadmin, `manage`, bound to no domain) as "
                        "`Authorization: Bearer`; Prometheus sends it with `authorization: {credentials_file: ...}`.")
async def metrics(request: Request) -> Response:
    await _operator(request)
    ctx: AppContext = request.app.state.ctx
    for s in ctx.registry.status():
        ctx.metrics.backend_up.labels(backend=s.name, kind=s.kind).set(1 if s.up else 0)
    ctx.metrics.models.set(len(ctx.registry.models()))
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)
