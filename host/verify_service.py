"""The host agent's HTTP service: evidence verification with signed EAR results, collateral cache,
health, readiness and metrics.

**Advisory only.** The host that runs the confidential VM is not trusted, and neither is anything it
signs. A POST /v1/verify result tells an operator (or a client that cannot verify) what the host
concluded; a client that can should verify the evidence itself with the attested-TLS client
(``attestation.atls``), which checks the enclave's evidence against AMD/Intel roots on its own.

Endpoints:
  POST /v1/verify                 evidence -> EAR (ES256 JWT; JSON wrapper with Accept: application/json)
      body application/cmw+cbor   the CBOR CMW record; ?policy=NAME&nonce=...(&at=ISO8601 when enabled)
      body application/json       {"evidence": <evidence JSON>, "policy": NAME, "nonce": "...",
                                    "report_data": "<128 hex>"?, "at": "<ISO 8601>"?}
  GET  /v1/policies               configured policies
  GET  /.well-known/jwks.json     the EAR verification key (kid = RFC 7638 thumbprint)
  GET  /health, /ready, /metrics
  KDS/PCS mirror paths            see host.collateral_cache

Errors use the envelope {"error": {"message", "type", "param", "code"}}; bad evidence of any kind
gives a contraindicated EAR (it decoded but did not verify) or a 4xx (it did not decode), never a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from attestation.errors import EvidenceError
from attestation.evidence import TDX_CCEL_FILE, Evidence, decode_cmw, evidence_from_json
from attestation.policy import Policy
from attestation.ratelimit import client_key
from attestation.verdict import Check, Verdict
from attestation.verifier import verify_evidence

from .collateral_cache import FETCH_CLIENT, CollateralCache, CollateralCacheConfig, collateral_router
from .config import HostConfig
from .ear import EAR_MEDIA_TYPE, EarSigner, build_ear, ear_status
from .metrics import REGISTRY, VERIFY_REJECTED, VERIFY_RESULTS
from .status import StatusStore

log = logging.getLogger("cube.host.verify")

CMW_CBOR = "application/cmw+cbor"
_NONCE = re.compile(r"[A-Za-z0-9+/=_-]{8,88}")
_POLICY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_JSON_KEYS = frozenset({"evidence", "policy", "nonce", "report_data", "at"})
_INTERNAL_HOST = "http://cube-host.internal"


class _Refusal(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def error_response(status: int, message: str, code: str, param: str | None = None,
                   type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


class _InProcessTransport(httpx.BaseTransport):
    """Lets the synchronous KdsClient/PcsClient (run in a worker thread by the verifier) fetch through
    this agent's own collateral routes and cache, without a network hop."""

    def __init__(self, app: FastAPI, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._asgi = httpx.ASGITransport(app=app)
        self._loop = loop
        self._timeout = timeout

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        client = FETCH_CLIENT.get()  # the /v1/verify caller (the worker thread runs in a copy of its context)

        async def call() -> httpx.Response:
            FETCH_CLIENT.set(client)  # upstream fetches are charged to that caller, not to this agent
            inner = httpx.Request(request.method, request.url, headers=request.headers, content=request.read())
            response = await self._asgi.handle_async_request(inner)
            body = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=body)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(self._timeout)


def _collateral_clients(app: FastAPI, loop: asyncio.AbstractEventLoop, timeout: float) -> tuple[Any, Any]:
    """KdsClient and PcsClient pointed at this agent (None where the module is not available)."""
    kds = pcs = None
    transport = _InProcessTransport(app, loop, timeout)
    try:
        from attestation.snp.kds import KdsClient

        # One attempt: the collateral cache behind the transport already deals with upstream trouble.
        kds = KdsClient(base_url=f"{_INTERNAL_HOST}/kds", transport=transport, max_attempts=1)
    except (ImportError, TypeError) as exc:
        log.info("KDS fetching unavailable to the verifier: %s", exc)
    try:
        from attestation.tdx.pcs import PcsClient

        pcs = PcsClient(base_url=f"{_INTERNAL_HOST}/pcs", transport=transport, max_retries=0)
    except (ImportError, TypeError) as exc:
        log.info("PCS fetching unavailable to the verifier: %s", exc)
    return kds, pcs


