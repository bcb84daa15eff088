"""Loading AMD certificates and reading the VCEK/VLEK extensions (OID arc 1.3.6.1.4.1.3704.1).

AMD certificates carry serial number 0, which ``cryptography`` reports with a
CryptographyDeprecationWarning; that one warning is silenced around our own loads only.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning

from ..errors import ParseError
from ..x509parse import (CRYPTOGRAPHY_PARSE_ERRORS, inspect_certificate, load_der_certificate,
                         load_pem_certificates)
from ..x509parse import cert_der as cert_der  # re-exported: callers import it from here
from .tcb import LAYOUT_TURIN, encode_tcb, family_from_name, layout_for

AMD_OID_ARC = "1.3.6.1.4.1.3704.1"
OID_STRUCT_VERSION = AMD_OID_ARC + ".1"
OID_PRODUCT_NAME = AMD_OID_ARC + ".2"
OID_BL_SPL = AMD_OID_ARC + ".3.1"
OID_TEE_SPL = AMD_OID_ARC + ".3.2"
OID_SNP_SPL = AMD_OID_ARC + ".3.3"
OID_SPL4 = AMD_OID_ARC + ".3.4"
OID_SPL5 = AMD_OID_ARC + ".3.5"
OID_SPL6 = AMD_OID_ARC + ".3.6"
OID_SPL7 = AMD_OID_ARC + ".3.7"
OID_UCODE_SPL = AMD_OID_ARC + ".3.8"
OID_FMC_SPL = AMD_OID_ARC + ".3.9"
OID_HWID = AMD_OID_ARC + ".4"
OID_CSP_ID = AMD_OID_ARC + ".5"

HWID_SIZE = 64
TURIN_HWID_SIZE = 8

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)
_SERIAL_WARNING = r".*serial number.*"

CertInput = bytes | bytearray | memoryview | x509.Certificate


@contextmanager
def _serial_zero_allowed() -> Iterator[None]:
    """Silence cryptography's warning about AMD's serial number 0 (raised when the serial is read)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SERIAL_WARNING, category=CryptographyDeprecationWarning)
        yield


def _load_der(der: bytes) -> x509.Certificate:
    with _serial_zero_allowed():
        return load_der_certificate(der, "DER certificate")


def _load_pem(block: bytes) -> x509.Certificate:
    with _serial_zero_allowed():
        certs = load_pem_certificates(block, "PEM certificate")
    if len(certs) != 1:  # the caller hands in one CERTIFICATE block
        raise ParseError(f"PEM certificate block holds {len(certs)} certificates")
    return certs[0]


def _inspected(cert: x509.Certificate) -> x509.Certificate:
    with _serial_zero_allowed():
        return inspect_certificate(cert)


def load_certificates(data: CertInput | Iterable[CertInput]) -> list[x509.Certificate]:
    """PEM (one or more CERTIFICATE blocks, trailing NULs/whitespace ignored), DER (one certificate),
    a Certificate, or an iterable of those. ParseError when nothing or garbage is found.

    Every certificate returned has had its lazily decoded fields (names, key, extensions, signature
    parameters) read once (attestation.x509parse), so later accesses to them cannot raise."""
    if isinstance(data, x509.Certificate):
        return [_inspected(data)]
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if b"-----BEGIN" in raw:
            blocks = _PEM_CERT.findall(raw)
            if not blocks:
                raise ParseError("PEM data holds no CERTIFICATE block")
            return [_load_pem(b) for b in blocks]
        if not raw:
            raise ParseError("empty certificate data")
        return [_load_der(raw)]
    if isinstance(data, Iterable) and not isinstance(data, str):
        out: list[x509.Certificate] = []
        for item in data:
            out.extend(load_certificates(item))
        return out
    raise ParseError(f"cannot read certificates from {type(data).__name__}")


def load_certificate(data: CertInput) -> x509.Certificate:
    certs = load_certificates(data)
    if len(certs) != 1:
        raise ParseError(f"expected one certificate, found {len(certs)}")
    return certs[0]


# --- minimal DER reading for the AMD extension values -------------------------------------------

def _der_tlv(data: bytes, expected_tag: int, what: str) -> bytes:
    """Content of exactly one DER TLV with ``expected_tag`` spanning all of ``data``."""
    if len(data) < 2:
        raise ParseError(f"{what}: DER value too short")
    if data[0] != expected_tag:
        raise ParseError(f"{what}: DER tag {data[0]:#04x}, expected {expected_tag:#04x}")
    first = data[1]
    if first < 0x80:
        length, start = first, 2
    else:
        n = first & 0x7F
        if n == 0 or n > 2 or len(data) < 2 + n:
            raise ParseError(f"{what}: bad DER length")
        length = int.from_bytes(data[2:2 + n], "big")
        if length < 0x80 or (n == 2 and length < 0x100):
            raise ParseError(f"{what}: non-minimal DER length")
        start = 2 + n
    if start + length != len(data):
        raise ParseError(f"{what}: DER length {length} does not span the value ({len(data) - start} bytes)")
    return data[start:]


def _der_u8(data: bytes, what: str) -> int:
    content = _der_tlv(data, 0x02, what)
    if not content or len(content) > 2:
        raise ParseError(f"{what}: INTEGER must have 1 or 2 content bytes")
    if len(content) == 2 and (content[0] != 0 or content[1] < 0x80):
        raise ParseError(f"{what}: non-minimal or out-of-range INTEGER")
    if len(content) == 1 and content[0] >= 0x80:
        raise ParseError(f"{what}: negative INTEGER")
    return int.from_bytes(content, "big")


