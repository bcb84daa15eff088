"""Strict parser for Intel DCAP quotes v4 and v5 carrying a TD report (TDX).

Layout facts (little-endian integers) come from Intel's DCAP quote format: a 48-byte header, the TD report
body (v4: fixed TD 1.0 body; v5: u16 body type + u32 body size first), a u32 signature-data length and the
signature data. Quote buffers handed out by guests are often padded, so bytes after the declared signature
data are allowed; every declared length must fit, and nested lengths must fill their container exactly.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache

from cryptography import x509

from ..errors import ParseError
from ..x509parse import load_pem_certificates
from .pck import PckExtension, pck_extension_of
from .trust import INTEL_QE_VENDOR_ID

HEADER_SIZE = 48
TEE_TYPE_TDX = 0x81
TEE_TYPE_SGX = 0x00
ATT_KEY_TYPE_ECDSA_P256 = 2
BODY_TYPE_SGX = 1
BODY_TYPE_TD10 = 2
BODY_TYPE_TD15 = 3
TD10_BODY_SIZE = 584
TD15_BODY_SIZE = 648
QE_REPORT_SIZE = 384
CERT_TYPE_QE_REPORT = 6
CERT_TYPE_PCK_CHAIN = 5
# Largest signature data we accept: a PEM chain of three certificates is ~3.7 KB; leave ample room.
MAX_SIG_DATA = 64 * 1024

TD_ATTR_DEBUG = 1 << 0
TD_ATTR_SEPT_VE_DISABLE = 1 << 28


@dataclass(frozen=True)
class QuoteHeader:
    version: int
    att_key_type: int
    tee_type: int
    reserved: bytes  # bytes 0x08..0x0C (QE/PCE SVN in SGX v3 quotes; reserved for TDX)
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class TdReport:
    """TD report body as carried in the quote (TD 1.0; TD 1.5 adds tee_tcb_svn2 and mrservicetd)."""

    tee_tcb_svn: bytes
    mrseam: bytes
    mrsignerseam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mrservicetd: bytes | None = None

    @property
    def td_attributes_int(self) -> int:
        return int.from_bytes(self.td_attributes, "little")

    @property
    def debug(self) -> bool:
        return bool(self.td_attributes_int & TD_ATTR_DEBUG)


@dataclass(frozen=True)
class QeReport:
    """The Quoting Enclave's SGX REPORT body (384 bytes), signed by the PCK key."""

    raw: bytes
    cpusvn: bytes
    miscselect: int
    attributes: bytes
    mrenclave: bytes
    mrsigner: bytes
    isvprodid: int
    isvsvn: int
    report_data: bytes


@dataclass(frozen=True)
class SignatureData:
    signature: bytes  # r || s, big-endian, 64 bytes: the quote signature by the attestation key
    attestation_key: bytes  # X || Y, 64 bytes (P-256 point without the 0x04 prefix)
    qe_report: QeReport
    qe_report_signature: bytes  # r || s by the PCK leaf key over qe_report.raw
    qe_auth_data: bytes
    pck_chain_pem: bytes  # as carried (trailing NULs removed)
    pck_chain: tuple[x509.Certificate, ...]  # leaf, intermediate CA, root


@dataclass(frozen=True)
class Quote:
    raw: bytes  # the whole buffer as given, trailing bytes included
    header: QuoteHeader
    body_type: int
    body: TdReport
    signed_length: int  # quote[0:signed_length] is what the attestation key signed
    sig_data: SignatureData
    pck_extension: PckExtension
    trailing_bytes: int

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[: self.signed_length]

    @property
    def pck_leaf(self) -> x509.Certificate:
        return self.sig_data.pck_chain[0]


def _need(data: bytes, offset: int, size: int, what: str) -> None:
    if offset < 0 or size < 0 or offset + size > len(data):
        raise ParseError(f"quote truncated: {what} needs bytes {offset}..{offset + size}, have {len(data)}")


def _parse_header(data: bytes) -> QuoteHeader:
    _need(data, 0, HEADER_SIZE, "header")
    version, att_key_type, tee_type = struct.unpack_from("<HHI", data, 0)
    if version not in (4, 5):
        raise ParseError(f"quote version {version} is not a TDX DCAP quote version (4 or 5)")
    if att_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise ParseError(f"attestation key type {att_key_type} unsupported (only 2 = ECDSA P-256)")
    if tee_type != TEE_TYPE_TDX:
        raise ParseError(f"TEE type 0x{tee_type:x} is not TDX (0x81)")
    vendor = data[12:28]
    if vendor != INTEL_QE_VENDOR_ID:
        raise ParseError(f"QE vendor id {vendor.hex()} is not Intel's")
    return QuoteHeader(version, att_key_type, tee_type, data[8:12], vendor, data[28:48])


