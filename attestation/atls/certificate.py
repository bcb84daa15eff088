"""Self-signed X.509 certificates that carry attestation evidence in the id-pe-cmw extension.

The extension (OID 1.3.6.1.5.5.7.1.35, draft-ietf-rats-msg-wrap) is non-critical; its value is
the DER of ``CMW ::= CHOICE { json UTF8String, cbor OCTET STRING }``.  We always write the
``cbor`` alternative: an OCTET STRING holding the CBOR CMW record from ``encode_cmw``.
Extraction is strict and raises EvidenceError for anything else.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import EvidenceError
from ..evidence import MAX_EVIDENCE_BYTES
from ..x509parse import CRYPTOGRAPHY_PARSE_ERRORS

ID_PE_CMW = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.35")
CERTIFICATE_CN = "Cube AI attested enclave"
_DER_OCTET_STRING = 0x04
_DER_UTF8_STRING = 0x0C
_CLOCK_SKEW = timedelta(minutes=5)


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def cmw_extension_value(evidence_cmw: bytes) -> bytes:
    """DER of the CMW CHOICE, ``cbor`` alternative (an OCTET STRING of the CBOR record)."""
    return bytes([_DER_OCTET_STRING]) + _der_length(len(evidence_cmw)) + evidence_cmw


def parse_cmw_extension_value(der: bytes) -> bytes:
    """Inverse of :func:`cmw_extension_value`: the CBOR CMW bytes; strict DER (one TLV, minimal length)."""
    if len(der) < 2:
        raise EvidenceError("id-pe-cmw: extension value is truncated")
    tag = der[0]
    if tag == _DER_UTF8_STRING:
        raise EvidenceError("id-pe-cmw: the JSON CMW alternative is not supported; expected the CBOR one")
    if tag != _DER_OCTET_STRING:
        raise EvidenceError(f"id-pe-cmw: expected an OCTET STRING (0x04), got tag 0x{tag:02x}")
    first = der[1]
    if first < 0x80:
        length, offset = first, 2
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or len(der) < 2 + n:
            raise EvidenceError("id-pe-cmw: bad DER length")
        length = int.from_bytes(der[2 : 2 + n], "big")
        offset = 2 + n
        if length < 0x80 or der[2] == 0:
            raise EvidenceError("id-pe-cmw: DER length is not minimally encoded")
    if length > MAX_EVIDENCE_BYTES:
        raise EvidenceError(f"id-pe-cmw: {length} bytes exceeds the limit of {MAX_EVIDENCE_BYTES}")
    if offset + length != len(der):
        raise EvidenceError("id-pe-cmw: length does not match the extension value (truncated or trailing bytes)")
    if length == 0:
        raise EvidenceError("id-pe-cmw: empty evidence")
    return der[offset:]


def _subject_alt_names(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_attested_certificate(
    key: ec.EllipticCurvePrivateKey,
    evidence_cmw: bytes,
    hostnames: Sequence[str],
    not_after: datetime,
    *,
    not_before: datetime | None = None,
) -> x509.Certificate:
    """A self-signed server certificate for ``key`` with the CBOR CMW evidence as a non-critical extension."""
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("key must be an ECDSA private key (P-256 or P-384)")
    if not evidence_cmw:
        raise ValueError("evidence_cmw must not be empty")
    now = datetime.now(timezone.utc)
    start = not_before or now - _CLOCK_SKEW
    digest = hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CERTIFICATE_CN)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(ID_PE_CMW, cmw_extension_value(evidence_cmw)), critical=False
        )
    )
    sans = _subject_alt_names(hostnames)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, digest)


def evidence_from_certificate(cert: x509.Certificate) -> bytes:
    """The CBOR CMW bytes carried by ``cert``; EvidenceError if absent, critical, duplicated or malformed."""
    # cryptography decodes every extension (SAN, key usage, ...) on first access to ``extensions``,
    # so a damaged extension unrelated to ours surfaces here; certificates from load_der_certificate
    # were inspected already and cannot fail at this point.
    try:
        extensions = cert.extensions
    except CRYPTOGRAPHY_PARSE_ERRORS as exc:
        raise EvidenceError(f"certificate: unreadable extensions ({type(exc).__name__}: {exc})") from None
    matches = [ext for ext in extensions if ext.oid == ID_PE_CMW]
    if not matches:
        raise EvidenceError("certificate: no id-pe-cmw (1.3.6.1.5.5.7.1.35) evidence extension")
    if len(matches) > 1:
        raise EvidenceError("certificate: id-pe-cmw extension appears more than once")
    ext = matches[0]
    if ext.critical:
        raise EvidenceError("certificate: id-pe-cmw extension must not be critical")
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise EvidenceError("certificate: id-pe-cmw extension has an unexpected form")
    return parse_cmw_extension_value(value.value)
