"""What receipts are made from: the usage ledger's entry of a request (``enclave.usage``, ``ctx.ledger``).

Only the fields a receipt needs are named here, so this package depends on the ledger's interface, not on its
storage.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol


class ReceiptEntry(Protocol):
    """One served request as the ledger holds it (``UsageEntry``; read only here)."""

    request_id: str
    created_at: datetime            # the request's start, UTC
    domain_id: str
    pat_id: str
    model: str
    backend: str
    route: str
    stream: bool
    status: int
    request_sha256: str | None
    response_sha256: str | None     # None: the response never got bytes (refused, failed before answering)


class ReceiptSource(Protocol):
    async def find(self, request_id: str) -> ReceiptEntry | None:
        """The request's entry (records not yet written first, then the database, MAC-verified: an entry
        whose MAC fails is None)."""
        ...