_TD10_FIELDS = (
    ("tee_tcb_svn", 16),
    ("mrseam", 48),
    ("mrsignerseam", 48),
    ("seam_attributes", 8),
    ("td_attributes", 8),
    ("xfam", 8),
    ("mrtd", 48),
    ("mrconfigid", 48),
    ("mrowner", 48),
    ("mrownerconfig", 48),
    ("rtmr0", 48),
    ("rtmr1", 48),
    ("rtmr2", 48),
    ("rtmr3", 48),
    ("report_data", 64),
)
_TD15_EXTRA = (("tee_tcb_svn2", 16), ("mrservicetd", 48))


def _parse_body(body: bytes, body_type: int) -> TdReport:
    fields = _TD10_FIELDS + (_TD15_EXTRA if body_type == BODY_TYPE_TD15 else ())
    values: dict[str, bytes] = {}
    offset = 0
    for name, size in fields:
        values[name] = body[offset : offset + size]
        offset += size
    if offset != len(body):  # guarded by the callers; keeps the layout honest
        raise ParseError("TD report body size does not match its type")
    return TdReport(**values)


def parse_qe_report(raw: bytes) -> QeReport:
    if len(raw) != QE_REPORT_SIZE:
        raise ParseError(f"QE report must be {QE_REPORT_SIZE} bytes, got {len(raw)}")
    (miscselect,) = struct.unpack_from("<I", raw, 0x10)
    isvprodid, isvsvn = struct.unpack_from("<HH", raw, 0x100)
    return QeReport(
        raw=raw,
        cpusvn=raw[0x00:0x10],
        miscselect=miscselect,
        attributes=raw[0x30:0x40],
        mrenclave=raw[0x40:0x60],
        mrsigner=raw[0x80:0xA0],
        isvprodid=isvprodid,
        isvsvn=isvsvn,
        report_data=raw[0x140:0x180],
    )


@lru_cache(maxsize=256)
def load_pck_chain(pem: bytes) -> tuple[x509.Certificate, ...]:
    """PEM chain bytes -> certificates (cached: the same platform sends the same chain every time).

    Each certificate is fully inspected here (attestation.x509parse), so the chain checks that read its
    names, key and extensions later cannot meet damaged DER."""
    certs = tuple(load_pem_certificates(pem, "PCK certificate chain"))
    if len(certs) != 3:
        raise ParseError(f"PCK certificate chain must hold 3 certificates (leaf, CA, root), got {len(certs)}")
    return certs


def _parse_sig_data(sd: bytes) -> SignatureData:
    _need(sd, 0, 134, "signature data")
    signature, attestation_key = sd[0:64], sd[64:128]
    cert_type, cert_size = struct.unpack_from("<HI", sd, 128)
    if cert_type != CERT_TYPE_QE_REPORT:
        raise ParseError(f"certification data type {cert_type} unsupported (need 6 = QE report certification data)")
    if 134 + cert_size != len(sd):
        raise ParseError(f"certification data size {cert_size} does not fill the signature data ({len(sd) - 134})")
    cd = sd[134:]
    _need(cd, 0, QE_REPORT_SIZE + 64 + 2, "QE report certification data")
    qe_report = parse_qe_report(cd[0:QE_REPORT_SIZE])
    qe_report_signature = cd[QE_REPORT_SIZE : QE_REPORT_SIZE + 64]
    pos = QE_REPORT_SIZE + 64
    (auth_len,) = struct.unpack_from("<H", cd, pos)
    pos += 2
    _need(cd, pos, auth_len, "QE authentication data")
    qe_auth_data = cd[pos : pos + auth_len]
    pos += auth_len
    _need(cd, pos, 6, "PCK certification data header")
    inner_type, inner_size = struct.unpack_from("<HI", cd, pos)
    pos += 6
    if inner_type != CERT_TYPE_PCK_CHAIN:
        raise ParseError(f"inner certification data type {inner_type} unsupported (need 5 = PCK chain PEM)")
    if pos + inner_size != len(cd):
        raise ParseError(f"PCK chain size {inner_size} does not fill the QE certification data ({len(cd) - pos})")
    pem = cd[pos:].rstrip(b"\x00")
    if not pem:
        raise ParseError("PCK certificate chain is empty")
    return SignatureData(
        signature=signature,
        attestation_key=attestation_key,
        qe_report=qe_report,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        pck_chain_pem=pem,
        pck_chain=load_pck_chain(pem),
    )


