"""Damaged certificates and CRLs fail as ParseError where they are loaded, never deeper and never untyped.

Each case patches one byte of a real certificate or CRL from ../shared/vectors so that ``cryptography``
raises something other than ValueError (InvalidVersion, DuplicateExtension, UnsupportedAlgorithm,
TypeError, UnsupportedGeneralNameType), or raises only lazily, when a name, the key or the extensions are
first read. These are the shapes the fuzzer (bench/fuzz.py, seed 20261127) found escaping from
attestation/snp/certs.py, attestation/tdx/quote.py and attestation/tdx/chain.py. Every case first
checks, against ``cryptography`` itself, that the damage is of the kind that used to escape, so the
test cannot silently turn into one about plainly unparseable DER.
"""

from __future__ import annotations

import base64
import re
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding

from attestation.errors import AttestationError, ParseError
from attestation.evidence import Evidence
from attestation.snp import verify_report
from attestation.snp.certs import amd_extension_values, load_certificate, load_certificates
from attestation.tdx.chain import load_crl
from attestation.tdx.collateral import collateral_from_files, collateral_to_files, load_collateral_dir
from attestation.tdx.pck import pck_extension_of
from attestation.tdx.quote import parse_quote
from attestation.tdx.verify import verify_quote
from attestation.verifier import verify_evidence
from attestation.x509parse import inspect_certificate, inspect_crl, load_pem_certificates
from tests.conftest import VECTORS

SNP_AT = datetime(2023, 4, 5, tzinfo=timezone.utc)
TDX_AT = datetime(2026, 2, 3, tzinfo=timezone.utc)
COLLATERAL = VECTORS / "tdx" / "collateral" / "pcs-2026-02"
V5_QUOTE = VECTORS / "tdx" / "go-tdx-guest--quote_v5_sample.dat"

CN_OID = bytes.fromhex("0603550403")  # id-at-commonName; the 2nd occurrence in a certificate is the subject's
AKI_OID = bytes.fromhex("0603551d23")  # authorityKeyIdentifier
AMD_SNP_SPL_OID = bytes.fromhex("060a2b060104019c78010303")  # 1.3.6.1.4.1.3704.1.3.3 (snpSPL)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _raw_load(der: bytes) -> x509.Certificate:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AMD's serial number 0
        return x509.load_der_x509_certificate(der)


@dataclass(frozen=True)
class Damage:
    """One byte of a certificate set to ``value``; ``at`` finds the byte's offset in the DER."""

    name: str
    at: Callable[[bytes], int]
    value: int | Callable[[int], int]
    raises: type[Exception]  # what cryptography raises ...
    when: str  # ... at "load", or on first reading "subject" | "public_key" | "extensions"

    def apply(self, der: bytes) -> bytes:
        offset = self.at(der)
        assert 0 <= offset < len(der), f"{self.name}: pattern not found"
        out = bytearray(der)
        out[offset] = self.value(out[offset]) if callable(self.value) else self.value
        assert bytes(out) != der
        return bytes(out)

    def assert_escapes_cryptography(self, damaged: bytes) -> None:
        """The unguarded behaviour of cryptography: the exception type and the moment it is raised."""
        if self.when == "load":
            with pytest.raises(self.raises):
                _raw_load(damaged)
            return
        cert = _raw_load(damaged)  # loads fine: the damage is only found later
        read = {"subject": lambda: cert.subject, "public_key": cert.public_key,
                "extensions": lambda: cert.extensions}[self.when]
        with pytest.raises(self.raises) as info:
            read()
        assert not isinstance(info.value, AttestationError)


def _nth(pattern: bytes, n: int, plus: int) -> Callable[[bytes], int]:
    def find(der: bytes) -> int:
        offsets = [m.start() for m in re.finditer(re.escape(pattern), der)]
        return offsets[n] + plus if len(offsets) > n else -1
    return find


VERSION = Damage("version 3 (InvalidVersion)", _nth(bytes.fromhex("a003020102"), 0, 4), 3, x509.InvalidVersion, "load")
SUBJECT_BAD_TAG = Damage("subject CN with tag 8 (ValueError)", _nth(CN_OID, 1, 5), 0x08, ValueError, "subject")
SUBJECT_BIT_STRING = Damage("subject CN as BIT STRING (TypeError)", _nth(CN_OID, 1, 5), 0x03, TypeError, "subject")
P256_POINT_OFF_CURVE = Damage("P-256 point off the curve (ValueError)", _nth(bytes.fromhex("03420004"), 0, 4),
                              lambda b: b ^ 1, ValueError, "public_key")
