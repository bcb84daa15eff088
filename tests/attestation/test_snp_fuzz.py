"""Property tests: any input gives a result or a typed AttestationError, nothing else."""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.errors import AttestationError, ParseError
from attestation.snp import REPORT_SIZE, parse_report, verify_report
from attestation.snp.certs import AMD_OID_ARC, load_certificates, parse_vek_extension_values
from attestation.snp.certtable import (ARK_GUID, ASK_GUID, ENTRY_SIZE, VCEK_GUID, build_cert_table,
                                       cert_table_by_name, parse_cert_table)
from tests.attestation.test_snp_forge import vector_inputs
from tests.conftest import VECTORS


SNP = json.loads((VECTORS / "expected.json").read_text())["snp"]
INPUTS = [vector_inputs(v) for v in SNP]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=REPORT_SIZE + 64))
def test_parse_report_any_bytes(data: bytes) -> None:
    try:
        parse_report(data)
    except ParseError:
        pass


@FUZZ
@given(st.sampled_from(range(len(INPUTS))),
       st.lists(st.tuples(st.integers(0, REPORT_SIZE - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_reports_parse_or_fail_typed_and_never_verify(index: int, edits: list[tuple[int, int]]) -> None:
    report, vek, chain, at = INPUTS[index]
    buf = bytearray(report)
    for pos, value in edits:
        buf[pos] = value
    try:
        parsed = parse_report(bytes(buf))
    except ParseError:
        return
    assert parsed.raw == bytes(buf)
    try:
        verify_report(parsed, vek=vek, chain=[chain], at=at)
    except AttestationError:
        assert bytes(buf) != report
    else:
        assert bytes(buf) == report  # only the untouched report verifies


ARC_OIDS = [f"{AMD_OID_ARC}.{s}" for s in ("1", "2", "3.1", "3.2", "3.3", "3.4", "3.5", "3.6", "3.7", "3.8", "3.9", "4", "5")]


def _tlv() -> st.SearchStrategy[bytes]:
    small = st.tuples(st.sampled_from([0x02, 0x04, 0x16, 0x0C, 0x30]), st.binary(max_size=70)).map(
        lambda t: bytes([t[0], len(t[1])]) + t[1] if len(t[1]) < 0x80 else bytes([t[0], 0x81, len(t[1])]) + t[1])
    return st.one_of(small, st.binary(max_size=80))


@FUZZ
@given(st.dictionaries(st.sampled_from(ARC_OIDS), _tlv(), max_size=len(ARC_OIDS)))
def test_extension_parser_any_values(values: dict[str, bytes]) -> None:
    try:
        ext = parse_vek_extension_values(values)
    except ParseError:
        return
    assert 0 <= ext.ucode_spl <= 255 and ext.product_name
    assert ext.hwid is None or len(ext.hwid) in (8, 64)


@FUZZ
@given(st.binary(max_size=600))
def test_cert_table_any_bytes(blob: bytes) -> None:
    try:
        entries = parse_cert_table(blob)
    except ParseError:
        return
    for e in entries:
        assert e.data and len(e.data) <= len(blob)


@FUZZ
@given(st.dictionaries(st.sampled_from([VCEK_GUID, ASK_GUID, ARK_GUID, uuid.UUID(int=7)]),
                       st.binary(min_size=1, max_size=50), max_size=4),
       st.binary(max_size=40))
def test_cert_table_round_trip(entries: dict[uuid.UUID, bytes], padding: bytes) -> None:
    blob = build_cert_table(entries) + padding
    parsed = parse_cert_table(blob)
    assert {e.guid: e.data for e in parsed} == entries


@FUZZ
@given(st.binary(max_size=300))
def test_certificate_loader_any_bytes(data: bytes) -> None:
    for candidate in (data, b"-----BEGIN CERTIFICATE-----\n" + data + b"\n-----END CERTIFICATE-----\n"):
        try:
            load_certificates(candidate)
        except ParseError:
            pass


def test_cert_table_with_real_certificates_and_bounds() -> None:
    vek = (VECTORS / "snp" / "virtee-sev--vcek_milan.der").read_bytes()
    table = build_cert_table({"VCEK": vek, "ASK": b"ask", "ARK": b"ark"})
    assert table[:16] == uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes  # RFC 4122 byte order
    assert cert_table_by_name(table + bytes(4096)) == {"VCEK": vek, "ASK": b"ask", "ARK": b"ark"}
    for bad in (table[:ENTRY_SIZE * 2],  # terminator cut off
                table[:-1],  # last certificate runs past the end
                table[:16] + (0).to_bytes(4, "little") + table[20:],  # offset into the entry area
                table[:ENTRY_SIZE] + table[:ENTRY_SIZE] + table[ENTRY_SIZE * 2:]):  # duplicate GUID
        with pytest.raises(ParseError):
            parse_cert_table(bad)
