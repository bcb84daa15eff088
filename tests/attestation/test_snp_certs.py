"""VCEK/VLEK extensions, certificate loading, TCB layouts and product detection."""

from __future__ import annotations

import warnings
from datetime import datetime, timezone

import pytest
from cryptography.utils import CryptographyDeprecationWarning

from attestation.errors import ParseError, VerificationError
from attestation.snp import AMD_TRUST, parse_report, verify_report
from attestation.snp.certs import (OID_BL_SPL, OID_HWID, OID_PRODUCT_NAME, OID_STRUCT_VERSION, OID_UCODE_SPL,
                                   amd_extension_values, cert_der, load_certificate, load_certificates,
                                   parse_vek_extension_values, parse_vek_extensions)
from attestation.snp.chain import verify_chain
from attestation.snp.tcb import decode_tcb, encode_tcb, family_from_cpuid, family_from_name, resolve_product
from attestation.verdict import CheckLog
from tests.attestation.test_snp_forge import root, vector_inputs
from tests.conftest import VECTORS


def snp_file(name: str) -> bytes:
    return (VECTORS / "snp" / name).read_bytes()


def test_loading_amd_certificates_emits_no_serial_warning() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        certs = [load_certificate(snp_file("virtee-sev--vcek_turin.der")),
                 *load_certificates(root("milan_ask_ark.pem"))]
    assert len(certs) == 3
    assert not [w for w in seen if issubclass(w.category, CryptographyDeprecationWarning)]
    # ... and the filter is local: the warning still exists outside our loader.
    from cryptography import x509
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        x509.load_der_x509_certificate(snp_file("virtee-sev--vcek_turin.der"))
    assert [w for w in seen if issubclass(w.category, CryptographyDeprecationWarning)]


def test_pem_with_trailing_nul_and_errors() -> None:
    pem = root("milan_ask_ark.pem") + b"\x00\x00"
    assert len(load_certificates(pem)) == 2
    with pytest.raises(ParseError):
        load_certificate(pem)  # two, not one
    for bad in (b"", b"\x30\x03\x02\x01\x00", b"-----BEGIN NOTHING-----"):
        with pytest.raises(ParseError):
            load_certificates(bad)


def test_milan_vcek_extensions() -> None:
    ext = parse_vek_extensions(load_certificate(snp_file("virtee-sev--vcek_milan.der")))
    assert (ext.struct_version, ext.product_name, ext.family) == (0, "Milan-B0", "Milan")
    assert (ext.bl_spl, ext.tee_spl, ext.snp_spl, ext.ucode_spl, ext.fmc_spl) == (3, 0, 8, 0x73, None)
    assert ext.tcb() == 0x7308000000000003
    assert ext.hwid is not None and len(ext.hwid) == 64 and ext.csp_id is None


def test_vlek_extensions_with_two_byte_integer() -> None:
    ext = parse_vek_extensions(load_certificate(snp_file("trustee--test-vlek.der")))
    assert ext.product_name == "Milan" and ext.hwid is None
    assert ext.csp_id == "CN=cc-us-east-2.amazonaws.com"
    assert ext.ucode_spl == 217 and ext.tcb() == 0xD918000000000004


def test_turin_vcek_extensions() -> None:
    cert = load_certificate(snp_file("virtee-sev--vcek_turin.der"))
    ext = parse_vek_extensions(cert)
    assert (ext.struct_version, ext.product_name, ext.family) == (1, "Turin", "Turin")
    assert ext.fmc_spl == 0 and ext.spl4 is None
    assert (ext.bl_spl, ext.tee_spl, ext.snp_spl, ext.ucode_spl) == (0, 0, 0, 9)
    assert ext.hwid == bytes.fromhex("1e550a8ee5cf9f4d")
    assert ext.tcb() == 0x0900000000000000
    # And it chains to the pinned Turin ARK via the Turin ASK.
    ask, ark = load_certificates(root("turin_ask_ark.pem"))
    log = CheckLog()
    at = datetime(2025, 1, 1, tzinfo=timezone.utc)
    verify_chain(ark, cert_der(ark), ask, cert_der(ask), cert, cert_der(cert), product="Turin", kind="VCEK",
                 trust=AMD_TRUST, at=at, log=log)
    assert [c.name for c in log.checks][-2:] == ["vek_chain", "chain_validity"]


