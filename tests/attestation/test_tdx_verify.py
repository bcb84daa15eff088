"""verify_quote without collateral: signatures, PCK chain, QE binding; tampering and time refused."""

from __future__ import annotations

from datetime import timedelta

import pytest

from attestation.errors import AttestationError, ParseError, VerificationError
from attestation.tdx import clear_caches, parse_quote, verify_quote
from attestation.verdict import VerifiedEvidence

from ..conftest import inside_validity, parse_when
from .test_tdx_helpers import pem_of, quote_bytes, sig_offsets, with_pck_chain
from .test_tdx_quote import CLAIM_KEYS

V4 = "tdx/go-tdx-guest--tdx_prod_quote_SPR_E4.dat"
V5 = "tdx/go-tdx-guest--quote_v5_sample.dat"


def _entry(expected: dict, name: str) -> dict:
    return next(e for e in expected["tdx"] if e["quote"] == name)


def test_every_vector_verifies_with_its_claims(expected: dict) -> None:
    for entry in expected["tdx"]:
        clear_caches()
        evidence = verify_quote(quote_bytes(entry), at=inside_validity(entry["pck_not_before"]))
        assert isinstance(evidence, VerifiedEvidence)
        assert evidence.platform == "tdx"
        assert evidence.tcb_status is None
        names = [c.name for c in evidence.checks]
        assert names == ["header", "pck_chain", "qe_report_signature", "qe_report_binding", "qe_identity",
                         "tdx_module", "quote_signature"]
        assert all(c.ok for c in evidence.checks)
        compared = [k for k in CLAIM_KEYS if k in entry]
        assert {k: evidence.claims[k] for k in compared} == {k: entry[k] for k in compared}
        assert evidence.claims["debug"] is (entry["quote"] == "tdx/trustee--tdx_quote_4.dat")


def test_cached_and_parsed_inputs_give_the_same_result(expected: dict) -> None:
    entry = _entry(expected, V5)
    at = inside_validity(entry["pck_not_before"])
    clear_caches()
    cold = verify_quote(quote_bytes(entry), at=at)
    warm = verify_quote(parse_quote(quote_bytes(entry)), at=at)
    assert cold.claims == warm.claims
    assert [c.to_json() for c in cold.checks] == [c.to_json() for c in warm.checks]


def test_a_doctored_quote_object_cannot_change_the_claims(expected: dict) -> None:
    from dataclasses import replace

    entry = _entry(expected, V5)
    q = parse_quote(quote_bytes(entry))
    forged = replace(q, body=replace(q.body, mrtd=b"\x00" * 48))
    evidence = verify_quote(forged, at=inside_validity(entry["pck_not_before"]))
    assert evidence.claims["mrtd"] == entry["mrtd"]


def _refused(raw: bytes, at) -> bool:
    try:
        verify_quote(raw, at=at)
    except (ParseError, VerificationError):
        return True
    return False


def test_every_single_byte_flip_of_signed_parts_is_refused(expected: dict) -> None:
    for entry in expected["tdx"]:
        _every_flip_refused(entry)


def _every_flip_refused(entry: dict) -> None:
    raw = quote_bytes(entry)
    at = inside_validity(entry["pck_not_before"])
    off = sig_offsets(raw)
    regions = [
        (0, off["signed_length"]),  # header + TD report body: signed by the attestation key
        (off["signature"], off["signature"] + 64),  # quote signature
        (off["attestation_key"], off["attestation_key"] + 64),
        (off["qe_report"], off["qe_report"] + 384),
        (off["qe_report_signature"], off["qe_report_signature"] + 64),
        (off["qe_auth_data"], off["qe_auth_data"] + off["qe_auth_len"]),
    ]
    verify_quote(raw, at=at)  # the untouched quote passes
    failures = []
    for start, end in regions:
        for pos in range(start, end):
            flipped = bytearray(raw)
            flipped[pos] ^= 0x01
            if not _refused(bytes(flipped), at):
                failures.append(pos)
    assert failures == [], entry["quote"]


def test_failures_name_their_check(expected: dict) -> None:
    entry = _entry(expected, V4)
    raw = quote_bytes(entry)
    at = inside_validity(entry["pck_not_before"])
    off = sig_offsets(raw)
    cases = {
        200: "quote_signature",  # inside MRTD
        off["signature"] + 5: "quote_signature",
        off["qe_report"] + 0x102: "qe_report_signature",  # QE ISVSVN
        off["qe_report_signature"] + 3: "qe_report_signature",
        off["attestation_key"] + 7: "qe_report_binding",
        off["qe_auth_data"]: "qe_report_binding",
    }
    for pos, check in cases.items():
        flipped = bytearray(raw)
        flipped[pos] ^= 0x80
        with pytest.raises(VerificationError) as info:
            verify_quote(bytes(flipped), at=at)
        assert info.value.checks[-1].name == check
        assert info.value.checks[-1].ok is False
        assert all(c.ok for c in info.value.checks[:-1])


def test_pck_time_window_is_enforced(expected: dict) -> None:
    for entry in expected["tdx"][:3]:
        raw = quote_bytes(entry)
        with pytest.raises(VerificationError) as info:
            verify_quote(raw, at=parse_when(entry["pck_not_after"]) + timedelta(seconds=1))
        assert info.value.checks[-1].name == "pck_chain"
        with pytest.raises(VerificationError):
            verify_quote(raw, at=parse_when(entry["pck_not_before"]) - timedelta(seconds=1))
        # cached chain results do not outlive validity either
        verify_quote(raw, at=inside_validity(entry["pck_not_before"]))
        with pytest.raises(VerificationError):
            verify_quote(raw, at=parse_when(entry["pck_not_after"]) + timedelta(days=1))


def test_pck_chain_of_another_vector_is_refused(expected: dict) -> None:
    entries = expected["tdx"]
    for entry, donor in zip(entries, entries[1:] + entries[:1]):
        raw = quote_bytes(entry)
        swapped = with_pck_chain(raw, pem_of(quote_bytes(donor)))
        at = max(inside_validity(entry["pck_not_before"]), inside_validity(donor["pck_not_before"]))
        with pytest.raises(VerificationError) as info:
            verify_quote(swapped, at=at)
        assert info.value.checks[-1].name == "qe_report_signature"


def test_chain_surgery_is_refused(expected: dict) -> None:
    entry = _entry(expected, V5)
    raw = quote_bytes(entry)
    at = inside_validity(entry["pck_not_before"])
    pem = pem_of(raw)
    blocks = [b"-----BEGIN CERTIFICATE-----" + b for b in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]]
    assert len(blocks) == 3
    leaf, ca, root = blocks
    # wrong order, duplicated leaf, root missing: all refused
    for bad in (ca + leaf + root, leaf + leaf + root, leaf + ca + ca, leaf + root + root):
        with pytest.raises(AttestationError):
            verify_quote(with_pck_chain(raw, bad), at=at)
    for bad in (leaf + ca, leaf):
        with pytest.raises(ParseError):
            verify_quote(with_pck_chain(raw, bad), at=at)


def test_quote_type_errors_are_typed() -> None:
    for bad in (b"", b"\x04\x00", bytes(5000)):
        with pytest.raises(ParseError):
            verify_quote(bad)