def _parse_at(value: Any, allowed: bool) -> datetime | None:
    if value is None:
        return None
    if not allowed:
        raise _Refusal(400, "at: verification time override is disabled on this agent "
                            "(verify.allow_time_override)", "time_override_disabled", "at")
    if not isinstance(value, str) or len(value) > 64:
        raise _Refusal(400, "at: must be an ISO 8601 time", "invalid_time", "at")
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _Refusal(400, "at: must be an ISO 8601 time", "invalid_time", "at") from None
    if when.tzinfo is None:
        raise _Refusal(400, "at: must carry a time zone (e.g. Z)", "invalid_time", "at")
    return when


def _parse_nonce(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _NONCE.fullmatch(value):
        raise _Refusal(400, "nonce: must be 8 to 88 characters of hex or base64", "invalid_nonce", "nonce")
    return value


def _parse_report_data(value: Any) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{128}", value):
        raise _Refusal(400, "report_data: must be 128 hex digits (64 bytes)", "invalid_report_data", "report_data")
    return bytes.fromhex(value)


def _self_contained(evidence: Evidence) -> bool:
    """Evidence that carries every certificate / collateral file it needs (no fetch can happen)."""
    if evidence.platform in ("snp", "sim"):
        return len(evidence.certificates) >= 3
    return evidence.platform == "tdx" and bool(set(evidence.collateral) - {TDX_CCEL_FILE})  # the CC event log is not Intel's


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise _Refusal(413, f"body larger than {limit} bytes", "body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _Refusal(413, f"body larger than {limit} bytes", "body_too_large")
    return bytes(body)


def create_app(config: HostConfig, *, collateral_transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """The agent's FastAPI app. Loads policies and the signing key now (fails loudly if unusable)."""
    policies = config.load_policies()
    data_dir = Path(config.data_dir)
    signer = EarSigner.load_or_create(data_dir)
    status_store = StatusStore(data_dir, max_enclaves=config.verify.status_max_enclaves)
    cache: CollateralCache | None = None
    if config.collateral.enabled:
        c = config.collateral
        cache = CollateralCache(CollateralCacheConfig(
            cache_dir=data_dir / "collateral", kds_upstream=c.kds_upstream, pcs_upstream=c.pcs_upstream,
            intel_certs_upstream=c.intel_certs_upstream, kds_seed_dir=c.kds_seed_dir, pcs_seed_dir=c.pcs_seed_dir,
            offline=c.offline, fetch_timeout=c.fetch_timeout, kds_chain_ttl=c.kds_chain_ttl, vcek_ttl=c.vcek_ttl,
            negative_ttl=c.negative_ttl, upstream_per_client_per_minute=c.upstream_per_client_per_minute,
            upstream_per_client_burst=c.upstream_per_client_burst, upstream_per_minute=c.upstream_per_minute,
            upstream_burst=c.upstream_burst,
        ), transport=collateral_transport)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        status_store.flush()
        if cache is not None:
            await cache.aclose()

    app = FastAPI(title="Cube AI host agent", version="0.1.0", lifespan=lifespan,
                  description=__doc__.split("\n\n")[1] if __doc__ else None)
    app.state.config = config
    app.state.signer = signer
    app.state.status_store = status_store
    app.state.collateral_cache = cache
    app.state.policies = policies
    clients: dict[int, tuple[Any, Any]] = {}

    def verifier_clients() -> tuple[Any, Any]:
        if not (config.verify.fetch_collateral and cache is not None):
            return None, None
        loop = asyncio.get_running_loop()
        key = id(loop)
        if key not in clients:
            clients.clear()
            clients[key] = _collateral_clients(app, loop, config.collateral.fetch_timeout * 2 + 5)
        return clients[key]

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, str(exc.detail), code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return error_response(400, f"invalid request: {first.get('msg', 'invalid')}", "invalid_request", param)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:  # fail closed, no traceback out
        log.exception("unhandled error in the host agent")
        return error_response(500, "internal error", "internal_error", type_="server_error")

    @app.post("/v1/verify")
    async def verify(request: Request) -> Response:
        try:
            return await _verify(request)
        except _Refusal as exc:
            VERIFY_REJECTED.labels(str(exc.status)).inc()
            return error_response(exc.status, str(exc), exc.code, exc.param)

    async def _verify(request: Request) -> Response:
        body = await _read_body(request, config.verify.max_body_bytes)
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        query = request.query_params
        if media_type in (CMW_CBOR, "application/cbor"):
            unknown = set(query) - {"policy", "nonce", "at", "report_data"}
            if unknown:
                raise _Refusal(400, f"unknown query parameter {sorted(unknown)[0]!r}", "invalid_query",
                               sorted(unknown)[0])
            fields: dict[str, Any] = dict(query)
            try:
                evidence: Evidence = decode_cmw(body)
            except EvidenceError as exc:
                raise _Refusal(400, f"evidence: {exc}", "invalid_evidence", "body") from None
        elif media_type == "application/json":
            try:
                fields = json.loads(body)
            except (ValueError, RecursionError):
                raise _Refusal(400, "body: not valid JSON", "invalid_json", "body") from None
            if not isinstance(fields, dict):
                raise _Refusal(400, "body: must be a JSON object", "invalid_json", "body")
            unknown = set(fields) - _JSON_KEYS
            if unknown:
                raise _Refusal(400, f"unknown field {sorted(unknown)[0]!r}", "invalid_request", sorted(unknown)[0])
            if "evidence" not in fields:
                raise _Refusal(400, "evidence: required", "invalid_evidence", "evidence")
            try:
                evidence = evidence_from_json(fields["evidence"])
            except EvidenceError as exc:
                raise _Refusal(400, f"evidence: {exc}", "invalid_evidence", "evidence") from None
            except Exception as exc:  # odd JSON shapes the decoder did not foresee: still the caller's fault
                raise _Refusal(400, f"evidence: unusable ({type(exc).__name__})", "invalid_evidence",
                               "evidence") from None
        else:
            raise _Refusal(415, f"content type must be {CMW_CBOR} or application/json", "unsupported_media_type")

        policy_name = fields.get("policy", config.verify.default_policy)
        if not isinstance(policy_name, str) or not _POLICY_NAME.fullmatch(policy_name):
            raise _Refusal(400, "policy: must be a policy name", "invalid_policy", "policy")
        if policy_name not in policies:
            raise _Refusal(404, f"policy {policy_name!r} is not configured (see GET /v1/policies)",
                           "policy_not_found", "policy")
        policy: Policy = policies[policy_name][1]
        nonce = _parse_nonce(fields.get("nonce"))
        at = _parse_at(fields.get("at"), config.verify.allow_time_override)
        report_data = _parse_report_data(fields.get("report_data"))

        kds, pcs = verifier_clients()
        FETCH_CLIENT.set(client_key(request.client.host) if request.client else "unknown")
        try:
            if _self_contained(evidence) or (kds is None and pcs is None):
                # Pure CPU work well under a millisecond (chain results are cached by the verifier):
                # inline is several times faster than a worker-thread hop under the GIL.
                verdict = verify_evidence(evidence, policy=policy, at=at, expected_report_data=report_data)
            else:  # may fetch collateral through this very event loop: must leave it free
                verdict = await run_in_threadpool(verify_evidence, evidence, policy=policy, at=at,
                                                  expected_report_data=report_data, kds=kds, pcs=pcs)
        except Exception as exc:  # verify_evidence promises not to raise; fail closed if it ever does
            log.exception("verifier raised")
            verdict = Verdict(ok=False, platform=evidence.platform, product=evidence.product, status="error",
                              claims={}, checks=[Check("verification", False, f"internal error: {type(exc).__name__}")],
                              error="internal verifier error")
        status = ear_status(verdict, policy)
        claims = build_ear(verdict, policy_name=policy_name, nonce=nonce, developer=config.verify.developer,
                           build=config.verify.build, policy=policy, lifetime=config.verify.ear_lifetime_seconds)
        token = signer.sign(claims)
        VERIFY_RESULTS.labels(status, policy_name).inc()
        try:
            status_store.record(policy=policy_name, verdict=verdict, ear_status=status, nonce=nonce)
        except OSError as exc:
            log.warning("could not write the status file: %s", exc)
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"ear": token, "status": status, "policy": policy_name,
                                 "verdict": verdict.status, "error": verdict.error})
        return Response(token, media_type=EAR_MEDIA_TYPE)

    @app.get("/v1/policies")
    async def list_policies() -> dict[str, Any]:
        return {"object": "list", "default": config.verify.default_policy, "data": [
            {"name": name, "source": source, "policy": policy.model_dump(mode="json")}
            for name, (source, policy) in policies.items()]}

    @app.get("/.well-known/jwks.json")
    async def jwks() -> JSONResponse:
        return JSONResponse(signer.jwks(), headers={"Cache-Control": "max-age=300"})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        problems = []
        if not policies:
            problems.append("no policies")
        if not data_dir.is_dir():
            problems.append("data directory missing")
        body = {"status": "ready" if not problems else "not_ready", "policies": len(policies),
                "collateral_cache": cache is not None, "offline": config.collateral.offline,
                "problems": problems}
        return JSONResponse(body, status_code=200 if not problems else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    if cache is not None:
        app.include_router(collateral_router(cache))
    return app