UNKNOWN_CURVE = Damage("curve 1.2.840.10045.3.1.11 (UnsupportedAlgorithm)",
                       _nth(bytes.fromhex("06082a8648ce3d030107"), 0, 9), 0x0B, UnsupportedAlgorithm, "public_key")
UNKNOWN_RSA_KEY_TYPE = Damage("SPKI algorithm md2WithRSA (UnsupportedAlgorithm)",
                              _nth(bytes.fromhex("06092a864886f70d010101"), 0, 10), 0x02, UnsupportedAlgorithm,
                              "public_key")
AKI_AS_SKI = Damage("AKI renamed SKI: duplicate 2.5.29.14 (DuplicateExtension)", _nth(AKI_OID, 0, 4), 0x0E,
                    x509.DuplicateExtension, "extensions")
AKI_AS_PKUP = Damage("AKI renamed PrivateKeyUsagePeriod (ValueError)", _nth(AKI_OID, 0, 4), 0x10, ValueError,
                     "extensions")
CRL_DP_X400 = Damage("CRL distribution point as x400Address (UnsupportedGeneralNameType)",
                     _nth(b"https://", 0, -2), 0xA3, x509.UnsupportedGeneralNameType, "extensions")
AMD_DUPLICATE_SPL = Damage("snpSPL renamed teeSPL: duplicate AMD extension (DuplicateExtension)",
                           _nth(AMD_SNP_SPL_OID, 0, len(AMD_SNP_SPL_OID) - 1), 0x02, x509.DuplicateExtension,
                           "extensions")


# ------------------------------------------------------------------------------------------------- SNP


def _snp_inputs() -> tuple[bytes, bytes, bytes, bytes]:
    report = bytes.fromhex("".join((VECTORS / "snp" / "virtee-sev--report_milan.hex").read_text().split()))
    vcek = (VECTORS / "snp" / "virtee-sev--vcek_milan.der").read_bytes()
    ask, ark = (_der(c) for c in load_certificates((VECTORS / "snp" / "virtee-sev--cert_chain_milan").read_bytes()))
    return report, vcek, ask, ark


SNP_CASES = [
    ("vcek", VERSION), ("vcek", SUBJECT_BAD_TAG), ("vcek", SUBJECT_BIT_STRING), ("vcek", AMD_DUPLICATE_SPL),
    ("ask", VERSION), ("ask", SUBJECT_BAD_TAG), ("ask", UNKNOWN_RSA_KEY_TYPE), ("ask", CRL_DP_X400),
]


def test_genuine_snp_inputs_verify() -> None:
    report, vcek, ask, ark = _snp_inputs()
    assert verify_report(report, vek=vcek, chain=[ask, ark], at=SNP_AT).product == "Milan"


@pytest.mark.parametrize("which,damage", SNP_CASES, ids=[f"{w}: {d.name}" for w, d in SNP_CASES])
def test_snp_damaged_certificate_is_a_parse_error_at_load(which: str, damage: Damage) -> None:
    report, vcek, ask, ark = _snp_inputs()
    damaged = damage.apply(vcek if which == "vcek" else ask)
    damage.assert_escapes_cryptography(damaged)

    with pytest.raises(ParseError, match="certificate"):
        load_certificate(damaged)
    if damage.when != "load":
        # A Certificate object loaded by someone else is inspected on the way in as well.
        with pytest.raises(ParseError):
            load_certificate(_raw_load(damaged))

    if which == "vcek":
        vek, chain = damaged, [ask, ark]
    else:
        vek, chain = vcek, [damaged, ark]
    with pytest.raises(ParseError):
        verify_report(report, vek=vek, chain=chain, at=SNP_AT)
    if damage.when != "load":
        with pytest.raises(ParseError):
            verify_report(report, vek=_raw_load(vek), chain=[_raw_load(c) for c in chain], at=SNP_AT)

    verdict = verify_evidence(Evidence("snp", report, (vek, *chain)), at=SNP_AT)
    assert not verdict.ok
    assert verdict.status == "malformed", verdict.error


def test_amd_extension_values_of_a_foreign_certificate_with_duplicates() -> None:
    # The fuzzer's DuplicateExtension escape: a Certificate that never went through our loader.
    vcek = (VECTORS / "snp" / "virtee-sev--vcek_milan.der").read_bytes()
    cert = _raw_load(AMD_DUPLICATE_SPL.apply(vcek))
    with pytest.raises(ParseError, match="extensions are malformed"):
        amd_extension_values(cert)


