"""The one rule that ties a TLS key to platform evidence.

``report_data = SHA-512(ATLS_LABEL || SHA-256(SubjectPublicKeyInfo DER) || nonce)`` with a 32-byte
nonce.  The same rule is used on SEV-SNP, TDX and the simulated platform, for the evidence in the
certificate (nonce chosen by the enclave at key creation) and for the evidence served by the
attestation endpoint (nonce chosen by the client).  The label keeps these 64 bytes from being
mistaken for any other use of report_data.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..errors import EvidenceError

ATLS_LABEL = b"cube-ai/atls/v1"
ATLS_SCHEME = ATLS_LABEL.decode("ascii")  # value of binding["scheme"] in an evidence bundle
NONCE_SIZE = 32
REPORT_DATA_SIZE = 64


def report_data_for(spki_der: bytes, nonce: bytes) -> bytes:
    """The 64 bytes of report_data that bind evidence to the key ``spki_der`` and to ``nonce``."""
    if not isinstance(spki_der, (bytes, bytearray)) or not spki_der:
        raise ValueError("spki_der must be non-empty DER bytes")
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be exactly {NONCE_SIZE} bytes")
    spki_hash = hashlib.sha256(bytes(spki_der)).digest()
    return hashlib.sha512(ATLS_LABEL + spki_hash + bytes(nonce)).digest()


def spki_der_of(cert_or_key: Any) -> bytes:
    """SubjectPublicKeyInfo DER of a certificate, a public key or a private key."""
    if isinstance(cert_or_key, x509.Certificate):
        public_key = cert_or_key.public_key()
    elif hasattr(cert_or_key, "public_key"):
        public_key = cert_or_key.public_key()
    else:
        public_key = cert_or_key
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def spki_sha256(spki_der: bytes) -> str:
    """Lowercase hex SHA-256 of SPKI DER: the pin."""
    return hashlib.sha256(spki_der).hexdigest()


def binding_parameters(nonce: bytes) -> dict[str, Any]:
    """The ``binding`` mapping an evidence bundle carries so a verifier can recompute report_data."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be exactly {NONCE_SIZE} bytes")
    return {"scheme": ATLS_SCHEME, "nonce": bytes(nonce)}


def nonce_from_binding(binding: Mapping[str, Any]) -> bytes:
    """The nonce of a bundle's binding parameters; EvidenceError unless the scheme is ours."""
    if binding.get("scheme") != ATLS_SCHEME:
        raise EvidenceError(f"binding: scheme must be {ATLS_SCHEME!r}, got {binding.get('scheme')!r:.60}")
    nonce = binding.get("nonce")
    if type(nonce) is not bytes or len(nonce) != NONCE_SIZE:
        raise EvidenceError(f"binding: nonce must be {NONCE_SIZE} bytes")
    return nonce
