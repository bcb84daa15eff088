"""Statements signed by a key the enclave made and bound to its attestation evidence (receipts, audit checkpoints).

The binding mirrors attested TLS (``attestation.atls.binding``) under its own label, so evidence for a TLS key can
never pass as evidence for a signing key, nor the reverse::

    report_data = SHA-512(SIGNING_LABEL || SHA-256(SubjectPublicKeyInfo DER) || nonce)     ; nonce: 32 bytes

A signature is ECDSA P-256 / SHA-256 (DER) over ``purpose || 0x00 || message``: the purpose (e.g.
``cube-ai/receipt/v1``) keeps a signature made for one kind of statement from verifying as another.

``verify_signed`` is what a verifier runs offline: the evidence must pass the policy *and* bind the key, and the
signature must hold for exactly these bytes. It returns a Verdict-like result and never raises for bad input.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import AttestationError, EvidenceError
from .evidence import Evidence, decode_cmw
from .policy import Policy
from .verdict import Verdict

SIGNING_LABEL = b"cube-ai/signing/v1"
SIGNING_SCHEME = SIGNING_LABEL.decode("ascii")   # binding["scheme"] of a signing key's evidence
NONCE_SIZE = 32


def signing_report_data(spki_der: bytes, nonce: bytes) -> bytes:
    """The 64 bytes of report_data that bind evidence to the signing key ``spki_der`` (and ``nonce``)."""
    if not spki_der:
        raise ValueError("spki_der must be non-empty DER bytes")
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be exactly {NONCE_SIZE} bytes")
    return hashlib.sha512(SIGNING_LABEL + hashlib.sha256(spki_der).digest() + nonce).digest()


def signing_binding(nonce: bytes) -> dict[str, Any]:
    return {"scheme": SIGNING_SCHEME, "nonce": bytes(nonce)}


def key_id(spki_der: bytes) -> str:
    """A signing key's name: lowercase hex SHA-256 of its SubjectPublicKeyInfo DER."""
    return hashlib.sha256(spki_der).hexdigest()


def signed_message(purpose: str, message: bytes) -> bytes:
    return purpose.encode("ascii") + b"\x00" + message


def canonical_json(value: Any) -> bytes:
    """The one byte form of a JSON statement that is signed: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


@dataclass(frozen=True)
class SignatureCheck:
    """The outcome of ``verify_signed``: ok only when the evidence passed, binds the key and the signature holds."""

    ok: bool
    error: str | None
    key_id: str | None = None
    verdict: Verdict | None = None
    checks: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.error, "key_id": self.key_id,
                "verdict": self.verdict.to_json() if self.verdict else None}


def _refused(error: str, **kwargs: Any) -> SignatureCheck:
    return SignatureCheck(ok=False, error=error, **kwargs)


def verify_signed(*, purpose: str, message: bytes, signature: bytes, public_key_der: bytes, evidence: bytes | Evidence,
                  policy: Policy, kds: Any = None, pcs: Any = None, verdicts: dict | None = None,
                  at: datetime | None = None) -> SignatureCheck:
    """Check that ``signature`` over ``message`` (for ``purpose``) was made by the key ``public_key_der`` and that
    ``evidence`` binds that key and passes ``policy``. ``verdicts``: an optional cache (key id -> Verdict) for
    a verifier checking many statements signed by the same few keys. ``at``: the time the evidence is
    verified at (default now)."""
    from .verifier import verify_evidence   # late: the verifier pulls in every platform's parsers

    try:
        public_key = serialization.load_der_public_key(public_key_der)
    except (ValueError, TypeError):
        return _refused("signing key: not a DER SubjectPublicKeyInfo")
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
        return _refused("signing key: must be an ECDSA P-256 key")
    kid = key_id(public_key_der)
    try:
        public_key.verify(signature, signed_message(purpose, message), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return _refused("signature does not verify for this statement and key", key_id=kid)
    except ValueError:
        return _refused("signature: malformed", key_id=kid)
    verdict = verdicts.get(kid) if verdicts is not None else None
    if verdict is None:
        try:
            decoded = evidence if isinstance(evidence, Evidence) else decode_cmw(evidence)
        except EvidenceError as e:
            return _refused(f"evidence of the signing key: {e}", key_id=kid)
        nonce = decoded.binding.get("nonce")
        if decoded.binding.get("scheme") != SIGNING_SCHEME or type(nonce) is not bytes or len(nonce) != NONCE_SIZE:
            return _refused(f"evidence of the signing key: binding scheme must be {SIGNING_SCHEME!r}", key_id=kid)
        try:
            verdict = verify_evidence(decoded, policy=policy, at=at, kds=kds, pcs=pcs,
                                      expected_report_data=signing_report_data(public_key_der, nonce))
        except AttestationError as e:
            return _refused(f"evidence of the signing key: {e}", key_id=kid)
        if verdicts is not None and verdict.ok:
            verdicts[kid] = verdict
    if not verdict.ok:
        return _refused(f"evidence of the signing key refused: {verdict.error}", key_id=kid, verdict=verdict)
    return SignatureCheck(ok=True, error=None, key_id=kid, verdict=verdict)
