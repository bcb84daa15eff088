"""Evidence bundles: CMW record shape, round trips, strict decoding."""

from __future__ import annotations

import json

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.errors import EvidenceError
from attestation.evidence import (
    CMW_IND_EVIDENCE,
    EVIDENCE_MEDIA_TYPE,
    MAX_EVIDENCE_BYTES,
    Evidence,
    decode_cmw,
    encode_cmw,
    evidence_from_json,
    evidence_to_json,
)


def _tdx_evidence(vectors_dir) -> Evidence:
    coll_dir = vectors_dir / "tdx" / "collateral" / "pcs-2026-02"
    files = {p.name: p.read_bytes() for p in coll_dir.iterdir()}
    quote = (vectors_dir / "tdx" / "go-tdx-guest--quote_v5_sample.dat").read_bytes()
    return Evidence(platform="tdx", report=quote, collateral=files,
                    binding={"scheme": "cube-ai/atls/v1", "nonce": bytes(range(32)), "n": 7, "flag": True})


def _snp_evidence(vectors_dir) -> Evidence:
    report = (vectors_dir / "snp" / "trustee--test-report.bin").read_bytes()
    vek = (vectors_dir / "snp" / "trustee--test-vcek.der").read_bytes()
    return Evidence(platform="snp", report=report, certificates=(vek,), product="Milan-B0")


def _record(payload) -> bytes:
    return cbor2.dumps([EVIDENCE_MEDIA_TYPE, cbor2.dumps(payload), CMW_IND_EVIDENCE])


def test_cmw_record_shape(vectors_dir):
    e = _snp_evidence(vectors_dir)
    record = cbor2.loads(encode_cmw(e))
    assert record[0] == EVIDENCE_MEDIA_TYPE
    assert record[2] == 4
    payload = cbor2.loads(record[1])
    assert payload["v"] == 1 and payload["platform"] == "snp" and payload["report"] == e.report
    assert payload["certificates"] == [e.certificates[0]]


def test_round_trips_cbor_and_json(vectors_dir):
    for e in (_snp_evidence(vectors_dir), _tdx_evidence(vectors_dir)):
        assert decode_cmw(encode_cmw(e)) == e
        as_json = json.loads(json.dumps(evidence_to_json(e)))
        assert evidence_from_json(as_json) == e
    e = _tdx_evidence(vectors_dir)
    j = evidence_to_json(e)
    assert j["binding"]["nonce"] == {"base64": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}
    assert j["binding"]["scheme"] == "cube-ai/atls/v1"
    assert isinstance(decode_cmw(encode_cmw(e)).binding["nonce"], bytes)


def test_encoding_is_deterministic(vectors_dir):
    e = _tdx_evidence(vectors_dir)
    assert encode_cmw(e) == encode_cmw(decode_cmw(encode_cmw(e)))


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"v": 1, "platform": "snp", "report": b"x", "extra": 1}, "unknown key"),
        ({"v": 2, "platform": "snp", "report": b"x"}, "format version"),
        ({"v": 1, "platform": "sgx", "report": b"x"}, "platform"),
        ({"v": 1, "platform": "snp"}, "missing report"),
        ({"v": 1, "platform": "snp", "report": "text"}, "report"),
        ({"v": 1, "platform": "snp", "report": b""}, "report"),
        ({"v": 1, "platform": "snp", "report": b"x", "certificates": [b"a"] * 9}, "more than 8"),
        ({"v": 1, "platform": "snp", "report": b"x", "certificates": ["a"]}, r"certificates\[0\]"),
        ({"v": 1, "platform": "snp", "report": b"x", "certificates": []}, "present but empty"),
        ({"v": 1, "platform": "snp", "report": b"x", "collateral": {"a.json": b"{}"}}, "at most the AMD CRL"),
        ({"v": 1, "platform": "tdx", "report": b"x", "collateral": {"../etc/passwd": b""}}, "bad file name"),
        ({"v": 1, "platform": "tdx", "report": b"x", "binding": {"nonce": 1.5}}, r"binding\[nonce\]"),
        ({"v": 1, "platform": "tdx", "report": b"x", "binding": {"n": -1}}, "out of range"),
        ({"v": 1, "platform": "tdx", "report": b"x", "product": "x" * 65}, "product"),
        ({"v": True, "platform": "tdx", "report": b"x"}, "format version"),
        ([1, 2], "must be a map"),
    ],
)
def test_bad_payloads_refused(payload, message):
    with pytest.raises(EvidenceError, match=message):
        decode_cmw(_record(payload))


