"""GET /.well-known/cube-ai/attestation?nonce=<64 hex>: fresh evidence for the caller's connection.

The evidence is bound (see attestation.atls.binding) to the key of the certificate that served
*the connection this request arrived on* — not merely the current key, which may have rotated
since that handshake — and to the caller's nonce.  No authentication: it proves what the enclave
is before any credential is sent.

Fair sharing of the attestation device, whoever the peer is: the rate limit is a token bucket per
*TLS connection*, never per peer address (behind the host relay every client has the relay's
address, so a per-address bucket let two attackers exhaust every victim's first attestation).  A
connection carries one request at a time, and requests reach the device through one FIFO queue, so
a client hammering on its own connections is refused (429) on those connections, while another
client's request waits at most one turn per open connection and is never refused for it. A request
whose client hangs up while it waits leaves the queue (else connect, ask, hang up, repeat would grow
the queue without holding any connection, each orphan costing a device call).
"""

from __future__ import annotations

import asyncio
import math
import re

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from attestation.errors import AttestationError
from attestation.evidence import encode_cmw, evidence_to_json
from attestation.ratelimit import TokenBucket

from .errors import ApiError
from .tls import CONNECTION_KEY, STATE_KEY, KeyMaterial, TlsManager

ATTESTATION_PATH = "/.well-known/cube-ai/attestation"
CMW_CBOR_MEDIA_TYPE = "application/cmw+cbor"
_NONCE = re.compile(r"[0-9a-fA-F]{64}")


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


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}}


#: What the handler accepts and answers, for the OpenAPI document (it parses ``nonce`` itself, so that every
#: refusal is the OpenAI error envelope with a precise code).
OPENAPI = {
    "parameters": [{"name": "nonce", "in": "query", "required": True,
                    "description": "the client's fresh 32-byte nonce, 64 hexadecimal characters",
                    "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$", "minLength": 64, "maxLength": 64}}],
    "responses": {
        "200": {"description": "evidence bound to this connection's TLS key and the nonce",
                "content": {CMW_CBOR_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
                            "application/json": {"schema": {"type": "object"}}}},
        "400": _error("missing, repeated or malformed nonce"),
        "429": _error("too many attestation requests on this connection (Retry-After says when to retry)"),
        "503": _error("no evidence now: the connection is not on the attested key, the platform failed, or the "
                      "client hung up while waiting"),
    },
}


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected (the request has no body: the message after its empty body
    is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _take_unless_client_gone(device: asyncio.Semaphore, request: Request) -> bool:
    """Wait for the device in FIFO order; False, not holding it, when the client hangs up first."""
    acquire = asyncio.ensure_future(device.acquire())
    gone = asyncio.ensure_future(_client_gone(request))
    await asyncio.wait({acquire, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if acquire.done():
        return True
    acquire.cancel()
    try:
        await acquire  # it may have been granted meanwhile: then it is held, and used
    except asyncio.CancelledError:
        return False
    return True


def attestation_router(tls: TlsManager, *, per_connection_rate: float = 2.0, burst: int = 10) -> APIRouter:
    """The router serving the attestation endpoint; ``per_connection_rate`` is requests/second per TLS
    connection (after a burst of ``burst``)."""
    limiter = TokenBucket(per_connection_rate, burst)
    device = asyncio.Semaphore(1)  # FIFO: waiters are served in arrival order
    router = APIRouter()

    @router.get(ATTESTATION_PATH, include_in_schema=True, tags=["attestation"], openapi_extra=OPENAPI,
                summary="Fresh evidence for this connection's TLS key and the client's nonce")
    async def attestation(request: Request) -> Response:
        try:
            nonce = _parse_nonce(request)
            state = request.scope.get("state", {})
            material = state.get(STATE_KEY)
            if not isinstance(material, KeyMaterial):
                raise ApiError(503, "This connection was not served by the enclave's attested TLS key.",
                               code="attestation_unavailable", type="api_error")
            wait = limiter.take(state.get(CONNECTION_KEY))
            if wait > 0:
                raise ApiError(429, "Too many attestation requests on this connection; retry later.",
                               code="rate_limit_exceeded", type="rate_limit_error",
                               headers={"Retry-After": str(max(1, math.ceil(wait)))})
            if not await _take_unless_client_gone(device, request):
                raise ApiError(503, "The client hung up while waiting for the platform.", code="client_gone",
                               type="api_error")
            try:
                evidence = await run_in_threadpool(tls.evidence_for_key, material, nonce)
            except AttestationError:
                raise ApiError(503, "The platform could not produce evidence right now.",
                               code="attestation_unavailable", type="api_error") from None
            finally:
                device.release()
        except ApiError as err:
            return err.response()
        headers = {"Cache-Control": "no-store"}
        if _wants_json(request):
            return JSONResponse(evidence_to_json(evidence), headers=headers)
        return Response(encode_cmw(evidence), media_type=CMW_CBOR_MEDIA_TYPE, headers=headers)

    return router
