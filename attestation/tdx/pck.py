"""PCK certificates: the Intel SGX extension (1.2.840.113741.1.13.1) and the PCK chain to the pinned root.

Extension layout (Intel PCK certificate spec): SEQUENCE of {OID, value} pairs —
.1 PPID (16 B), .2 TCB (SEQUENCE of .2.1-.2.16 component SVNs, .2.17 PCESVN, .2.18 CPUSVN 16 B),
.3 PCE-ID (2 B), .4 FMSPC (6 B), .5 SGX type (ENUMERATED), and on Platform-CA certificates .6 platform
instance id and .7 configuration (dynamic platform / cached keys / SMT booleans).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from cryptography import x509

from ..errors import ParseError
from ..x509parse import CRYPTOGRAPHY_PARSE_ERRORS
from . import der
from .chain import VerifiedChain, common_name, verify_chain_structure
from .trust import PCK_LEAF_CN, PCK_PLATFORM_CA_CN, PCK_PROCESSOR_CA_CN

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
_SGX_EXT = x509.ObjectIdentifier(SGX_EXTENSION_OID)


@dataclass(frozen=True)
class PckExtension:
    ppid: bytes
    tcb_components: tuple[int, ...]  # 16 SGX TCB component SVNs (.2.1 .. .2.16)
    pcesvn: int
    cpusvn: bytes
    pceid: bytes
    fmspc: bytes
    sgx_type: int
    platform_instance_id: bytes | None = None
    dynamic_platform: bool | None = None
    cached_keys: bool | None = None
    smt_enabled: bool | None = None


def _octets(data: bytes, tag: int, start: int, end: int, size: int | None, what: str) -> bytes:
    der.expect(tag, der.TAG_OCTET_STRING, what)
    value = data[start:end]
    if size is not None and len(value) != size:
        raise ParseError(f"PCK extension: {what} must be {size} bytes, got {len(value)}")
    return value


def _pairs(data: bytes, start: int, end: int, prefix: str, what: str) -> dict[str, tuple[int, int, int]]:
    """SEQUENCE OF SEQUENCE {OID, value} under `prefix` -> {sub-arc: (tag, start, end)}; no duplicates."""
    out: dict[str, tuple[int, int, int]] = {}
    for tag, cstart, cend in der.children(data, start, end):
        der.expect(tag, der.TAG_SEQUENCE, f"{what} entry")
        parts = der.children(data, cstart, cend)
        if len(parts) != 2:
            raise ParseError(f"PCK extension: {what} entry must be {{OID, value}}")
        otag, ostart, oend = parts[0]
        der.expect(otag, der.TAG_OID, f"{what} entry OID")
        oid = der.decode_oid(data[ostart:oend])
        if not oid.startswith(prefix + "."):
            raise ParseError(f"PCK extension: unexpected OID {oid} in {what}")
        arc = oid[len(prefix) + 1 :]
        if arc in out:
            raise ParseError(f"PCK extension: duplicate OID {oid}")
        out[arc] = parts[1]
    return out


def _required(entries: dict, arc: str, what: str) -> tuple[int, int, int]:
    if arc not in entries:
        raise ParseError(f"PCK extension: {what} missing")
    return entries[arc]


def _boolean(data: bytes, item: tuple[int, int, int], what: str) -> bool:
    tag, start, end = item
    der.expect(tag, der.TAG_BOOLEAN, what)
    if end - start != 1 or data[start] not in (0x00, 0xFF):
        raise ParseError(f"PCK extension: {what} is not a DER BOOLEAN")
    return data[start] == 0xFF


def parse_pck_extension(value: bytes) -> PckExtension:
    """Raw extension value bytes -> PckExtension; ParseError on any malformation."""
    if not isinstance(value, (bytes, bytearray)):
        raise ParseError("PCK extension must be bytes")
    data = bytes(value)
    tag, start, end = der.read_tlv(data, 0)
    der.expect(tag, der.TAG_SEQUENCE, "SGX extension")
    if end != len(data):
        raise ParseError("PCK extension: trailing bytes")
    top = _pairs(data, start, end, SGX_EXTENSION_OID, "SGX extension")
    ppid = _octets(data, *_required(top, "1", "PPID"), 16, "PPID")
    ttag, tstart, tend = _required(top, "2", "TCB")
    der.expect(ttag, der.TAG_SEQUENCE, "TCB")
    tcb = _pairs(data, tstart, tend, SGX_EXTENSION_OID + ".2", "TCB")
    comps = []
    for i in range(1, 17):
        ctag, cstart, cend = _required(tcb, str(i), f"TCB component {i}")
        der.expect(ctag, der.TAG_INTEGER, f"TCB component {i}")
        svn = der.decode_unsigned(data[cstart:cend], f"TCB component {i}")
        if svn > 255:
            raise ParseError(f"PCK extension: TCB component {i} SVN {svn} out of range")
        comps.append(svn)
    ptag, pstart, pend = _required(tcb, "17", "PCESVN")
    der.expect(ptag, der.TAG_INTEGER, "PCESVN")
    pcesvn = der.decode_unsigned(data[pstart:pend], "PCESVN")
    if pcesvn > 0xFFFF:
        raise ParseError("PCK extension: PCESVN out of range")
    cpusvn = _octets(data, *_required(tcb, "18", "CPUSVN"), 16, "CPUSVN")
    if set(tcb) - {str(i) for i in range(1, 19)}:
        raise ParseError("PCK extension: unknown entries in TCB")
    pceid = _octets(data, *_required(top, "3", "PCE-ID"), 2, "PCE-ID")
    fmspc = _octets(data, *_required(top, "4", "FMSPC"), 6, "FMSPC")
    stag, sstart, send = _required(top, "5", "SGX type")
    der.expect(stag, der.TAG_ENUMERATED, "SGX type")
    sgx_type = der.decode_unsigned(data[sstart:send], "SGX type")
    instance_id = None
    dynamic = cached = smt = None
    if "6" in top:
        instance_id = _octets(data, *top["6"], 16, "platform instance id")
    if "7" in top:
        gtag, gstart, gend = top["7"]
        der.expect(gtag, der.TAG_SEQUENCE, "configuration")
        conf = _pairs(data, gstart, gend, SGX_EXTENSION_OID + ".7", "configuration")
        dynamic = _boolean(data, conf["1"], "dynamic platform") if "1" in conf else None
        cached = _boolean(data, conf["2"], "cached keys") if "2" in conf else None
        smt = _boolean(data, conf["3"], "SMT enabled") if "3" in conf else None
    return PckExtension(
        ppid=ppid,
        tcb_components=tuple(comps),
        pcesvn=pcesvn,
        cpusvn=cpusvn,
        pceid=pceid,
        fmspc=fmspc,
        sgx_type=sgx_type,
        platform_instance_id=instance_id,
        dynamic_platform=dynamic,
        cached_keys=cached,
        smt_enabled=smt,
    )


@lru_cache(maxsize=256)
def _extension_of_der(value: bytes) -> PckExtension:
    return parse_pck_extension(value)


def pck_extension_of(cert: x509.Certificate) -> PckExtension:
    """The SGX extension of a PCK leaf certificate; ParseError when absent or malformed."""
    try:
        ext = cert.extensions.get_extension_for_oid(_SGX_EXT)
    except x509.ExtensionNotFound:
        raise ParseError("PCK certificate has no Intel SGX extension") from None
    except CRYPTOGRAPHY_PARSE_ERRORS as exc:  # a Certificate that did not come from our loaders
        raise ParseError(f"PCK certificate extensions are malformed: {exc}") from None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise ParseError("PCK certificate SGX extension has an unexpected form")
    return _extension_of_der(value.value)


def verify_pck_chain_structure(certs: Sequence[x509.Certificate]) -> VerifiedChain:
    """leaf "Intel SGX PCK Certificate" <- Platform CA or Processor CA <- pinned Intel SGX Root CA."""
    return verify_chain_structure(
        certs, leaf_cns=(PCK_LEAF_CN,), intermediate_cns=(PCK_PLATFORM_CA_CN, PCK_PROCESSOR_CA_CN)
    )


def pck_ca_kind(certs: Sequence[x509.Certificate]) -> str:
    """'platform' or 'processor': which PCK CRL (pckcrl?ca=...) covers this leaf."""
    return "processor" if common_name(certs[1].subject) == PCK_PROCESSOR_CA_CN else "platform"
