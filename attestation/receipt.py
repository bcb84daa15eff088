"""Receipts of inference responses: their format, and their offline verification.

A receipt is a statement the enclave signs with its attested signing key (``attestation.signing``) about one
inference request it served::

    {"object": "receipt",
     "statement": {"v": 1, "request_id", "time", "domain_id", "model", "backend", "route", "stream", "status",
                   "request_sha256", "response_sha256"},
     "signature": base64 DER ECDSA P-256 over purpose || 0x00 || canonical_json(statement),
     "signing_key": {"key_id", "public_key": base64 DER SubjectPublicKeyInfo, "evidence": base64 CBOR CMW}}

``time`` is the request's start (RFC 3339, UTC, microseconds); ``request_sha256`` the SHA-256 (hex) of the request
body exactly as the enclave received it, ``response_sha256`` that of the exact response body bytes it sent (a
stream's every chunk, its ending included; what was sent when the client left early). The purpose
``cube-ai/receipt/v1`` keeps the signature from passing for any other kind of statement.

``verify_receipt`` holds only when the request and response bytes hash to the statement's, the key id names the
key, the signature holds for the statement, and the key's evidence binds it and passes the policy (a policy that
leaves the boot chain unmeasured is refused unless it says ``allow_unmeasured``: any image could have signed).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import AttestationError
from .policy import Policy
from .signing import SignatureCheck, canonical_json, key_id, verify_signed
from .verdict import Check

RECEIPT_PURPOSE = "cube-ai/receipt/v1"
RECEIPT_OBJECT = "receipt"
STATEMENT_VERSION = 1
MAX_RECEIPT_BYTES = 1024 * 1024   # evidence is at most 256 KiB, a third more as base64
#: Every statement field and its JSON type (exactly these, no others).
STATEMENT_FIELDS: dict[str, type] = {
    "v": int, "request_id": str, "time": str, "domain_id": str, "model": str, "backend": str, "route": str,
    "stream": bool, "status": int, "request_sha256": str, "response_sha256": str,
}
_DOCUMENT_FIELDS = frozenset({"object", "statement", "signature", "signing_key"})
_KEY_FIELDS = frozenset({"key_id", "public_key", "evidence"})
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
_MAX_TEXT = 1024   # ids, model names, routes


class ReceiptError(AttestationError):
    """A receipt that is not well formed (missing or extra fields, wrong types, bad base64, too large)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rfc3339_utc(when: datetime) -> str:
    """A statement's ``time``: UTC, microseconds, ``Z`` (an aware datetime; naive ones are refused)."""
    if when.tzinfo is None:
        raise ValueError("time must be timezone-aware")
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def receipt_path(domain_id: str, request_id: str) -> str:
    """Where the enclave serves a request's receipt (relative to its origin)."""
    return f"/proxy/{domain_id}/v1/receipts/{request_id}"


@dataclass(frozen=True)
class Receipt:
    statement: dict[str, Any]
    signature: bytes
    key_id: str
    public_key_der: bytes
    evidence_cbor: bytes

    @property
    def signed_bytes(self) -> bytes:
        """The bytes the signature is over (besides the purpose): the statement's canonical JSON."""
        return canonical_json(self.statement)

    def to_json(self) -> dict[str, Any]:
        return receipt_document(self.statement, self.signature, key_id=self.key_id,
                                public_key_der=self.public_key_der, evidence_cbor=self.evidence_cbor)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def receipt_document(statement: dict[str, Any], signature: bytes, *, key_id: str, public_key_der: bytes,
                     evidence_cbor: bytes) -> dict[str, Any]:
    """The receipt as served (JSON-ready)."""
    return {"object": RECEIPT_OBJECT, "statement": dict(statement), "signature": _b64(signature),
            "signing_key": {"key_id": key_id, "public_key": _b64(public_key_der), "evidence": _b64(evidence_cbor)}}


# -- strict parsing -----------------------------------------------------------------------------------------
def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise ReceiptError(f"duplicate field {name!r}")
        out[name] = value
    return out


