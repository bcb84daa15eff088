"""TDX quote parsing: every real vector, claims exactly as expected.json, strictness, fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.errors import AttestationError, ParseError
from attestation.tdx import parse_quote, quote_claims

from ..conftest import inside_validity
from .test_tdx_helpers import quote_bytes, sig_offsets

# Claim keys of CONTRACTS.md that expected.json carries for TDX vectors.
CLAIM_KEYS = (
    "quote_version body_type tee_tcb_svn mrseam mrsignerseam seam_attributes td_attributes xfam mrtd mrconfigid "
    "mrowner mrownerconfig rtmr0 rtmr1 rtmr2 rtmr3 report_data tee_tcb_svn2 mrservicetd fmspc pceid pcesvn cpusvn "
    "sgx_type qe_isvsvn qe_mrsigner pck_issuer"
).split()


def test_every_vector_parses_to_its_expected_claims(expected: dict) -> None:
    assert len(expected["tdx"]) >= 7
    for entry in expected["tdx"]:
        raw = quote_bytes(entry)
        assert len(raw) == entry["size"]
        quote = parse_quote(raw)
        claims = quote_claims(quote)
        compared = [k for k in CLAIM_KEYS if k in entry]
        assert {k: claims[k] for k in compared} == {k: entry[k] for k in compared}, entry["quote"]
        assert quote.trailing_bytes == entry["trailing_bytes"]
        assert ("tee_tcb_svn2" in claims) == (entry["body_type"] == 3)
        assert quote.signed_length == (632 if entry["quote_version"] == 4 else 54 + (648 if entry["body_type"] == 3 else 584))


def test_debug_td_claims_show_debug(expected: dict) -> None:
    flags = {e["quote"]: quote_claims(parse_quote(quote_bytes(e)))["debug"] for e in expected["tdx"]}
    assert flags["tdx/trustee--tdx_quote_4.dat"] is True
    assert sum(flags.values()) == 1


def test_trailing_bytes_do_not_change_the_quote(expected: dict) -> None:
    entry = next(e for e in expected["tdx"] if e["trailing_bytes"] == 0)
    raw = quote_bytes(entry)
    padded = parse_quote(raw + bytes(1000))
    assert padded.trailing_bytes == 1000
    assert quote_claims(padded) == quote_claims(parse_quote(raw))


def test_every_truncation_is_refused(expected: dict) -> None:
    entry = next(e for e in expected["tdx"] if e["quote_version"] == 5)
    raw = quote_bytes(entry)
    sig_start = sig_offsets(raw)["signature"]
    end = sig_start + struct.unpack_from("<I", raw, sig_start - 4)[0]
    assert end == len(raw)
    for cut in list(range(0, 800)) + list(range(800, end, 97)) + [end - 1]:
        with pytest.raises(ParseError):
            parse_quote(raw[:cut])


@pytest.mark.parametrize(
    "offset,value,message",
    [
        (0, struct.pack("<H", 3), "version"),
        (0, struct.pack("<H", 6), "version"),
        (2, struct.pack("<H", 3), "attestation key type"),
        (4, struct.pack("<I", 0), "TEE type"),
        (12, b"\x00" * 16, "vendor"),
    ],
)
def test_header_fields_are_enforced(expected: dict, offset: int, value: bytes, message: str) -> None:
    raw = bytearray(quote_bytes(expected["tdx"][0]))
    raw[offset : offset + len(value)] = value
    with pytest.raises(ParseError, match=message):
        parse_quote(bytes(raw))


def test_v5_body_types(expected: dict) -> None:
    entry = next(e for e in expected["tdx"] if e["quote_version"] == 5)
    raw = bytearray(quote_bytes(entry))
    sgx = bytearray(raw)
    struct.pack_into("<H", sgx, 48, 1)
    with pytest.raises(ParseError, match="SGX"):
        parse_quote(bytes(sgx))
    for body_type in (0, 4, 9):
        other = bytearray(raw)
        struct.pack_into("<H", other, 48, body_type)
        with pytest.raises(ParseError):
            parse_quote(bytes(other))
    wrong_size = bytearray(raw)
    struct.pack_into("<I", wrong_size, 50, 584)  # type 3 must be 648
    with pytest.raises(ParseError, match="648"):
        parse_quote(bytes(wrong_size))


def test_declared_lengths_must_fit_and_nest(expected: dict) -> None:
    raw = quote_bytes(next(e for e in expected["tdx"] if e["trailing_bytes"] == 0))
    off = sig_offsets(raw)
    too_long = bytearray(raw)
    struct.pack_into("<I", too_long, off["signature"] - 4, len(raw))
    with pytest.raises(ParseError):
        parse_quote(bytes(too_long))
    short_cert = bytearray(raw)
    struct.pack_into("<I", short_cert, off["signature"] + 130, 10)
    with pytest.raises(ParseError, match="certification data size"):
        parse_quote(bytes(short_cert))
    wrong_type = bytearray(raw)
    struct.pack_into("<H", wrong_type, off["signature"] + 128, 5)
    with pytest.raises(ParseError, match="type 5"):
        parse_quote(bytes(wrong_type))
    inner_type = bytearray(raw)
    struct.pack_into("<H", inner_type, off["pck_chain"] - 6, 3)
    with pytest.raises(ParseError, match="inner certification data type 3"):
        parse_quote(bytes(inner_type))


def test_inside_validity_helper_matches_vectors(expected: dict) -> None:
    # the verification time the other tests use really lies inside each PCK validity window
    for entry in expected["tdx"]:
        leaf = parse_quote(quote_bytes(entry)).pck_leaf
        at = inside_validity(entry["pck_not_before"])
        assert leaf.not_valid_before_utc < at < leaf.not_valid_after_utc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_give_a_quote_or_a_typed_error(data: bytes) -> None:
    try:
        parse_quote(data)
    except AttestationError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_real_quotes_give_a_quote_or_a_typed_error(expected: dict, data: st.DataObject) -> None:
    entry = data.draw(st.sampled_from(expected["tdx"]))
    raw = bytearray(quote_bytes(entry))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        parse_quote(bytes(raw[:cut]))
    except AttestationError:
        pass