def test_bad_records_refused():
    good_payload = cbor2.dumps({"v": 1, "platform": "sim", "report": b"r"})
    cases = {
        "media type": cbor2.dumps(["application/cbor", good_payload, 4]),
        "ind must be 4": cbor2.dumps([EVIDENCE_MEDIA_TYPE, good_payload, 2]),
        "array": cbor2.dumps([EVIDENCE_MEDIA_TYPE, good_payload]),
        "value must be a byte string": cbor2.dumps([EVIDENCE_MEDIA_TYPE, "text", 4]),
        "media type must be text": cbor2.dumps([30001, good_payload, 4]),
        "trailing": cbor2.dumps([EVIDENCE_MEDIA_TYPE, good_payload, 4]) + b"\x00",
        "tags": cbor2.dumps(cbor2.CBORTag(1668547090, [EVIDENCE_MEDIA_TYPE, good_payload, 4])),
        "empty": b"",
        "exceeds the limit": b"\x00" * (MAX_EVIDENCE_BYTES + 1),
    }
    for message, data in cases.items():
        with pytest.raises(EvidenceError, match=message):
            decode_cmw(data)


def test_duplicate_keys_and_indefinite_lengths_refused():
    # map with "v" twice: a2 61 76 01 61 76 01 (hand-built: cbor2 will not encode duplicates)
    dup = bytes.fromhex("a3") + cbor2.dumps("v")[0:] + b"\x01" + cbor2.dumps("v") + b"\x01" \
        + cbor2.dumps("report") + cbor2.dumps(b"r")
    with pytest.raises(EvidenceError, match="CBOR"):
        decode_cmw(cbor2.dumps([EVIDENCE_MEDIA_TYPE, dup, 4]))
    indefinite = b"\x9f" + cbor2.dumps(EVIDENCE_MEDIA_TYPE) + cbor2.dumps(b"x") + b"\x04\xff"
    with pytest.raises(EvidenceError, match="CBOR"):
        decode_cmw(indefinite)


def test_json_strictness():
    good = {"v": 1, "platform": "sim", "report": "cg=="}
    assert evidence_from_json(good).report == b"r"
    for bad, msg in [
        ({**good, "report": "not base64!"}, "base64"),
        ({**good, "zzz": 1}, "unknown key"),
        ({**good, "binding": {"nonce": {"hex": "00"}}}, "base64"),
        ({**good, "binding": {"x": 1.0}}, "float"),
        ({**good, "v": "1"}, "v must be"),
        ({**good, "media_type": "application/json"}, "media_type"),
        ([], "object"),
    ]:
        with pytest.raises(EvidenceError, match=msg):
            evidence_from_json(bad)


def test_constructor_validates():
    with pytest.raises(EvidenceError):
        Evidence(platform="snp", report=b"x", certificates=("not bytes",))  # type: ignore[arg-type]
    with pytest.raises(EvidenceError):
        Evidence(platform="snp", report=bytearray(b"x"))  # type: ignore[arg-type]
    e = Evidence(platform="snp", report=b"x", certificates=[b"c"])  # type: ignore[arg-type]
    assert e.certificates == (b"c",)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_only_evidence_error(data):
    try:
        decode_cmw(data)
    except EvidenceError:
        pass


_VALID = encode_cmw(Evidence(platform="sim", report=b"\x01" * 64, certificates=(b"\x30\x03abc",),
                             binding={"scheme": "s", "nonce": b"\x00" * 32}))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, len(_VALID)))
def test_mutated_valid_record_only_evidence_error(edits, cut):
    data = bytearray(_VALID)
    for pos, value in edits:
        data[pos] = value
    for candidate in (bytes(data), bytes(data[:cut])):
        try:
            e = decode_cmw(candidate)
        except EvidenceError:
            continue
        assert isinstance(e, Evidence)


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.binary(max_size=8) | st.text(max_size=8) | st.floats(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
))
def test_arbitrary_cbor_payloads_only_evidence_error(value):
    for data in (cbor2.dumps(value), _record(value)):
        try:
            decode_cmw(data)
        except EvidenceError:
            pass
    if isinstance(value, dict):
        try:
            evidence_from_json(value)
        except EvidenceError:
            pass


@pytest.mark.parametrize("tag", [0, 1, 2, 258, 1004, 55799, 60000])
def test_every_tag_refused(tag):
    good_payload = cbor2.dumps({"v": 1, "platform": "sim", "report": b"r"})
    outer = cbor2.dumps(cbor2.CBORTag(tag, [EVIDENCE_MEDIA_TYPE, good_payload, 4]))
    inner = cbor2.dumps([EVIDENCE_MEDIA_TYPE, cbor2.dumps({"v": 1, "platform": "sim", "report": cbor2.CBORTag(tag, b"r")}), 4])
    for data in (outer, inner):
        with pytest.raises(EvidenceError, match="tags are not allowed"):
            decode_cmw(data)