def _der_ia5(data: bytes, what: str) -> str:
    content = _der_tlv(data, 0x16, what)
    if any(b > 0x7F for b in content):
        raise ParseError(f"{what}: IA5String holds non-ASCII bytes")
    return content.decode("ascii")


def _hwid(data: bytes) -> bytes:
    # Real KDS certificates carry the raw bytes; accept a DER OCTET STRING wrapping too.
    if len(data) in (HWID_SIZE, TURIN_HWID_SIZE):
        return bytes(data)
    inner = _der_tlv(data, 0x04, "hwID")
    if len(inner) not in (HWID_SIZE, TURIN_HWID_SIZE):
        raise ParseError(f"hwID is {len(inner)} bytes, expected {HWID_SIZE} or {TURIN_HWID_SIZE}")
    return inner


@dataclass(frozen=True)
class VekExtensions:
    """The AMD extensions of a VCEK or VLEK certificate. SPL fields absent from the certificate
    are None (Turin has no spl4, legacy products no fmcSPL). ``hwid`` is None on a VLEK,
    ``csp_id`` None on a VCEK."""

    struct_version: int
    product_name: str
    bl_spl: int
    tee_spl: int
    snp_spl: int
    ucode_spl: int
    spl4: int | None
    spl5: int | None
    spl6: int | None
    spl7: int | None
    fmc_spl: int | None
    hwid: bytes | None
    csp_id: str | None

    @property
    def family(self) -> str:
        return family_from_name(self.product_name)

    def tcb(self, product: str | None = None) -> int:
        """The TCB_VERSION these SPLs encode, in the layout of ``product`` (default: own family)."""
        product = product or self.family
        return encode_tcb(product, bl=self.bl_spl, tee=self.tee_spl, snp=self.snp_spl,
                          ucode=self.ucode_spl, fmc=self.fmc_spl, spl4=self.spl4,
                          spl5=self.spl5 or 0, spl6=self.spl6 or 0, spl7=self.spl7 or 0)


def parse_vek_extension_values(values: Mapping[str, bytes]) -> VekExtensions:
    """Build VekExtensions from {dotted OID: extension value bytes}; ParseError on anything off."""
    def required(oid: str, what: str) -> bytes:
        v = values.get(oid)
        if v is None:
            raise ParseError(f"VEK certificate lacks the {what} extension ({oid})")
        return v

    def optional_u8(oid: str, what: str) -> int | None:
        v = values.get(oid)
        return None if v is None else _der_u8(v, what)

    struct_version = _der_u8(required(OID_STRUCT_VERSION, "structVersion"), "structVersion")
    product_name = _der_ia5(required(OID_PRODUCT_NAME, "productName"), "productName")
    if not product_name:
        raise ParseError("productName is empty")
    turin = layout_for(family_from_name(product_name)) == LAYOUT_TURIN
    fmc = optional_u8(OID_FMC_SPL, "fmcSPL")
    if turin and fmc is None:
        raise ParseError("Turin VEK lacks fmcSPL")
    if not turin and fmc is not None:
        raise ParseError(f"{product_name} VEK carries fmcSPL, which only Turin has")
    hwid_raw = values.get(OID_HWID)
    hwid = None if hwid_raw is None else _hwid(hwid_raw)
    if hwid is not None and len(hwid) != (TURIN_HWID_SIZE if turin else HWID_SIZE):
        raise ParseError(f"hwID of a {product_name} VEK is {len(hwid)} bytes")
    csp_raw = values.get(OID_CSP_ID)
    csp_id = None if csp_raw is None else _der_ia5(csp_raw, "cspID")
    if hwid is not None and csp_id is not None:
        raise ParseError("VEK certificate has both hwID and cspID")
    return VekExtensions(
        struct_version=struct_version,
        product_name=product_name,
        bl_spl=_der_u8(required(OID_BL_SPL, "blSPL"), "blSPL"),
        tee_spl=_der_u8(required(OID_TEE_SPL, "teeSPL"), "teeSPL"),
        snp_spl=_der_u8(required(OID_SNP_SPL, "snpSPL"), "snpSPL"),
        ucode_spl=_der_u8(required(OID_UCODE_SPL, "ucodeSPL"), "ucodeSPL"),
        spl4=optional_u8(OID_SPL4, "spl4"),
        spl5=optional_u8(OID_SPL5, "spl5"),
        spl6=optional_u8(OID_SPL6, "spl6"),
        spl7=optional_u8(OID_SPL7, "spl7"),
        fmc_spl=fmc,
        hwid=hwid,
        csp_id=csp_id,
    )


def amd_extension_values(cert: x509.Certificate) -> dict[str, bytes]:
    """{dotted OID: raw value} of the certificate's extensions under the AMD arc."""
    try:
        extensions = cert.extensions
    except CRYPTOGRAPHY_PARSE_ERRORS as e:  # a Certificate that did not come from our loaders
        raise ParseError(f"certificate extensions are malformed: {e}") from None
    out: dict[str, bytes] = {}
    for ext in extensions:
        oid = ext.oid.dotted_string
        if oid.startswith(AMD_OID_ARC + "."):
            value = ext.value
            if not isinstance(value, x509.UnrecognizedExtension):
                raise ParseError(f"unexpected decoded extension at {oid}")
            out[oid] = value.value
    return out


def parse_vek_extensions(cert: x509.Certificate) -> VekExtensions:
    return parse_vek_extension_values(amd_extension_values(cert))