def test_snp_damaged_crl_is_a_parse_error() -> None:
    report, vcek, ask, ark = _snp_inputs()
    crl_der = load_crl((COLLATERAL / "root_ca.crl").read_bytes(), "root_ca.crl")[1]
    damaged = _damaged_crl_issuer(crl_der)
    with pytest.raises(ParseError, match="CRL"):
        verify_report(report, vek=vcek, chain=[ask, ark], at=SNP_AT, check_crl=True, crls=[damaged])
    with pytest.raises(ParseError, match="CRL"):
        verify_report(report, vek=vcek, chain=[ask, ark], at=SNP_AT, check_crl=True,
                      crls=[x509.load_der_x509_crl(damaged)])


# ------------------------------------------------------------------------------------------------- TDX


def _replace_pem_certificate(pem: bytes, index: int, der: bytes) -> bytes:
    """``pem`` with certificate ``index`` replaced by ``der`` (same length), line breaks kept in place."""
    blocks = list(re.finditer(rb"-----BEGIN CERTIFICATE-----\n(.+?)-----END CERTIFICATE-----", pem, re.DOTALL))
    body = blocks[index].group(1)
    encoded = base64.b64encode(der)
    assert len(encoded) == len(body.replace(b"\n", b""))
    out, pos = bytearray(), 0
    for ch in body:
        if ch == 0x0A:
            out.append(ch)
        else:
            out.append(encoded[pos])
            pos += 1
    start, end = blocks[index].span(1)
    return pem[:start] + bytes(out) + pem[end:]


def _quote_with_damaged_pck(index: int, damage: Damage) -> tuple[bytes, bytes]:
    """(genuine v5 quote, the same quote with PCK chain certificate ``index`` damaged); same length."""
    raw = V5_QUOTE.read_bytes()
    quote = parse_quote(raw)
    damaged_der = damage.apply(_der(quote.sig_data.pck_chain[index]))
    damage.assert_escapes_cryptography(damaged_der)
    pem = quote.sig_data.pck_chain_pem
    new_pem = _replace_pem_certificate(pem, index, damaged_der)
    assert raw.count(pem) == 1 and len(new_pem) == len(pem)
    return raw, raw.replace(pem, new_pem)


@pytest.fixture(scope="module")
def tdx_collateral():
    return load_collateral_dir(COLLATERAL, fmspc="90c06f000000")


# (chain index: 0 leaf, 1 PCK Platform CA, 2 root) and the damage; each one escaped before.
TDX_CASES = [
    (0, VERSION),  # quote.py load_pck_chain: InvalidVersion
    (0, SUBJECT_BAD_TAG),  # chain.py: common_name(c.subject)
    (1, SUBJECT_BIT_STRING),  # chain.py: common_name(c.subject), TypeError
    (2, SUBJECT_BAD_TAG),  # chain.py: names are read before the root pin is checked
    (1, P256_POINT_OFF_CURVE),  # chain.py: _p256_key(issuer) -> cert.public_key()
    (1, UNKNOWN_CURVE),  # chain.py: public_key(), UnsupportedAlgorithm
    (0, AKI_AS_SKI),  # pck.py / quote.py: leaf extensions, DuplicateExtension
    (0, AKI_AS_PKUP),  # chain.py: _basic_ca(leaf) -> cert.extensions
    (1, AKI_AS_PKUP),  # chain.py: _check_ca(intermediate) -> cert.extensions
    (1, CRL_DP_X400),  # chain.py: extensions, UnsupportedGeneralNameType
]


def test_genuine_v5_quote_verifies(tdx_collateral) -> None:
    assert verify_quote(V5_QUOTE.read_bytes(), collateral=tdx_collateral, at=TDX_AT).tcb_status == "UpToDate"


@pytest.mark.parametrize("index,damage", TDX_CASES, ids=[f"pck[{i}]: {d.name}" for i, d in TDX_CASES])
def test_tdx_damaged_pck_certificate_is_a_parse_error(index: int, damage: Damage, tdx_collateral) -> None:
    _, damaged = _quote_with_damaged_pck(index, damage)
    with pytest.raises(ParseError, match="PCK certificate chain"):
        parse_quote(damaged)
    with pytest.raises(ParseError, match="PCK certificate chain"):
        verify_quote(damaged, collateral=tdx_collateral, at=TDX_AT)
    with pytest.raises(ParseError):
        verify_quote(damaged, at=TDX_AT)  # no collateral: the chain checks alone
    verdict = verify_evidence(Evidence("tdx", damaged, collateral=collateral_to_files(tdx_collateral)), at=TDX_AT)
    assert not verdict.ok
    assert verdict.status == "malformed", verdict.error


def test_pck_extension_of_a_foreign_certificate_with_duplicates() -> None:
    leaf = _der(parse_quote(V5_QUOTE.read_bytes()).pck_leaf)
    with pytest.raises(ParseError, match="extensions are malformed"):
        pck_extension_of(_raw_load(AKI_AS_SKI.apply(leaf)))