@pytest.mark.parametrize("name", ["trustee--test-vcek-invalid-legacy.der", "trustee--test-vcek-invalid-new.der"])
def test_self_made_vceks_parse_but_chain_to_nothing(name: str, expected: dict) -> None:
    cert = load_certificate(snp_file(name))
    ext = parse_vek_extensions(cert)
    assert ext.product_name == "Milan-B0"
    assert ext.hwid == bytes(range(64))  # raw in "legacy", OCTET STRING-wrapped in "new"
    raw_hwid = amd_extension_values(cert)[OID_HWID]
    assert raw_hwid[:2] == (b"\x04\x40" if "new" in name else b"\x00\x01")
    v = next(v for v in expected["snp"] if v["report"] == "snp/trustee--test-report.bin")
    report, _, chain, _ = vector_inputs(v)
    with pytest.raises(VerificationError) as e:
        verify_report(report, vek=cert, chain=[chain], at=datetime(2024, 1, 1, tzinfo=timezone.utc))
    assert e.value.checks[-1].name == "vek_chain"


def _values(**over: bytes) -> dict[str, bytes]:
    base = {OID_STRUCT_VERSION: b"\x02\x01\x00", OID_PRODUCT_NAME: b"\x16\x05Milan",
            OID_BL_SPL: b"\x02\x01\x03", "1.3.6.1.4.1.3704.1.3.2": b"\x02\x01\x00",
            "1.3.6.1.4.1.3704.1.3.3": b"\x02\x01\x08", OID_UCODE_SPL: b"\x02\x02\x00\xd9",
            OID_HWID: bytes(64)}
    base.update(over)
    return base


def test_extension_der_strictness() -> None:
    assert parse_vek_extension_values(_values()).ucode_spl == 0xD9
    for bad in ({OID_UCODE_SPL: b"\x02\x02\x00\x05"},  # non-minimal
                {OID_UCODE_SPL: b"\x02\x01\x85"},  # negative
                {OID_UCODE_SPL: b"\x02\x03\x00\x01\x00"},  # > 255
                {OID_UCODE_SPL: b"\x04\x01\x05"},  # wrong tag
                {OID_UCODE_SPL: b"\x02\x01\x05\x00"},  # trailing byte
                {OID_PRODUCT_NAME: b"\x0c\x05Milan"},  # UTF8String, not IA5String
                {OID_HWID: bytes(63)},
                {OID_HWID: b"\x04\x08" + bytes(8)},  # 8-byte hwID on a Milan VEK
                {"1.3.6.1.4.1.3704.1.5": b"\x16\x02ab"},  # hwID and cspID together
                {"1.3.6.1.4.1.3704.1.3.9": b"\x02\x01\x00"}):  # fmcSPL on Milan
        with pytest.raises(ParseError):
            parse_vek_extension_values(_values(**bad))
    missing = _values()
    del missing[OID_BL_SPL]
    with pytest.raises(ParseError, match="blSPL"):
        parse_vek_extension_values(missing)


def test_tcb_layouts() -> None:
    t = decode_tcb(0x5100000004010101, "Turin")
    assert (t.fmc, t.bl, t.tee, t.snp, t.ucode) == (1, 1, 1, 4, 0x51)
    m = decode_tcb(0x7308000000000003, "Milan")
    assert (m.fmc, m.bl, m.tee, m.snp, m.ucode) == (None, 3, 0, 8, 0x73)
    g = decode_tcb(0xD918000000000004, "Genoa")
    assert (g.bl, g.snp, g.ucode) == (4, 0x18, 0xD9)
    assert encode_tcb("Turin", fmc=1, bl=1, tee=1, snp=4, ucode=0x51) == 0x5100000004010101
    assert encode_tcb("Milan", bl=3, tee=0, snp=8, ucode=0x73) == 0x7308000000000003
    with pytest.raises(ValueError):
        encode_tcb("Milan", bl=256, tee=0, snp=0, ucode=0)


def test_product_family_detection() -> None:
    assert family_from_cpuid(0x19, 0x01) == "Milan"
    assert family_from_cpuid(0x19, 0x11) == "Genoa"
    assert family_from_cpuid(0x19, 0xA0) == "Genoa"
    assert family_from_cpuid(0x1A, 0x02) == "Turin"
    assert family_from_cpuid(0x19, 0x30) is None and family_from_cpuid(0x17, 0x01) is None
    assert family_from_name("Milan-B0") == "Milan" and family_from_name("genoa") == "Genoa"
    assert family_from_name("Siena-A0") == "Genoa"


def test_resolve_product_sources(expected: dict) -> None:
    v2 = parse_report(vector_inputs(expected["snp"][0])[0])
    v3 = parse_report(vector_inputs(next(v for v in expected["snp"] if v["version"] == 3))[0])
    assert resolve_product(v3, None, None)[0] == "Milan"
    assert resolve_product(v2, "Milan-B0", "Milan")[0] == "Milan"
    assert resolve_product(v2, None, "Genoa")[0] == "Genoa"
    for args in ((v2, None, None), (v3, "Genoa", None), (v3, None, "Turin"), (v2, "Milan-B0", "Turin")):
        with pytest.raises(VerificationError, match="product"):
            resolve_product(*args)
