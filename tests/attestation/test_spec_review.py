"""Spec-review regressions: facts from the SEV-SNP / TDX references that verification or appraisal missed.

- SNP: the VEK's TCB (== REPORTED_TCB) must not exceed CURRENT_TCB in any component (go-sev-guest).
- TDX: TDATTRIBUTES bits 1-7 (TUD, reserved) must be zero; a Revoked TCB never passes, whatever the
  policy lists (dcap-qvl / QVL fail verification on Revoked).
- Appraisal: a failed check carried in VerifiedEvidence fails the verdict.
"""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from attestation.appraise import appraise
from attestation.errors import VerificationError
from attestation.policy import DEFAULT_POLICY, policy_from_yaml
from attestation.snp import verify_report
from attestation.snp.tcb import encode_tcb
from attestation.verdict import Check, VerifiedEvidence
from tests.attestation.test_appraise import failed, tdx
from tests.attestation.test_snp_forge import NOW, Platform


def _with_current_tcb(p: Platform, report: bytes, current_tcb: int) -> bytes:
    """The report with CURRENT_TCB replaced, re-signed by the platform's VEK."""
    r = bytearray(report)
    struct.pack_into("<Q", r, 0x38, current_tcb)
    rr, ss = decode_dss_signature(p.vek_key.sign(bytes(r[:0x2A0]), ec.ECDSA(hashes.SHA384())))
    r[0x2A0:0x2E8] = rr.to_bytes(72, "little")
    r[0x2E8:0x330] = ss.to_bytes(72, "little")
    return bytes(r)


def test_snp_reported_tcb_above_current_tcb_refused() -> None:
    milan = Platform(tag="a")  # VEK and REPORTED_TCB: bl 3, tee 0, snp 8, ucode 0x73
    higher = _with_current_tcb(milan, milan.report(), encode_tcb("Milan", bl=3, tee=0, snp=8, ucode=0xCE))
    ev = verify_report(higher, vek=milan.vek, chain=milan.chain(), at=NOW, trust=milan.trust)
    assert next(c for c in ev.checks if c.name == "tcb_not_above_current").ok
    lower = _with_current_tcb(milan, milan.report(), encode_tcb("Milan", bl=3, tee=0, snp=7, ucode=0xCE))
    with pytest.raises(VerificationError) as e:
        verify_report(lower, vek=milan.vek, chain=milan.chain(), at=NOW, trust=milan.trust)
    assert e.value.checks[-1].name == "tcb_not_above_current" and "snp" in e.value.checks[-1].detail


def test_snp_turin_tcb_compared_per_component_in_turin_layout() -> None:
    turin = Platform(product="Turin", tag="t", reported_tcb=0x5100000004010101)  # fmc 1 bl 1 tee 1 snp 4
    report = turin.report(version=3, cpuid=(0x1A, 0x02, 0x01))
    ok = _with_current_tcb(turin, report, encode_tcb("Turin", fmc=1, bl=1, tee=1, snp=5, ucode=0x51))
    assert verify_report(ok, vek=turin.vek, chain=turin.chain(), at=NOW, trust=turin.trust).product == "Turin"
    low_fmc = _with_current_tcb(turin, report, encode_tcb("Turin", fmc=0, bl=1, tee=1, snp=9, ucode=0x60))
    with pytest.raises(VerificationError) as e:
        verify_report(low_fmc, vek=turin.vek, chain=turin.chain(), at=NOW, trust=turin.trust)
    assert e.value.checks[-1].name == "tcb_not_above_current" and "fmc" in e.value.checks[-1].detail


@pytest.mark.parametrize("bit", range(1, 8))
def test_tdx_reserved_tud_bits_refused_by_every_policy(bit: int) -> None:
    attrs = ((1 << 28) | (1 << bit)).to_bytes(8, "little").hex()
    for policy in (DEFAULT_POLICY, policy_from_yaml("{}"), policy_from_yaml("tdx: {allow_debug: true}")):
        assert failed(appraise(tdx("UpToDate", td_attributes=attrs), policy)) == {"td_attributes_reserved"}


def test_tdx_known_attribute_bits_pass_the_reserved_check() -> None:
    for attrs in (1 << 28, (1 << 28) | (1 << 30), (1 << 28) | (1 << 63), 1 << 30):
        verdict = appraise(tdx("UpToDate", td_attributes=attrs.to_bytes(8, "little").hex()), DEFAULT_POLICY)
        assert verdict.ok, verdict.error
        assert next(c for c in verdict.checks if c.name == "td_attributes_reserved").ok


def test_revoked_tcb_status_is_never_accepted() -> None:
    reckless = policy_from_yaml("accepted_tcb_statuses: [UpToDate, OutOfDate, Revoked]")
    assert appraise(tdx("OutOfDate"), reckless).ok
    verdict = appraise(tdx("Revoked"), reckless)
    assert not verdict.ok and verdict.status == "Revoked" and failed(verdict) == {"tcb_status"}
    assert "Revoked" in verdict.error


def test_a_failed_verification_check_fails_the_verdict() -> None:
    v = tdx()
    v.checks = [Check("quote_signature", False, "does not verify")]
    verdict = appraise(v, DEFAULT_POLICY)
    assert not verdict.ok and verdict.status == "refused" and "quote_signature" in verdict.error


def test_snp_claims_come_from_the_signed_bytes_of_a_report_object() -> None:
    import dataclasses

    from attestation.snp import parse_report

    milan = Platform(tag="a")
    genuine = parse_report(milan.report())
    doctored = dataclasses.replace(genuine, measurement=b"\xee" * 48, policy=0x30000, vmpl=0)
    ev = verify_report(doctored, vek=milan.vek, chain=milan.chain(), at=NOW, trust=milan.trust)
    assert ev.claims["measurement"] == genuine.measurement.hex() != "ee" * 48



V4 = "tdx/go-tdx-guest--tdx_prod_quote_SPR_E4.dat"


def test_tdx_without_collateral_pins_intels_qe_and_module(expected: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """No collateral: the QE must still be Intel's TD QE and the TDX module Intel's (else a non-Intel enclave
    holding a PCK-certified key could sign any TD report)."""
    from attestation.tdx import clear_caches, verify_quote
    from attestation.tdx import trust as tdx_trust
    from tests.attestation.test_tdx_helpers import quote_bytes
    from tests.conftest import inside_validity

    entry = next(e for e in expected["tdx"] if e["quote"] == V4)
    raw, at = quote_bytes(entry), inside_validity(entry["pck_not_before"])
    clear_caches()
    ev = verify_quote(raw, at=at)
    assert {c.name for c in ev.checks} >= {"qe_identity", "tdx_module"}
    monkeypatch.setattr(tdx_trust, "INTEL_TD_QE_MRSIGNER", bytes(32))
    with pytest.raises(VerificationError) as e:
        verify_quote(raw, at=at)
    assert e.value.checks[-1].name == "qe_identity" and "MRSIGNER" in e.value.checks[-1].detail
    monkeypatch.undo()
    monkeypatch.setattr(tdx_trust, "INTEL_TD_QE_ISVPRODID", 1)
    with pytest.raises(VerificationError, match="ISVPRODID"):
        verify_quote(raw, at=at)
    monkeypatch.undo()
    monkeypatch.setattr(tdx_trust, "INTEL_TDX_MODULE_MRSIGNER", b"\x11" * 48)
    with pytest.raises(VerificationError) as e:
        verify_quote(raw, at=at)
    assert e.value.checks[-1].name == "tdx_module"
