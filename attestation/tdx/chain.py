"""Certificate chains and CRLs rooted at the pinned Intel SGX Root CA (ECDSA P-256 / SHA-256 throughout).

Checks made per chain: the last certificate is the pinned root (SHA-256 of its DER) and self-signed; each
certificate is signed by the next one (ECDSA P-256 SHA-256), its issuer name equals the next one's subject,
it is valid at the verification time; every certificate above the leaf is a CA (BasicConstraints) allowed to
sign certificates (KeyUsage keyCertSign when present); the leaf is not a CA; CNs are the expected ones.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from ..errors import ParseError
from ..x509parse import cert_der, load_der_crl, load_pem_crl
from . import der
from .trust import INTEL_SGX_ROOT_CA_SHA256, ROOT_CA_CN


_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


class ChainError(Exception):
    """Internal: a chain or CRL check failed; verify.py turns it into a named failed check."""


def common_name(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


@lru_cache(maxsize=64)
def _fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _p256_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ChainError(f"'{common_name(cert.subject)}' does not carry a P-256 key")
    return key


def _verify_signed_by(cert: x509.Certificate, issuer: x509.Certificate, cert_cn: str, issuer_cn: str) -> None:
    """Signature algorithm, issuer-name chaining and ECDSA signature (names compared by the Rust core)."""
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA256:
        raise ChainError(f"'{cert_cn}' is not signed with ECDSA-SHA256")
    _p256_key(issuer)
    try:
        cert.verify_directly_issued_by(issuer)
    except ValueError:
        raise ChainError(f"issuer name of '{cert_cn}' is not the subject of '{issuer_cn}'") from None
    except (InvalidSignature, TypeError):
        raise ChainError(f"signature on '{cert_cn}' does not verify with '{issuer_cn}'") from None


def _basic_ca(cert: x509.Certificate) -> bool | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return None


def _check_ca(cert: x509.Certificate, cn: str) -> None:
    if _basic_ca(cert) is not True:
        raise ChainError(f"'{cn}' is not a CA (BasicConstraints)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise ChainError(f"'{cn}' may not sign certificates (KeyUsage)")


@dataclass(frozen=True)
class VerifiedChain:
    """A chain that passed every structural and signature check; valid for times in [not_before, not_after]."""

    certs: tuple[x509.Certificate, ...]
    not_before: datetime
    not_after: datetime

    def valid_at(self, at: datetime) -> bool:
        return self.not_before <= at <= self.not_after


def verify_chain_structure(
    certs: Sequence[x509.Certificate],
    *,
    leaf_cns: Sequence[str],
    intermediate_cns: Sequence[str] = (),
) -> VerifiedChain:
    """Every time-independent check of a leaf [<- intermediate] <- pinned root chain."""
    length = 2 + (1 if intermediate_cns else 0)
    if len(certs) != length:
        raise ChainError(f"chain must hold {length} certificates, got {len(certs)}")
    root = certs[-1]
    names = [common_name(c.subject) for c in certs]
    if _fingerprint(cert_der(root)) != INTEL_SGX_ROOT_CA_SHA256:
        raise ChainError("chain root is not the pinned Intel SGX Root CA")
    if names[-1] != ROOT_CA_CN or root.issuer != root.subject:
        raise ChainError("root is not the self-issued 'Intel SGX Root CA'")
    # The pinned DER is the trust anchor itself; as in RFC 5280 path validation its self-signature adds nothing.
    _check_ca(root, names[-1])
    if names[0] not in leaf_cns:
        raise ChainError(f"leaf CN '{names[0]}' is not one of {list(leaf_cns)}")
    if _basic_ca(certs[0]) is True:
        raise ChainError(f"leaf '{names[0]}' claims to be a CA")
    if intermediate_cns:
        if names[1] not in intermediate_cns:
            raise ChainError(f"intermediate CN '{names[1]}' is not one of {list(intermediate_cns)}")
        _check_ca(certs[1], names[1])
    for i in range(len(certs) - 1):
        _verify_signed_by(certs[i], certs[i + 1], names[i], names[i + 1])
    return VerifiedChain(
        certs=tuple(certs),
        not_before=max(c.not_valid_before_utc for c in certs),
        not_after=min(c.not_valid_after_utc for c in certs),
    )


def check_validity(chain: VerifiedChain, at: datetime) -> None:
    for cert in chain.certs:
        if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            raise ChainError(
                f"'{common_name(cert.subject)}' is not valid at {at.isoformat()} "
                f"(valid {cert.not_valid_before_utc.isoformat()} .. {cert.not_valid_after_utc.isoformat()})"
            )


def load_crl(data: bytes, what: str) -> tuple[x509.CertificateRevocationList, bytes]:
    """DER, PEM or hex text (PCCS style) -> (CRL, its DER); ParseError when it is none of these.

    The CRL is fully inspected (attestation.x509parse): its issuer and entries are safe to read later."""
    if not isinstance(data, (bytes, bytearray)):
        raise ParseError(f"{what} must be bytes")
    data = bytes(data)
    blob = data.strip()
    if blob.startswith(b"-----BEGIN"):
        crl = load_pem_crl(blob, what)
        return crl, crl.public_bytes(Encoding.DER)
    if blob and len(blob) % 2 == 0 and all(c in b"0123456789abcdefABCDEF" for c in blob[:64]):
        try:
            der_bytes = bytes.fromhex(blob.decode("ascii"))
            return load_der_crl(der_bytes, what), der_bytes
        except (ValueError, UnicodeDecodeError, ParseError):
            pass  # not hex of a CRL after all: try the bytes as DER
    return load_der_crl(data, what), data


def _crl_tbs(der_bytes: bytes) -> bytes:
    """The exact tbsCertList bytes of a DER CRL (cryptography's tbs_certlist_bytes re-encodes, slowly)."""
    _, start, end = der.read_tlv(der_bytes, 0)
    _, _, tbs_end = der.read_tlv(der_bytes, start, end)
    return der_bytes[start:tbs_end]


@dataclass(frozen=True)
class VerifiedCrl:
    crl: x509.CertificateRevocationList
    this_update: datetime
    next_update: datetime
    revoked_serials: frozenset[int]


def verify_crl(
    crl: x509.CertificateRevocationList, crl_der: bytes, issuer: x509.Certificate, what: str
) -> VerifiedCrl:
    """Issuer name and ECDSA signature of a CRL; time checks are separate (check_crl_time)."""
    if crl.issuer != issuer.subject:
        raise ChainError(f"{what} is issued by '{common_name(crl.issuer)}', not '{common_name(issuer.subject)}'")
    if crl.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA256:
        raise ChainError(f"{what} is not signed with ECDSA-SHA256")
    try:
        tbs = _crl_tbs(crl_der)
    except ParseError:
        raise ChainError(f"{what} is not DER") from None
    try:
        _p256_key(issuer).verify(crl.signature, tbs, _ECDSA_SHA256)
    except InvalidSignature:
        raise ChainError(f"{what} signature does not verify with '{common_name(issuer.subject)}'") from None
    next_update = crl.next_update_utc
    if next_update is None:
        raise ChainError(f"{what} has no nextUpdate")
    return VerifiedCrl(crl, crl.last_update_utc, next_update, frozenset(r.serial_number for r in crl))


def check_crl_time(vcrl: VerifiedCrl, at: datetime, what: str) -> None:
    if at < vcrl.this_update:
        raise ChainError(f"{what} was issued after {at.isoformat()} ({vcrl.this_update.isoformat()})")
    if at > vcrl.next_update:
        raise ChainError(f"{what} expired at {vcrl.next_update.isoformat()} (checked at {at.isoformat()})")


def check_not_revoked(vcrl: VerifiedCrl, cert: x509.Certificate, what: str) -> None:
    if cert.serial_number in vcrl.revoked_serials:
        raise ChainError(f"'{common_name(cert.subject)}' (serial {cert.serial_number:x}) is revoked by {what}")
