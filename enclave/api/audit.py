"""The audit trail's export (``GET /admin/audit/export``), for ``cube-attest verify-audit``; superadmin only.

The export is itself an audited action: its entry is written when the response starts, so it is in the export,
which ends with a checkpoint signed over its last entry (enclave.audit.export).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from enclave.access import Principal, may_export_audit
from enclave.api.context import authenticated, check
from enclave.api.schemas import ERROR_RESPONSES
from enclave.audit.export import export_lines

router = APIRouter(prefix="/admin/audit", tags=["audit"], responses=ERROR_RESPONSES)


@router.get("/export", summary="The audit trail as JSON lines: entries, signed checkpoints, keys and evidence",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}},
                             "description": "one JSON object per line (attestation.audit); verify with "
                                            "`cube-attest verify-audit EXPORT --policy P`"}})
async def export_audit(request: Request, since: int | None = Query(None, ge=1, description="first seq"),
                       until: int | None = Query(None, ge=1, description="last seq (default: the head)"),
                       principal: Principal = Depends(authenticated)) -> StreamingResponse:
    check(may_export_audit(principal))
    trail = request.app.state.ctx.audit
    return StreamingResponse(export_lines(trail, since=since, until=until), media_type="application/x-ndjson")
