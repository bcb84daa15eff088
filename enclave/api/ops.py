"""Liveness, readiness and Prometheus metrics (unauthenticated; they reveal no identities or secrets)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from enclave.api.context import AppContext
from enclave.api.schemas import ReadyOut

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Liveness: the process answers")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", response_model=ReadyOut, responses={503: {"model": ReadyOut}},
            summary="Readiness: the store answers and every configured backend answered its last discovery")
async def ready(request: Request) -> JSONResponse:
    ctx: AppContext = request.app.state.ctx
    store = {"ok": True, "error": None}
    try:
        await asyncio.wait_for(ctx.store.ping(), timeout=5)
    except Exception as e:  # report, never raise: readiness must always answer
        store = {"ok": False, "error": f"store unreachable ({type(e).__name__})"}
    backends = []
    for s in ctx.registry.status():
        backends.append({"name": s.name, "kind": s.kind, "up": s.up, "error": s.error,
                         "last_ok": s.last_ok.isoformat() if s.last_ok else None, "models": s.models})
    ok = store["ok"] and all(b["up"] for b in backends)
    body = ReadyOut(ready=ok, store=store, backends=backends).model_dump()
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    for s in ctx.registry.status():
        ctx.metrics.backend_up.labels(backend=s.name, kind=s.kind).set(1 if s.up else 0)
    ctx.metrics.models.set(len(ctx.registry.models()))
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)