def _exact_fields(doc: Any, expected: frozenset[str], what: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ReceiptError(f"{what}: must be a JSON object")
    missing, extra = expected - doc.keys(), doc.keys() - expected
    if missing:
        raise ReceiptError(f"{what}: missing {', '.join(sorted(missing))}")
    if extra:
        raise ReceiptError(f"{what}: unknown field(s) {', '.join(sorted(extra))}")
    return doc


def _unb64(value: Any, what: str) -> bytes:
    """Strict base64: the canonical encoding only, so no two texts decode to the same bytes."""
    if type(value) is not str or not value:
        raise ReceiptError(f"{what}: must be a non-empty base64 string")
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ReceiptError(f"{what}: not valid base64") from None
    if _b64(data) != value:
        raise ReceiptError(f"{what}: not canonical base64")
    return data


def _statement(doc: Any) -> dict[str, Any]:
    statement = _exact_fields(doc, frozenset(STATEMENT_FIELDS), "statement")
    for name, kind in STATEMENT_FIELDS.items():
        value = statement[name]
        if type(value) is not kind:   # exact: a bool is not an int, an int is not a bool
            raise ReceiptError(f"statement.{name}: must be a JSON {'boolean' if kind is bool else kind.__name__}")
        if kind is str and not (0 < len(value) <= _MAX_TEXT):
            raise ReceiptError(f"statement.{name}: must be a non-empty string of at most {_MAX_TEXT} characters")
        if kind is str and not _utf8(value):   # a lone surrogate ("\ud800"): no canonical UTF-8 form to verify
            raise ReceiptError(f"statement.{name}: not valid Unicode text")
    if statement["v"] != STATEMENT_VERSION:
        raise ReceiptError(f"statement.v: version {statement['v']} is not supported (this verifier reads "
                           f"{STATEMENT_VERSION})")
    for name in ("request_sha256", "response_sha256"):
        if not _SHA256_HEX.fullmatch(statement[name]):
            raise ReceiptError(f"statement.{name}: must be 64 lowercase hex digits")
    if not _TIME.fullmatch(statement["time"]):
        raise ReceiptError("statement.time: must be RFC 3339 UTC with microseconds (YYYY-MM-DDTHH:MM:SS.ffffffZ)")
    try:
        datetime.fromisoformat(statement["time"].replace("Z", "+00:00"))
    except ValueError:
        raise ReceiptError("statement.time: not a valid date and time") from None
    if not 100 <= statement["status"] <= 599:
        raise ReceiptError("statement.status: must be an HTTP status")
    return statement


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_receipt(data: bytes | str | dict[str, Any]) -> Receipt:
    """A receipt from its JSON (bytes, text or an already parsed object); ``ReceiptError`` when malformed."""
    if isinstance(data, (bytes, str)):
        if len(data) > MAX_RECEIPT_BYTES:
            raise ReceiptError(f"receipt: larger than {MAX_RECEIPT_BYTES} bytes")
        try:
            doc = json.loads(data, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        except ReceiptError:
            raise
        except (ValueError, RecursionError) as exc:
            raise ReceiptError(f"receipt: not valid JSON ({exc})") from None
    else:
        doc = data
    doc = _exact_fields(doc, _DOCUMENT_FIELDS, "receipt")
    if doc["object"] != RECEIPT_OBJECT:
        raise ReceiptError(f"receipt: object must be {RECEIPT_OBJECT!r}")
    statement = _statement(doc["statement"])
    key = _exact_fields(doc["signing_key"], _KEY_FIELDS, "signing_key")
    if type(key["key_id"]) is not str or not _SHA256_HEX.fullmatch(key["key_id"]):
        raise ReceiptError("signing_key.key_id: must be 64 lowercase hex digits")
    return Receipt(statement=dict(statement), signature=_unb64(doc["signature"], "signature"), key_id=key["key_id"],
                   public_key_der=_unb64(key["public_key"], "signing_key.public_key"),
                   evidence_cbor=_unb64(key["evidence"], "signing_key.evidence"))


def _no_constant(name: str) -> Any:
    raise ReceiptError(f"receipt: {name} is not JSON")


# -- verification -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReceiptCheck:
    """The outcome of ``verify_receipt``: ok only when every check passed; ``error`` names the first failure."""

    ok: bool
    error: str | None
    checks: list[Check] = field(default_factory=list)
    statement: dict[str, Any] | None = None
    signature: SignatureCheck | None = None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.error, "checks": [c.to_json() for c in self.checks],
                "statement": self.statement, "key_id": self.signature.key_id if self.signature else None,
                "verdict": self.signature.verdict.to_json() if self.signature and self.signature.verdict else None}


def _hash_check(name: str, data: bytes | None, expected: str) -> Check:
    if data is None:
        return Check(name, False, "not given: the receipt is only about these bytes")
    actual = sha256_hex(data)
    if actual != expected:
        return Check(name, False, f"SHA-256 {actual} differs from the receipt's {expected}")
    return Check(name, True, f"SHA-256 {actual}")


def verify_receipt(receipt: Receipt, *, request: bytes | None, response: bytes | None, policy: Policy,
                   at: datetime | None = None, kds: Any = None, pcs: Any = None) -> ReceiptCheck:
    """Check a parsed receipt against the request body and response body bytes under ``policy``. Every check is
    run (so a report shows all that failed); never raises for bad input."""
    statement = receipt.statement
    checks = [_hash_check("request_sha256", request, statement["request_sha256"]),
              _hash_check("response_sha256", response, statement["response_sha256"])]
    gaps = policy.measurement_gaps()
    if gaps and not policy.allow_unmeasured:
        checks.append(Check("policy_measured", False, "the policy does not pin the boot chain ("
                            + "; ".join(f"{p}: {why}" for p, why in gaps.items())
                            + "): any image on genuine hardware could have signed; list the measurements, or set "
                            "allow_unmeasured: true to accept that"))
    named = key_id(receipt.public_key_der)
    checks.append(Check("key_id", named == receipt.key_id, f"{named}" if named == receipt.key_id else
                        f"signing_key.key_id {receipt.key_id} does not name the key given ({named})"))
    signed = verify_signed(purpose=RECEIPT_PURPOSE, message=receipt.signed_bytes, signature=receipt.signature,
                           public_key_der=receipt.public_key_der, evidence=receipt.evidence_cbor, policy=policy,
                           at=at, kds=kds, pcs=pcs)
    checks.append(Check("signature_and_evidence", signed.ok, signed.error or f"signed by key {signed.key_id}, "
                        "whose evidence binds it and passes the policy"))
    failed = next((c for c in checks if not c.ok), None)
    return ReceiptCheck(ok=failed is None, error=f"{failed.name}: {failed.detail}" if failed else None,
                        checks=checks, statement=dict(statement), signature=signed)
