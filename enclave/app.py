"""The enclave FastAPI application: routers, error envelope, limits, metrics and lifecycle."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.types import Scope

from enclave.api import admin, audit as audit_api, inference, limits, models, ollama, ops, receipts, usage
from enclave.api.context import AppContext
from enclave.api.ollama_errors import OllamaErrorShape
from enclave.audit import AuditMiddleware, AuditTrail, note_refusal
from enclave.auth import Authenticator, Clock, LastUsedTracker, MonotonicClock
from enclave.config import ConfigError, Settings, load_server_secret
from enclave.errors import ApiError, install_error_handlers
from enclave.inference.gateway import Gateway
from enclave.limits import SizeLimitMiddleware
from enclave.metrics import Metrics, MetricsMiddleware
from enclave.platform_secrets import PlatformSecrets
from enclave.quotas import open_quotas
from enclave.registry import Registry
from enclave.request_id import RequestIdMiddleware
from enclave.signer import AttestedSigner, SignerSource
from enclave.store import open_store, utcnow
from enclave.usage import Ledger

log = logging.getLogger("enclave.app")


def _default_registry(settings: Settings) -> Any:
    return Registry(settings.backends, refresh_interval=settings.registry_refresh_seconds)


def _freeze_startup_objects() -> None:
    """Move everything alive after startup (modules, routes, schemas, the registry...) out of the collector's
    reach. Those objects live as long as the process, yet every full collection would walk all of them, and
    those pauses (tens of milliseconds) are what set the tail latency under load. Startup garbage is collected
    first so that it is not frozen with them."""
    gc.collect()
    gc.freeze()


def _configured_secrets(settings: Settings) -> PlatformSecrets:
    root = load_server_secret(settings)
    if root is None:
        raise ConfigError("create_app needs platform_secrets (or, in simulation, server_secret in the settings)")
    return PlatformSecrets(root)


async def _stop_in_order(*steps: Callable[[], Awaitable[Any]] | None) -> None:
    """Run every shutdown step even when an earlier one fails (a backend client that fails to close must not
    cost the ledger's last records), then raise the first failure."""
    first: BaseException | None = None
    for step in steps:
        if step is None:
            continue
        try:
            await step()
        except Exception as e:   # noqa: BLE001 - logged, the remaining steps still run
            log.exception("shutdown step %s failed", getattr(step, "__qualname__", step))
            first = first or e
    if first is not None:
        raise first


def _signer_source(settings: Settings, signer: AttestedSigner | None) -> SignerSource:
    if signer is not None:
        return SignerSource.of(signer)

    def simulated() -> AttestedSigner:
        if not settings.simulate:
            raise ConfigError("no attested signer: create_app needs signer= outside simulation")
        from attestation.providers.sim import SimProvider
        return AttestedSigner(SimProvider(settings.attestation.sim_dir or settings.data_dir / "sim"))

    return SignerSource(simulated)


def _auth_failure_hook(metrics: Metrics) -> Callable[[str], None]:
    def failed(reason: str) -> None:
        metrics.auth_failed(reason)
        note_refusal(reason)   # the audit trail counts the class (enclave.audit.refusals), never the token

    return failed


DOCS_STATIC_URL = "/docs/static"
_PUBLIC_PREFIXES = ("/health", "/ready", "/docs", "/redoc", "/openapi.json")


async def _authentication_refusal(request: Request) -> JSONResponse | None:
    """The 401 for a request without a valid PAT (None when it has one, or before the service is up)."""
    if "ctx" not in request.app.state._state:
        return None
    try:
        principal = await request.app.state.ctx.auth.authenticate(request.headers.get("authorization"))
    except ApiError as e:
        return e.response()
    request.state.principal = principal   # this request's handler reuses it (see context.request_principal)
    return None


async def _authenticate_first(request: Request) -> JSONResponse | None:
    """For protected routes, a missing or bad PAT is reported (401) before a malformed body (400)."""
    if request.url.path.startswith(_PUBLIC_PREFIXES):
        return None
    return await _authentication_refusal(request)


async def _authenticate_before_body(scope: Scope) -> JSONResponse | None:
    """The 401 for a request whose body must not even be read (see SizeLimitMiddleware). No public route takes
    a body, so a body is never exempt: the public *prefixes* would also exempt ``/health/x`` or ``/docsx``, and
    let anyone make the server buffer a body on them."""
    return await _authentication_refusal(Request(scope))


BodyGate = Callable[[Scope], Awaitable[JSONResponse | None]]


def _gate_before_body(body_gates: Mapping[str, BodyGate]) -> BodyGate:
    """The PAT check before a body, except on the exact paths of ``body_gates``, whose own gate runs instead
    (e.g. the join routes, authorized by attestation, rate-limited before their body is read)."""
    if not body_gates:
        return _authenticate_before_body
    gates = dict(body_gates)

    async def gate(scope: Scope) -> JSONResponse | None:
        own = gates.get(scope.get("path", ""))
        return await (own or _authenticate_before_body)(scope)

    return gate


def create_app(settings: Settings, *, registry: Any | None = None, extra_routers: Sequence[APIRouter] = (),
               clock: Clock | None = None, manage_registry: bool = True,
               body_gates: Mapping[str, BodyGate] | None = None,
               platform_secrets: PlatformSecrets | None = None, signer: AttestedSigner | None = None) -> FastAPI:
    """Build the service. The store opens (and migrates) and the registry starts in the lifespan.

    ``platform_secrets``: the keys (``cube-enclave serve`` passes the sealed ones); when None, built from the
    simulation-only ``settings.server_secret`` / ``server_secret_file`` (tests), else a ConfigError.

    ``registry`` defaults to enclave.registry.Registry over ``settings.backends``; the app starts and stops it
    unless ``manage_registry`` is False. ``clock`` (UTC-aware datetimes) exists for expiry tests. ``body_gates``:
    exact path -> the check run instead of the PAT one before such a request's body is read (``extra_routers``
    that take bodies without a PAT, e.g. ``enclave.join.server.join_body_gates``). ``signer``: the attested
    signing key of receipts and audit checkpoints (``cube-enclave serve`` passes one bound to the platform's
    evidence); when None, in simulation one is made on first use from the simulated platform.
    """
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keys = platform_secrets or _configured_secrets(settings)
        store = await open_store(settings, keys.row_mac_key(), on_integrity_failure=metrics.integrity_failed)
        now = MonotonicClock(clock or utcnow, floor=await store.latest_recorded_time())
        reg = registry if registry is not None else _default_registry(settings)
        tracker = LastUsedTracker(store, interval=settings.last_used_flush_seconds)
        auth = Authenticator(store, keys.pat_hmac_key(), tracker=tracker, cache=settings.auth_cache_enabled(), clock=now,
                             on_failure=_auth_failure_hook(metrics))
        gateway = Gateway(reg.backends(), metrics)
        quotas = open_quotas(settings.quotas, store.engine, keys.row_mac_key(), now,
                             on_integrity_failure=metrics.integrity_failed, on_refusal=metrics.quota_refused)
        gateway.recorder.sinks.append(quotas.sink)
        ledger = Ledger(store.engine, keys.row_mac_key(), settings.usage, hash_key=keys.ledger_hash_key(),
                        registry=metrics.registry,
                        on_integrity_failure=metrics.integrity_failed)
        gateway.recorder.sinks.append(ledger.record)
        signers = _signer_source(settings, signer)
        audit = AuditTrail(store.engine, keys.row_mac_key(), signers, settings.audit, clock=now,
                           registry=metrics.registry)
        app.state.ctx = AppContext(settings=settings, store=store, auth=auth, tracker=tracker, registry=reg,
                                   metrics=metrics, clock=now, gateway=gateway, signer=signers, quotas=quotas,
                                   ledger=ledger, audit=audit)
        try:
            await quotas.start()
            if manage_registry:
                await reg.start()
            tracker.start()
            ledger.start()
            audit.start()
            _freeze_startup_objects()
            log.info("enclave ready: %d backend(s) configured", len(settings.backends))
            yield
        finally:
            gc.unfreeze()  # what this app's lifespan froze may now be collected (tests build many apps)
            await _stop_in_order(
                tracker.stop,
                audit.stop,     # the refusals left and a last checkpoint, while the store is open
                gateway.aclose,
                quotas.stop,    # leases given back
                reg.stop if manage_registry else None,
                ledger.stop,    # after the last request has finished (its record made), before the store closes
                store.close,
            )

    # /docs and /redoc from assets shipped in the package (fastapi-offline), not a CDN: a confidential service
    # makes no third-party requests, and the docs work offline. Swagger UI's online validator is off too.
    app = FastAPIOffline(title="Cube AI enclave", version="0.1.0", lifespan=lifespan, static_url=DOCS_STATIC_URL,
                         swagger_ui_parameters={"validatorUrl": None},
                         description="Models registry served OpenAI-style per domain, with personal access tokens "
                                     "and an admin API. Errors use the OpenAI envelope.")
    app.state.metrics = metrics
    install_error_handlers(app, before_validation_error=_authenticate_first)
    app.include_router(ops.router)
    app.include_router(models.router)
    app.include_router(inference.router)
    app.include_router(ollama.router)
    app.include_router(receipts.router)
    app.include_router(admin.platform)
    app.include_router(admin.domain_admin)
    app.include_router(admin.me)
    app.include_router(usage.router)
    app.include_router(audit_api.router)
    app.include_router(limits.platform)
    app.include_router(limits.domain_admin)
    app.include_router(limits.me)
    for router in extra_routers:
        app.include_router(router)
    # Innermost: the inference routes skip FastAPI's routing (see InferenceFastPath), nothing else.
    app.add_middleware(inference.InferenceFastPath, routes=inference.fast_path_routes(app))
    app.add_middleware(SizeLimitMiddleware, max_header_bytes=settings.limits.max_header_bytes,
                       max_body_bytes=settings.limits.max_body_bytes,
                       before_body=_gate_before_body(body_gates or {}))
    app.add_middleware(AuditMiddleware)   # outside the size limits: sees refusals made before routing too
    app.add_middleware(OllamaErrorShape)   # outside the size limits, so their refusals get Ollama's shape too
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)   # outermost: every response, refusals included, carries one
    _document_configured_limits(app, settings)
    return app


def _document_configured_limits(app: FastAPI, settings: Settings) -> None:
    """The OpenAPI document states this deployment's limits, not the code's ceilings: ``expires_in_days`` is
    at most the configured ``pat_max_ttl_days`` (a larger value is refused with 400)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = generate()
            days = doc["components"]["schemas"]["PatCreate"]["properties"]["expires_in_days"]
            for variant in days.get("anyOf", [days]):
                if variant.get("type") == "integer":
                    variant["maximum"] = settings.pat_max_ttl_days
        return app.openapi_schema or doc

    app.openapi = openapi  # type: ignore[method-assign]
