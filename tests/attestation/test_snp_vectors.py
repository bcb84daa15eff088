"""Real SEV-SNP vectors (../shared/vectors/snp): claims, tamper resistance, time, product and key kind."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from attestation.errors import AttestationError, ParseError, VerificationError
from attestation.snp import REPORT_SIZE, clear_caches, parse_report, verify_report
from tests.attestation.test_snp_forge import read_report, root, vector_inputs
from tests.conftest import parse_when

CONTRACT_CLAIMS = (
    "version guest_svn policy vmpl signing_key mask_chip_id author_key_en platform_info cpuid_fam_mod_step "
    "reported_tcb current_tcb committed_tcb launch_tcb measurement report_data host_data id_key_digest "
    "family_id image_id chip_id").split()


def _snp(expected: dict) -> list[dict]:
    vectors = expected["snp"]
    assert len(vectors) >= 4
    return vectors


def _ids(expected_snp: list[dict]) -> list[str]:
    return [v["report"].split("/")[-1] for v in expected_snp]


@pytest.fixture(scope="module")
def snp_vectors(expected: dict) -> list[dict]:
    return _snp(expected)


def test_every_vector_verifies_with_expected_claims(snp_vectors: list[dict]) -> None:
    for v in snp_vectors:
        report, vek, chain, at = vector_inputs(v)
        ev = verify_report(report, vek=vek, chain=[chain], at=at)
        assert ev.platform == "snp"
        assert ev.product == v["product"].split("-")[0].split(" ")[0] == "Milan"
        compared = [k for k in CONTRACT_CLAIMS if k in v]
        assert len(compared) == len(CONTRACT_CLAIMS), v["report"]
        for key in compared:
            assert ev.claims[key] == v[key], (v["report"], key)
        assert all(c.ok for c in ev.checks)
        names = [c.name for c in ev.checks]
        for needed in ("ark_pinned", "vek_chain", "tcb_matches_vek", "chip_id_matches_vek", "report_signature"):
            assert needed in names


def test_second_verification_replays_cached_chain(snp_vectors: list[dict]) -> None:
    clear_caches()
    report, vek, chain, at = vector_inputs(snp_vectors[0])
    first = verify_report(report, vek=vek, chain=[chain], at=at)
    second = verify_report(report, vek=vek, chain=[chain], at=at)
    assert not any("(cached)" in c.detail for c in first.checks)
    assert any(c.name == "vek_chain" and "(cached)" in c.detail for c in second.checks)
    assert [c.name for c in first.checks] == [c.name for c in second.checks]
    # A cached chain is still refused outside its validity window.
    with pytest.raises(VerificationError) as e:
        verify_report(report, vek=vek, chain=[chain], at=parse_when(snp_vectors[0]["vek_not_after"]) + timedelta(days=1))
    assert e.value.checks[-1].name == "chain_validity"


def test_debug_guest_verifies_but_claims_debug(snp_vectors: list[dict]) -> None:
    v = next(v for v in snp_vectors if v["report"].startswith("snp/go-sev-guest"))
    report, vek, chain, at = vector_inputs(v)
    ev = verify_report(report, vek=vek, chain=[chain], at=at)
    assert ev.claims["debug"] is True and ev.claims["policy"] == "0xb0000"
    others = [verify_report(*vector_inputs(o)[:1], vek=vector_inputs(o)[1], chain=[vector_inputs(o)[2]],
                            at=vector_inputs(o)[3]) for o in snp_vectors if o is not v]
    assert all(o.claims["debug"] is False for o in others)


def test_every_single_byte_flip_is_refused(snp_vectors: list[dict]) -> None:
    for v in snp_vectors:
        report, vek, chain, at = vector_inputs(v)
        verify_report(report, vek=vek, chain=[chain], at=at)  # warm the chain cache
        buf = bytearray(report)
        refused = 0
        for i in range(REPORT_SIZE):  # signed bytes [0, 0x2A0) and the signature [0x2A0, 0x4A0)
            for mask in (0x01, 0x80):
                buf[i] ^= mask
                try:
                    verify_report(bytes(buf), vek=vek, chain=[chain], at=at)
                except (VerificationError, ParseError):
                    refused += 1
                else:
                    pytest.fail(f"{v['report']}: flip {mask:#x} at {i:#x} accepted")
                finally:
                    buf[i] ^= mask
        assert refused == 2 * REPORT_SIZE


def test_truncated_and_padded_reports_refused(snp_vectors: list[dict]) -> None:
    report, vek, chain, at = vector_inputs(snp_vectors[0])
    for bad in (report[:-1], report[:0x2A0], b"", report + b"\x00", report + bytes(4096)):
        with pytest.raises(ParseError):
            parse_report(bad)
        with pytest.raises(ParseError):
            verify_report(bad, vek=vek, chain=[chain], at=at)


def test_wrong_product_chain_refused(snp_vectors: list[dict]) -> None:
    report, vek, _, at = vector_inputs(snp_vectors[0])
    for wrong in ("genoa_ask_ark.pem", "turin_ask_ark.pem"):
        with pytest.raises(VerificationError) as e:
            verify_report(report, vek=vek, chain=[root(wrong)], at=at)
        assert e.value.checks[-1].name in ("chain_names", "ark_pinned")
    # Milan ARK with the Genoa ASK: the ASK does not chain.
    with pytest.raises(VerificationError):
        verify_report(report, vek=vek, chain=[root("genoa_ask.pem"), root("milan_ark.pem")], at=at)
    # Caller insisting on Genoa for a Milan VCEK.
    with pytest.raises(VerificationError) as e:
        verify_report(report, vek=vek, chain=[root("milan_ask_ark.pem")], at=at, product="Genoa")
    assert e.value.checks[-1].name == "product"


def test_vlek_presented_as_vcek_and_vcek_as_vlek_refused(snp_vectors: list[dict]) -> None:
    vcek_v = next(v for v in snp_vectors if v["signing_key"] == "VCEK")
    vlek_v = next(v for v in snp_vectors if v["signing_key"] == "VLEK")
    vcek_report, vcek, vcek_chain, vcek_at = vector_inputs(vcek_v)
    vlek_report, vlek, vlek_chain, vlek_at = vector_inputs(vlek_v)
    for report, vek, chain, at in ((vcek_report, vlek, vlek_chain, vlek_at), (vcek_report, vlek, vcek_chain, vlek_at),
                                   (vlek_report, vcek, vcek_chain, vcek_at), (vlek_report, vcek, vlek_chain, vlek_at)):
        with pytest.raises(VerificationError) as e:
            verify_report(report, vek=vek, chain=[chain], at=at)
        assert e.value.checks[-1].name == "signing_key_matches_vek"
    # Right VLEK, but the ASK (VCEK path) instead of the ASVK.
    with pytest.raises(VerificationError) as e:
        verify_report(vlek_report, vek=vlek, chain=[root("milan_ask_ark.pem")], at=vlek_at)
    assert e.value.checks[-1].name == "chain_names"


def test_times_outside_vek_validity_refused(snp_vectors: list[dict]) -> None:
    for v in snp_vectors:
        report, vek, chain, _ = vector_inputs(v)
        for at in (parse_when(v["vek_not_before"]) - timedelta(seconds=1),
                   parse_when(v["vek_not_after"]) + timedelta(seconds=1)):
            with pytest.raises(VerificationError) as e:
                verify_report(report, vek=vek, chain=[chain], at=at)
            assert e.value.checks[-1].name == "chain_validity"


def test_trustee_vlek_verifies_only_before_2025_12_10(snp_vectors: list[dict]) -> None:
    v = next(v for v in snp_vectors if v["signing_key"] == "VLEK")
    report, vek, chain, _ = vector_inputs(v)
    ev = verify_report(report, vek=vek, chain=[chain], at=datetime(2025, 12, 9, tzinfo=timezone.utc))
    assert ev.claims["signing_key"] == "VLEK" and ev.claims["vmpl"] == 1
    assert ev.claims["csp_id"] == "CN=cc-us-east-2.amazonaws.com"
    assert ev.claims["reported_tcb_parts"]["ucode"] == 0xD9
    for at in (datetime(2025, 12, 11, tzinfo=timezone.utc), datetime(2026, 11, 27, tzinfo=timezone.utc)):
        with pytest.raises(VerificationError):
            verify_report(report, vek=vek, chain=[chain], at=at)


def test_trustee_reported_tcb_not_current_tcb_binds_vcek(snp_vectors: list[dict]) -> None:
    v = next(v for v in snp_vectors if v["report"] == "snp/trustee--test-report.bin")
    report, vek, chain, at = vector_inputs(v)
    ev = verify_report(report, vek=vek, chain=[chain], at=at)
    assert ev.claims["current_tcb"] != ev.claims["reported_tcb"]
    assert ev.claims["current_tcb_parts"]["ucode"] == 0xCE and ev.claims["reported_tcb_parts"]["ucode"] == 0x73


def test_report_from_one_vector_with_another_vcek_refused(snp_vectors: list[dict]) -> None:
    a = next(v for v in snp_vectors if v["report"] == "snp/trustee--test-report.bin")
    b = next(v for v in snp_vectors if v["report"] == "snp/virtee-sev--report_milan.hex")
    report, _, chain, _ = vector_inputs(a)
    _, vek_b, _, at = vector_inputs(b)  # inside both validity windows
    with pytest.raises(VerificationError) as e:  # same TCB, other chip
        verify_report(report, vek=vek_b, chain=[chain], at=at)
    assert e.value.checks[-1].name == "chip_id_matches_vek"


def test_parsed_report_object_and_naive_time_accepted(snp_vectors: list[dict]) -> None:
    report, vek, chain, at = vector_inputs(snp_vectors[0])
    ev = verify_report(parse_report(report), vek=vek, chain=chain, at=at.replace(tzinfo=None))
    assert ev.claims["signing_key"] == "VCEK"


def test_garbage_certificates_are_typed_errors(snp_vectors: list[dict]) -> None:
    report, vek, chain, at = vector_inputs(snp_vectors[0])
    for bad_vek, bad_chain in ((b"not a cert", [chain]), (vek, [b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]),
                               (vek[:-10], [chain])):
        with pytest.raises(AttestationError):
            verify_report(report, vek=bad_vek, chain=bad_chain, at=at)
    assert read_report(snp_vectors[0]["report"]) == report
