"""GET /.well-known/cube-ai/attestation?nonce=<64 hex>: fresh evidence for the caller's connection.

The evidence is bound (see attestation.atls.binding) to the key of the certificate that served
*the connection this request arrived on* — not merely the current key, which may have rotated
since that handshake — and to the caller's nonce.  No authentication: it proves what the enclave
is before any credential is sent.  A per-client token bucket keeps one client from exhausting the
platform's attestation device, and the TlsManager serialises access to the provider.
"""

from __future__ import annotations

import ipaddress
import math
import re
import threading
import time
from collections import OrderedDict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from attestation.errors import AttestationError
from attestation.evidence import encode_cmw, evidence_to_json

from .errors import ApiError
from .tls import STATE_KEY, KeyMaterial, TlsManager

ATTESTATION_PATH = "/.well-known/cube-ai/attestation"
CMW_CBOR_MEDIA_TYPE = "application/cmw+cbor"
_NONCE = re.compile(r"[0-9a-fA-F]{64}")


class TokenBucket:
    """Per-client token buckets (client address -> tokens), bounded in memory (least recently seen evicted)."""

    def __init__(self, rate: float, burst: int, *, max_clients: int = 10_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """0.0 when a token was taken, else the seconds until one is available."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[client] = (tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return wait


def rate_limit_key(host: str) -> str:
    """The bucket of a client address: its IPv6 /64 (one host usually holds a whole /64, so per-address
    buckets would let it hop addresses freely); IPv4-mapped IPv6 counts as the IPv4 address."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _parse_nonce(request: Request) -> bytes:
    values = request.query_params.getlist("nonce")
    if not values:
        raise ApiError(400, "Missing query parameter `nonce` (64 hexadecimal characters).", code="missing_nonce",
                       param="nonce")
    if len(values) > 1:
        raise ApiError(400, "Query parameter `nonce` given more than once.", code="invalid_nonce", param="nonce")
    value = values[0]
    if not _NONCE.fullmatch(value):
        raise ApiError(400, "Query parameter `nonce` must be exactly 64 hexadecimal characters (32 bytes).",
                       code="invalid_nonce", param="nonce")
    return bytes.fromhex(value)


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    return "application/json" in accept and CMW_CBOR_MEDIA_TYPE not in accept


def attestation_router(tls: TlsManager, *, per_client_rate: float = 2.0, burst: int = 10) -> APIRouter:
    """The router serving the attestation endpoint; ``per_client_rate`` is requests/second per address."""
    limiter = TokenBucket(per_client_rate, burst)
    router = APIRouter()

    @router.get(ATTESTATION_PATH, include_in_schema=True, tags=["attestation"])
    async def attestation(request: Request) -> Response:
        try:
            nonce = _parse_nonce(request)
            client = rate_limit_key(request.client.host) if request.client else "unknown"
            wait = limiter.take(client)
            if wait > 0:
                raise ApiError(429, "Too many attestation requests from this address; retry later.",
                               code="rate_limit_exceeded", type="rate_limit_error",
                               headers={"Retry-After": str(max(1, math.ceil(wait)))})
            material = request.scope.get("state", {}).get(STATE_KEY)
            if not isinstance(material, KeyMaterial):
                raise ApiError(503, "This connection was not served by the enclave's attested TLS key.",
                               code="attestation_unavailable", type="api_error")
            try:
                evidence = await run_in_threadpool(tls.evidence_for_key, material, nonce)
            except AttestationError:
                raise ApiError(503, "The platform could not produce evidence right now.",
                               code="attestation_unavailable", type="api_error") from None
        except ApiError as err:
            return err.response()
        headers = {"Cache-Control": "no-store"}
        if _wants_json(request):
            return JSONResponse(evidence_to_json(evidence), headers=headers)
        return Response(encode_cmw(evidence), media_type=CMW_CBOR_MEDIA_TYPE, headers=headers)

    return router
