"""X.509 certificates and CRLs loaded so that damaged DER fails once, at load time, as a ParseError.

``cryptography`` decodes only the outer structure when loading: names, the public key, the extensions
and the signature parameters are decoded on first access, and damaged bytes there surface much later,
deep inside a verification, as ValueError, TypeError, UnsupportedAlgorithm, DuplicateExtension or
UnsupportedGeneralNameType (the loaders themselves add InvalidVersion). The loaders here read every
such field once, inside one ``try``, so what comes out of them can be inspected freely afterwards:
``cryptography`` keeps what it decoded, or decodes the same bytes the same way again. The cost is a few
microseconds per certificate or CRL, paid once per distinct input where callers cache what they load
(the SNP certificate cache, the PCK chain cache).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding

from .errors import ParseError

T = TypeVar("T")

# Everything cryptography raises on certificate or CRL bytes it cannot use.
CRYPTOGRAPHY_PARSE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)


def _unusable(what: str, problem: str, exc: Exception) -> ParseError:
    return ParseError(f"{what} {problem} ({type(exc).__name__}: {exc})")


def _load(loader: Callable[[bytes], T], data: bytes, what: str, form: str) -> T:
    """``loader(data)``; ParseError saying ``what`` is not ``form`` when cryptography refuses the bytes."""
    try:
        return loader(data)
    except CRYPTOGRAPHY_PARSE_ERRORS as exc:
        raise _unusable(what, f"is not {form}", exc) from None


def _inspect_extensions_and_signature(signed: x509.Certificate | x509.CertificateRevocationList) -> None:
    """The lazily decoded parts certificates and CRLs have in common."""
    for extension in signed.extensions:
        extension.value
    signed.signature_algorithm_oid
    signed.signature_hash_algorithm
    signed.signature_algorithm_parameters


def inspect_certificate(cert: x509.Certificate, what: str = "certificate") -> x509.Certificate:
    """Decode every lazily parsed field of ``cert`` once; ParseError naming ``what`` if one is damaged."""
    try:
        cert.version
        cert.serial_number
        cert.subject
        cert.issuer
        cert.not_valid_before_utc
        cert.not_valid_after_utc
        cert.public_key()
        _inspect_extensions_and_signature(cert)
    except CRYPTOGRAPHY_PARSE_ERRORS as exc:
        raise _unusable(what, "is damaged or unsupported", exc) from None
    return cert


def inspect_crl(crl: x509.CertificateRevocationList, what: str = "CRL") -> x509.CertificateRevocationList:
    """Decode the lazily parsed fields of ``crl`` once; ParseError naming ``what`` if one is damaged.

    The revoked entries are not walked: cryptography validates their structure (serial number, date)
    when the CRL is loaded, and only their own extensions (reason codes) are decoded lazily. Nothing in
    this library reads those, and a CRL whose signature verifies carries well-formed ones; walking
    them would cost ~1 us per entry on every collateral parse. (bench/fuzz.py's
    ``verify_tdx_collateral`` target, which walks the serials in verification, watches this.)
    """
    try:
        crl.issuer
        crl.last_update_utc
        crl.next_update_utc
        _inspect_extensions_and_signature(crl)
    except CRYPTOGRAPHY_PARSE_ERRORS as exc:
        raise _unusable(what, "is damaged or unsupported", exc) from None
    return crl


def load_der_certificate(der: bytes, what: str = "certificate") -> x509.Certificate:
    """One DER certificate, fully inspected; ParseError on anything unusable."""
    return inspect_certificate(_load(x509.load_der_x509_certificate, der, what, "a DER X.509 certificate"), what)


def load_pem_certificates(pem: bytes, what: str = "certificate chain") -> list[x509.Certificate]:
    """Every CERTIFICATE block of ``pem``, each fully inspected; ParseError on anything unusable."""
    certs = _load(x509.load_pem_x509_certificates, pem, what, "PEM X.509 certificates")
    return [inspect_certificate(cert, f"{what}[{i}]") for i, cert in enumerate(certs)]


def load_der_crl(der: bytes, what: str = "CRL") -> x509.CertificateRevocationList:
    """One DER CRL, fully inspected; ParseError on anything unusable."""
    return inspect_crl(_load(x509.load_der_x509_crl, der, what, "a DER X.509 CRL"), what)


def load_pem_crl(pem: bytes, what: str = "CRL") -> x509.CertificateRevocationList:
    """One PEM CRL, fully inspected; ParseError on anything unusable."""
    return inspect_crl(_load(x509.load_pem_x509_crl, pem, what, "a PEM X.509 CRL"), what)


def load_pem_or_der_crl(data: bytes, what: str = "CRL") -> x509.CertificateRevocationList:
    """One CRL, PEM if it carries a PEM header, DER otherwise; fully inspected, ParseError if unusable."""
    if b"-----BEGIN" in data:
        return load_pem_crl(data, what)
    return load_der_crl(data, what)


def cert_der(cert: x509.Certificate) -> bytes:
    """The DER encoding of ``cert``."""
    return cert.public_bytes(Encoding.DER)
