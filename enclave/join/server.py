"""The routes a running replica serves so that a new one can join (see ``enclave.join.protocol``).

No PAT: the exchange is machine to machine, authorized only by the appraisal of the joiner's evidence under the
join policy. Requests must arrive over the enclave's attested TLS (the key of their connection is the one the
joiner's evidence must name). One token bucket for the whole replica bounds the work (an appraisal verifies a
certificate chain and a signature; behind the host relay every peer has the same address, so a per-address
bucket would mean nothing); it is taken before a body is read (``before_body``). Every attempt is logged
(accepted / refused and why, never a secret) and counted in ``cube_join_requests_total{outcome, reason}``.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope

from attestation.peer import join_report_data
from attestation.policy import Policy
from attestation.ratelimit import TokenBucket
from attestation.verifier import verify_evidence
from enclave.errors import ApiError
from enclave.platform_secrets import PlatformSecrets
from enclave.tls import STATE_KEY, KeyMaterial

from .protocol import (
    CHALLENGE_PATH,
    JOIN_PATHS,
    MAX_REQUEST_BYTES,
    NONCE_TTL_SECONDS,
    SECRETS_PATH,
    Challenge,
    MessageError,
    SecretsAnswer,
    SecretsRequest,
    seal_for_joiner,
)

log = logging.getLogger("enclave.join")

MAX_OUTSTANDING_NONCES = 1024
_BUCKET = "join"   # one bucket for the whole replica


class NonceStore:
    """Single-use challenge nonces, each tied to the SPKI hash of the TLS key it was issued on; bounded (oldest
    dropped first) and expiring after ``ttl`` seconds."""

    def __init__(self, *, ttl: float = NONCE_TTL_SECONDS, limit: int = MAX_OUTSTANDING_NONCES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._limit = limit
        self._clock = clock
        self._issued: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self, spki_sha256: bytes) -> bytes:
        nonce = secrets.token_bytes(32)
        with self._lock:
            self._issued[nonce] = (spki_sha256, self._clock() + self._ttl)
            while len(self._issued) > self._limit:
                self._issued.popitem(last=False)
        return nonce

    def redeem(self, nonce: bytes, spki_sha256: bytes) -> str | None:
        """None when ``nonce`` was issued on this key and is still valid (it is used up either way), else why not."""
        with self._lock:
            entry = self._issued.pop(nonce, None)
        if entry is None:
            return "the nonce was not issued by this replica, or was used already"
        issued_on, expiry = entry
        if self._clock() >= expiry:
            return "the nonce expired"
        if not hmac.compare_digest(issued_on, spki_sha256):
            return "the nonce was issued on another TLS key of this replica"
        return None


class JoinService:
    """What the join routes need: the secrets to hand out, the join policy, the nonce store and the rate limit.

    ``secrets``: a callable returning this replica's PlatformSecrets (called only after an appraisal passed).
    ``verify``: the evidence verifier (``attestation.verifier.verify_evidence``; tests may wrap it).
    """

    def __init__(self, secrets_source: Callable[[], PlatformSecrets], policy: Policy, *, rate: float = 1.0,
                 burst: int = 5, nonces: NonceStore | None = None, verify: Callable[..., Any] = verify_evidence,
                 kds: Any = None, pcs: Any = None) -> None:
        self._secrets = secrets_source
        self.policy = policy
        self.nonces = nonces or NonceStore()
        self._bucket = TokenBucket(rate, burst)
        self._verify = verify
        self._collateral = {k: v for k, v in (("kds", kds), ("pcs", pcs)) if v is not None}

    def rate_limited(self) -> ApiError | None:
        wait = self._bucket.take(_BUCKET)
        if wait <= 0:
            return None
        return ApiError(429, "Too many join requests; retry later.", code="rate_limit_exceeded",
                        type="rate_limit_error", headers={"Retry-After": str(max(1, math.ceil(wait)))})

    async def before_body(self, scope: Scope) -> JSONResponse | None:
        """The gate for a join request's body (in place of the PAT check): the rate limit, before any body byte
        is read. The token it takes is the request's (the handler does not take another). A Content-Length
        larger than a join message is refused first: without a PAT, a body may be no bigger than that (a chunked
        one stays bounded by ``limits.max_body_bytes`` and is refused when parsed)."""
        if _declared_length(scope) > MAX_REQUEST_BYTES:
            _count(scope.get("app"), "refused", "too_large")
            log.warning("join refused (too_large): a body over %d bytes declared", MAX_REQUEST_BYTES)
            return ApiError(413, f"A join request is at most {MAX_REQUEST_BYTES} bytes.",
                            code="body_too_large").response()
        refusal = self.rate_limited()
        if refusal is not None:
            _count(scope.get("app"), "refused", "rate_limited")
            log.warning("join refused (rate_limited): before the body was read")
            return refusal.response()
        scope.setdefault("state", {})["cube_ai_join_admitted"] = True
        return None

    def answer(self, request: SecretsRequest, material: KeyMaterial) -> tuple[str, SecretsAnswer | str]:
        """("accepted", answer) or (reason code, why): the appraisal, then the sealed secrets. Runs in a thread."""
        spki_hash = bytes.fromhex(material.spki_sha256)
        why = self.nonces.redeem(request.nonce, spki_hash)
        if why is not None:
            return "nonce", why
        expected = join_report_data(spki_hash, request.nonce, request.public_key)
        verdict = self._verify(request.evidence, policy=self.policy, expected_report_data=expected,
                               **self._collateral)
        if not verdict.ok:
            binding = any(c.name == "report_data" and not c.ok for c in verdict.checks)
            return ("binding" if binding else "policy"), f"{verdict.status}: {verdict.error}"
        claims = verdict.claims
        # belt and braces: the appraised report_data is exactly this exchange's binding
        if not hmac.compare_digest(str(claims.get("report_data", "")).lower().encode(), expected.hex().encode()):
            return "binding", "the appraised report_data is not this exchange's binding"
        try:
            server_key, sealed = seal_for_joiner(self._secrets().to_bytes(), server_spki_sha256=spki_hash,
                                                 nonce=request.nonce, joiner_key=request.public_key)
        except MessageError as exc:
            return "malformed", str(exc)
        log.info("join accepted: a %s peer, measurement %s, chip %s, on TLS key %s", verdict.platform,
                 claims.get("measurement") or claims.get("mrtd"), str(claims.get("chip_id", ""))[:16] or "-",
                 material.spki_sha256[:16])
        return "accepted", SecretsAnswer(server_key, sealed)


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return int(value)   # SizeLimitMiddleware has refused one that is not a number
    return 0


def _count(app: Any, outcome: str, reason: str) -> None:
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    counter = getattr(metrics, "join_requests", None)
    if counter is not None:
        counter.labels(outcome=outcome, reason=reason).inc()


def _refuse(request: Request, status: int, reason: str, message: str, code: str) -> JSONResponse:
    _count(request.app, "refused", reason)
    log.warning("join refused (%s): %s", reason, message)
    return ApiError(status, message, code=code).response()


def _refuse_limited(request: Request, limited: ApiError) -> JSONResponse:
    _count(request.app, "refused", "rate_limited")
    log.warning("join refused (rate_limited): %s", limited.message)
    return limited.response()


def _connection_key(request: Request) -> KeyMaterial | None:
    material = request.scope.get("state", {}).get(STATE_KEY)
    return material if isinstance(material, KeyMaterial) else None


def _take_token(service: JoinService, request: Request) -> ApiError | None:
    """The rate limit for a request the body gate did not already charge (one without a body)."""
    if request.scope.get("state", {}).get("cube_ai_join_admitted"):
        return None
    return service.rate_limited()


def _admit(service: JoinService, request: Request) -> tuple[Any, JSONResponse | None]:
    """(the connection's attested key material, None), or (None, the refusal): the two checks before either
    join route does anything, in this order (an unattested connection is not charged a rate-limit token)."""
    material = _connection_key(request)
    if material is None:
        return None, _refuse(request, 503, "not_attested", "This connection is not on the enclave's attested TLS key.",
                             "attestation_unavailable")
    limited = _take_token(service, request)
    if limited is not None:
        return None, _refuse_limited(request, limited)
    return material, None


def join_router(service: JoinService) -> APIRouter:
    router = APIRouter()
    no_store = {"Cache-Control": "no-store"}

    @router.post(CHALLENGE_PATH, tags=["replicas"], summary="A single-use nonce for a joining replica's evidence")
    async def challenge(request: Request) -> JSONResponse:
        material, refusal = _admit(service, request)
        if refusal is not None:
            return refusal
        spki_hash = bytes.fromhex(material.spki_sha256)
        nonce = service.nonces.issue(spki_hash)
        return JSONResponse(Challenge(nonce, spki_hash).to_json(), headers=no_store)

    @router.post(SECRETS_PATH, tags=["replicas"],
                 summary="The platform secrets, sealed to a joining replica whose evidence passes the join policy")
    async def platform_secrets(request: Request) -> JSONResponse:
        material, refusal = _admit(service, request)
        if refusal is not None:
            return refusal
        try:
            message = SecretsRequest.parse(await request.body())
        except MessageError as exc:
            return _refuse(request, 400, "malformed", f"Malformed join request: {exc}", "invalid_join_request")
        outcome, result = await run_in_threadpool(service.answer, message, material)
        if isinstance(result, SecretsAnswer):
            _count(request.app, "accepted", "appraised")
            return JSONResponse(result.to_json(), headers=no_store)
        status = 400 if outcome == "malformed" else 403
        return _refuse(request, status, outcome, f"Join refused: {result}", "join_refused")

    return router


def join_body_gates(service: JoinService) -> dict[str, Callable[[Scope], Any]]:
    """The path -> gate mapping ``create_app(body_gates=...)`` runs instead of the PAT check for these paths."""
    return {path: service.before_body for path in JOIN_PATHS}