def _collateral_files() -> dict[str, bytes]:
    return collateral_to_files(load_collateral_dir(COLLATERAL, fmspc="90c06f000000"))


def _damaged_crl_issuer(crl_der: bytes) -> bytes:
    """The CRL with the tag of its issuer CN set to 8: loads, but reading ``issuer`` raises ValueError."""
    damaged = bytearray(crl_der)
    damaged[crl_der.index(CN_OID) + 5] = 0x08
    crl = x509.load_der_x509_crl(bytes(damaged))
    with pytest.raises(ValueError):
        crl.issuer
    return bytes(damaged)


def test_collateral_with_damaged_tcb_signing_certificate(tdx_collateral) -> None:
    files = _collateral_files()
    name = "tcb_info_90c06f000000_chain.txt"
    chain = [_der(c) for c in tdx_collateral.tcb_info_chain]
    damaged = SUBJECT_BAD_TAG.apply(chain[0])
    SUBJECT_BAD_TAG.assert_escapes_cryptography(damaged)
    plain_pem = b"".join(_raw_load(d).public_bytes(Encoding.PEM) for d in chain)  # the vector is URL-encoded
    files[name] = _replace_pem_certificate(plain_pem, 0, damaged)
    with pytest.raises(ParseError, match=name):
        collateral_from_files(files)
    verdict = verify_evidence(Evidence("tdx", V5_QUOTE.read_bytes(), collateral=files), at=TDX_AT)
    assert verdict.status == "malformed", verdict.error


def test_collateral_with_percent_encoded_non_utf8_issuer_chain() -> None:
    files = _collateral_files()
    files["qe_identity_chain.txt"] = urllib.parse.quote_from_bytes(b"\xff\xfe-----BEGIN").encode()
    with pytest.raises(ParseError, match="qe_identity_chain.txt"):
        collateral_from_files(files)


@pytest.mark.parametrize("name", ["root_ca.crl", "pck_crl_platform.crl"])
def test_collateral_with_lazily_damaged_crl(name: str) -> None:
    files = _collateral_files()
    der = load_crl(files[name], name)[1]
    files[name] = _damaged_crl_issuer(der)
    with pytest.raises(ParseError, match=name):
        collateral_from_files(files)
    verdict = verify_evidence(Evidence("tdx", V5_QUOTE.read_bytes(), collateral=files), at=TDX_AT)
    assert verdict.status == "malformed", verdict.error


def test_crl_with_invalid_version() -> None:
    der = load_crl((COLLATERAL / "root_ca.crl").read_bytes(), "root_ca.crl")[1]
    damaged = bytearray(der)
    assert damaged[7:10] == b"\x02\x01\x01"  # tbsCertList version v2
    damaged[9] = 5
    with pytest.raises(x509.InvalidVersion):
        x509.load_der_x509_crl(bytes(damaged))
    for form in (bytes(damaged), bytes(damaged).hex().encode()):
        with pytest.raises(ParseError, match="root_ca.crl"):
            load_crl(form, "root_ca.crl")


# ------------------------------------------------------------------------------------------------- loaders


def test_inspect_names_what_was_damaged() -> None:
    vcek = (VECTORS / "snp" / "virtee-sev--vcek_milan.der").read_bytes()
    cert = _raw_load(SUBJECT_BAD_TAG.apply(vcek))
    good = _raw_load(vcek)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AMD's serial number 0
        with pytest.raises(ParseError, match=r"^VCEK from the cache is damaged or unsupported \(ValueError: "):
            inspect_certificate(cert, "VCEK from the cache")
        assert inspect_certificate(good) is good
    crl = x509.load_der_x509_crl(load_crl((COLLATERAL / "root_ca.crl").read_bytes(), "x")[1])
    assert inspect_crl(crl) is crl


def test_load_pem_certificates_names_the_damaged_block(tdx_collateral) -> None:
    chain = [_der(c) for c in tdx_collateral.tcb_info_chain]
    pem = b"".join(_raw_load(d).public_bytes(Encoding.PEM) for d in chain)
    assert len(load_pem_certificates(pem)) == len(chain)
    damaged = _replace_pem_certificate(pem, 1, UNKNOWN_CURVE.apply(chain[1]))
    with pytest.raises(ParseError, match=r"TCB chain\[1\] is damaged .*UnsupportedAlgorithm"):
        load_pem_certificates(damaged, "TCB chain")
    with pytest.raises(ParseError, match="not PEM"):
        load_pem_certificates(b"no certificate here", "TCB chain")
