"""A request's receipt: its statement (``attestation.receipt``'s format) signed by the enclave's attested key.

Signed when fetched, not when served, so the request path only hashes bytes. The statement is made from the
ledger's entry of the request, which the ledger MAC-verifies when it reads it from the database (and holds in
enclave memory before it is written): a host that edits the database cannot make the enclave sign a hash, a
model or a time it did not record, it can only make a receipt unavailable.
"""

from __future__ import annotations

from datetime import timezone
from typing import Any

from attestation.receipt import RECEIPT_PURPOSE, STATEMENT_VERSION, receipt_document, rfc3339_utc
from attestation.signing import canonical_json
from enclave.usage.entry import UsageEntry
from enclave.signer import AttestedSigner


def has_receipt(entry: UsageEntry) -> bool:
    """Whether the request's response got bytes to the client (a refusal before the backend gets none)."""
    return entry.request_sha256 is not None and entry.response_sha256 is not None


def statement_of(entry: UsageEntry) -> dict[str, Any]:
    """The signed statement about ``entry`` (which must ``has_receipt``)."""
    if not has_receipt(entry):
        raise ValueError(f"request {entry.request_id} has no receipt: its response sent no bytes")
    created = entry.created_at
    if created.tzinfo is None:   # SQLite hands back naive datetimes: the store's are all UTC
        created = created.replace(tzinfo=timezone.utc)
    return {"v": STATEMENT_VERSION, "request_id": entry.request_id, "time": rfc3339_utc(created),
            "domain_id": entry.domain_id, "model": entry.model, "backend": entry.backend, "route": entry.route,
            "stream": bool(entry.stream), "status": int(entry.status), "request_sha256": entry.request_sha256,
            "response_sha256": entry.response_sha256}


def issue_receipt(entry: UsageEntry, signer: AttestedSigner) -> dict[str, Any]:
    """The receipt document (JSON-ready): the statement, its signature, the key and the key's evidence."""
    statement = statement_of(entry)
    signature = signer.sign(RECEIPT_PURPOSE, canonical_json(statement))
    identity = signer.identity
    return receipt_document(statement, signature, key_id=identity.key_id, public_key_der=identity.public_key_der,
                            evidence_cbor=identity.evidence_cbor)