def parse_quote(data: bytes) -> Quote:
    """Bytes -> Quote; ParseError on anything that is not a well-formed TDX DCAP v4/v5 quote."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError("quote must be bytes")
    data = bytes(data)
    header = _parse_header(data)
    if header.version == 4:
        body_type, body_start, body_size = BODY_TYPE_TD10, HEADER_SIZE, TD10_BODY_SIZE
    else:
        _need(data, HEADER_SIZE, 6, "v5 body descriptor")
        body_type, body_size = struct.unpack_from("<HI", data, HEADER_SIZE)
        body_start = HEADER_SIZE + 6
        if body_type == BODY_TYPE_SGX:
            raise ParseError("v5 quote carries an SGX enclave report (body type 1), not a TD report")
        expected = {BODY_TYPE_TD10: TD10_BODY_SIZE, BODY_TYPE_TD15: TD15_BODY_SIZE}.get(body_type)
        if expected is None:
            raise ParseError(f"v5 body type {body_type} unsupported (2 = TD 1.0, 3 = TD 1.5)")
        if body_size != expected:
            raise ParseError(f"v5 body type {body_type} must be {expected} bytes, declared {body_size}")
    _need(data, body_start, body_size + 4, "TD report body and signature data length")
    body = _parse_body(data[body_start : body_start + body_size], body_type)
    signed_length = body_start + body_size
    (sig_len,) = struct.unpack_from("<I", data, signed_length)
    if sig_len > MAX_SIG_DATA:
        raise ParseError(f"signature data length {sig_len} is implausibly large")
    sig_start = signed_length + 4
    _need(data, sig_start, sig_len, "signature data")
    sig_data = _parse_sig_data(data[sig_start : sig_start + sig_len])
    return Quote(
        raw=data,
        header=header,
        body_type=body_type,
        body=body,
        signed_length=signed_length,
        sig_data=sig_data,
        pck_extension=pck_extension_of(sig_data.pck_chain[0]),
        trailing_bytes=len(data) - sig_start - sig_len,
    )


@lru_cache(maxsize=256)
def _leaf_issuer_cn(pem: bytes) -> str:
    attrs = load_pck_chain(pem)[0].issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def pck_issuer_cn(quote: Quote) -> str:
    """CN of the PCK leaf's issuer ("Intel SGX PCK Platform CA" or "... Processor CA")."""
    return _leaf_issuer_cn(quote.sig_data.pck_chain_pem)


def quote_claims(quote: Quote) -> dict:
    """Claims in expected.json's names and formats (byte fields lowercase hex)."""
    b = quote.body
    ext = quote.pck_extension
    claims: dict = {
        "quote_version": quote.header.version,
        "body_type": quote.body_type,
        "tee_tcb_svn": b.tee_tcb_svn.hex(),
        "mrseam": b.mrseam.hex(),
        "mrsignerseam": b.mrsignerseam.hex(),
        "seam_attributes": b.seam_attributes.hex(),
        "td_attributes": b.td_attributes.hex(),
        "xfam": b.xfam.hex(),
        "mrtd": b.mrtd.hex(),
        "mrconfigid": b.mrconfigid.hex(),
        "mrowner": b.mrowner.hex(),
        "mrownerconfig": b.mrownerconfig.hex(),
        "rtmr0": b.rtmr0.hex(),
        "rtmr1": b.rtmr1.hex(),
        "rtmr2": b.rtmr2.hex(),
        "rtmr3": b.rtmr3.hex(),
        "report_data": b.report_data.hex(),
    }
    if quote.body_type == BODY_TYPE_TD15:
        claims["tee_tcb_svn2"] = (b.tee_tcb_svn2 or b"").hex()
        claims["mrservicetd"] = (b.mrservicetd or b"").hex()
    claims.update(
        {
            "fmspc": ext.fmspc.hex(),
            "pceid": ext.pceid.hex(),
            "pcesvn": ext.pcesvn,
            "cpusvn": ext.cpusvn.hex(),
            "sgx_type": ext.sgx_type,
            "qe_isvsvn": quote.sig_data.qe_report.isvsvn,
            "qe_mrsigner": quote.sig_data.qe_report.mrsigner.hex(),
            "pck_issuer": pck_issuer_cn(quote),
            "debug": b.debug,
            "sept_ve_disable": bool(b.td_attributes_int & TD_ATTR_SEPT_VE_DISABLE),
        }
    )
    return claims
