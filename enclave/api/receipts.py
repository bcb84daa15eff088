"""``GET /proxy/{domain_id}/v1/receipts/{request_id}``: the signed receipt of an inference response.

Only the key that made the request gets it, asked under the domain it was made in (``access.may_fetch_receipt``);
everyone else, like an unknown id or a request whose response sent no bytes, gets the same 404
``receipt_not_found``. The receipt is signed now, off the request path (``enclave.receipts.issuer``); verify it
offline with ``cube-attest verify-receipt`` (``attestation.receipt``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError

from enclave.access import RECEIPT_NOT_FOUND, may_fetch_receipt
from enclave.api.context import AppContext, check
from enclave.api.schemas import ERROR_RESPONSES, DomainRef, ErrorEnvelope
from enclave.errors import ApiError
from enclave.receipts.issuer import has_receipt, issue_receipt

log = logging.getLogger("enclave.receipts")
router = APIRouter(tags=["receipts"])

#: Request ids are the enclave's own (``enclave.request_id``: 32 hex digits); anything else is simply unknown.
_REQUEST_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
RequestIdRef = Annotated[str, Path(description="the request's `x-request-id`", max_length=100)]


class Statement(BaseModel):
    v: int
    request_id: str
    time: str
    domain_id: str
    model: str
    backend: str
    route: str
    stream: bool
    status: int
    request_sha256: str
    response_sha256: str


class SigningKey(BaseModel):
    key_id: str
    public_key: str
    evidence: str


class ReceiptDocument(BaseModel):
    object: str
    statement: Statement
    signature: str
    signing_key: SigningKey


_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    404: {"model": ErrorEnvelope, "description": "No receipt for this key: unknown request, another key's request, "
                                                 "or a response that sent no bytes (all alike)"},
    503: {"model": ErrorEnvelope, "description": "The attested signing key, or the usage database, is not "
                                                 "available (`signer_unavailable`, `receipt_unavailable`)"},
}


@router.get("/proxy/{domain_id}/v1/receipts/{request_id}", response_model=ReceiptDocument, responses=_RESPONSES,
            summary="The signed receipt of an inference response this key received",
            openapi_extra={"security": [{"PAT": []}]})
async def get_receipt(domain_id: DomainRef, request_id: RequestIdRef, request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    principal = await ctx.auth.authenticate(request.headers.get("authorization"))
    if not _REQUEST_ID.fullmatch(request_id):
        check(RECEIPT_NOT_FOUND)
    domain = await ctx.auth.domain(domain_id)
    try:
        entry = await ctx.ledger.find(request_id)   # MAC-verified: the host cannot have it sign a forged hash
    except (SQLAlchemyError, OSError) as e:   # the database is down: a written record cannot be read now
        raise ApiError(503, "The usage database cannot be read right now; try again shortly.",
                       code="receipt_unavailable", type="api_error") from e
    check(may_fetch_receipt(principal, domain.id if domain is not None else None,
                            entry.pat_id if entry is not None else None,
                            entry.domain_id if entry is not None else None))
    assert entry is not None
    if not has_receipt(entry):
        check(RECEIPT_NOT_FOUND)
    try:
        signer = await asyncio.to_thread(ctx.signer.get)   # the first use makes evidence (a device call)
        document = issue_receipt(entry, signer)
    except Exception as e:   # noqa: BLE001 - any signer failure is the same 503; never a half-made receipt
        log.error("receipt for request %s not signed: signer unavailable (%s)", request_id, type(e).__name__)
        raise ApiError(503, "The attested signing key is not available; try again later.",
                       code="signer_unavailable", type="api_error") from None
    return Response(json.dumps(document, separators=(",", ":")).encode(), media_type="application/json")
