"""Collateral: exact signed spans, file round trips, tampering and staleness refused, JSON fuzzing."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.errors import AttestationError, CollateralError, ParseError, VerificationError
from attestation.tdx import (
    clear_caches,
    collateral_from_files,
    collateral_to_files,
    load_collateral_dir,
    verify_quote,
)
from attestation.tdx.collateral import parse_qe_identity, parse_tcb_info, split_signed_json

from .test_tdx_helpers import COLLATERAL_DIR, quote_bytes, when

V5 = "tdx/go-tdx-guest--quote_v5_sample.dat"
AT_V5 = "2026-02-03T00:00:00Z"


@pytest.fixture()
def v5(expected: dict) -> tuple[bytes, dict]:
    entry = next(e for e in expected["tdx"] if e["quote"] == V5)
    return quote_bytes(entry), entry


def _files(name: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (COLLATERAL_DIR / name).iterdir()}


def test_every_collateral_set_loads() -> None:
    seen = 0
    for directory in sorted(COLLATERAL_DIR.iterdir()):
        for tcb in directory.glob("tcb_info_*[0-9a-f].json"):
            fmspc = tcb.name[len("tcb_info_") : -len(".json")]
            c = load_collateral_dir(directory, fmspc)
            assert c.fmspc == fmspc
            assert c.tcb_info.id == "TDX" and c.tcb_info.version == 3
            assert c.qe_identity.id == "TD_QE" and c.qe_identity.version == 2
            raw = tcb.read_bytes()
            # the signed bytes are a verbatim slice of the file, never a re-serialization
            assert raw.index(c.tcb_info.raw_body) == len(b'{"tcbInfo":')
            assert json.loads(c.tcb_info.raw_body) == json.loads(raw)["tcbInfo"]
            seen += 1
    assert seen == 4


def test_directory_with_two_fmspcs_needs_a_choice() -> None:
    with pytest.raises(CollateralError, match="exactly one"):
        load_collateral_dir(COLLATERAL_DIR / "pcs-2026-01")
    with pytest.raises(CollateralError):
        load_collateral_dir(COLLATERAL_DIR / "pcs-2026-01", "aabbccddeeff")
    with pytest.raises(CollateralError):
        load_collateral_dir(COLLATERAL_DIR / "no-such-set")


def test_files_round_trip_exactly() -> None:
    c = load_collateral_dir(COLLATERAL_DIR / "pcs-2026-02")
    files = collateral_to_files(c)
    assert files == _files("pcs-2026-02")
    again = collateral_from_files(files)
    assert again == c
    missing = dict(files)
    del missing["qe_identity.json"]
    with pytest.raises(CollateralError, match="qe_identity.json"):
        collateral_from_files(missing)


def test_span_is_exact_with_whitespace_and_order() -> None:
    body = b'{ "id" : "TDX",\n  "x": [1, 2] }'
    raw = b'  {\n "signature" : "' + b"ab" * 64 + b'" ,\t"tcbInfo" :' + body + b"\n}\n"
    span, parsed, sig = split_signed_json(raw, "tcbInfo", "t")
    assert span == body and parsed == {"id": "TDX", "x": [1, 2]} and sig == b"\xab" * 64
    for bad in (
        raw + b"x",
        raw.replace(b'"signature"', b'"tcbInfo"', 1),  # duplicate top-level key
        b'{"tcbInfo": {}, "signature": "' + b"00" * 63 + b'"}',
        b'{"tcbInfo": {}, "signature": "zz", "extra": 1}',
        b"[]",
        b"\xff\xfe",
    ):
        with pytest.raises(ParseError):
            split_signed_json(bad, "tcbInfo", "t")


def test_expected_tcb_evaluations(expected: dict) -> None:
    evaluated = 0
    for entry in expected["tdx"]:
        te = entry.get("tcb_evaluation")
        if not te:
            continue
        evaluated += 1
        clear_caches()
        collateral = load_collateral_dir(COLLATERAL_DIR.parent.parent / te["collateral"], entry["fmspc"])
        raw = quote_bytes(entry)
        if te["result"].startswith("NO_MATCHING_TCB_LEVEL"):
            with pytest.raises(VerificationError) as info:
                verify_quote(raw, collateral=collateral, at=when(te["at"]))
            last = info.value.checks[-1]
            assert last.name == "tcb_level" and not last.ok
            assert "TCB not supported" in last.detail and "no matching TCB level" in last.detail
        else:
            evidence = verify_quote(raw, collateral=collateral, at=when(te["at"]))
            status = te["result"].split()[0]
            assert evidence.tcb_status == status
            assert evidence.claims["platform_tcb_status"] == "UpToDate"
            assert evidence.claims["tdx_module_id"] == "TDX_01"
            assert evidence.claims["tdx_module_tcb_status"] == "UpToDate"
            assert evidence.claims["qe_tcb_status"] == "UpToDate"
            assert evidence.advisory_ids == []
            assert evidence.collateral_issued_at == min(
                collateral.tcb_info.issue_date, collateral.qe_identity.issue_date,
                *(collateral.pck_crl(ca).last_update_utc for ca in ("platform", "processor") if collateral.pck_crl(ca))
            )
            names = [c.name for c in evidence.checks]
            for check in (
                "tcb_info_signature",
                "qe_identity_signature",
                "tcb_info_validity",
                "root_ca_crl",
                "pck_chain",
                "pck_crl",
                "fmspc",
                "pceid",
                "tdx_module",
                "qe_report_signature",
                "qe_report_binding",
                "qe_identity",
                "quote_signature",
                "tcb_level",
            ):
                assert check in names
    assert evaluated == 3


def test_debug_td_is_evaluated_not_refused(expected: dict) -> None:
    entry = next(e for e in expected["tdx"] if e["quote"] == "tdx/trustee--tdx_quote_4.dat")
    c = load_collateral_dir(COLLATERAL_DIR / "pcs-2023-06")
    evidence = verify_quote(quote_bytes(entry), collateral=c, at=when("2023-07-01T00:00:00Z"))
    assert evidence.claims["debug"] is True
    assert evidence.tcb_status == "UpToDate"


def test_one_byte_changed_inside_signed_tcb_info_is_refused(v5) -> None:
    raw, _ = v5
    files = _files("pcs-2026-02")
    name = "tcb_info_90c06f000000.json"
    original = files[name]
    body = load_collateral_dir(COLLATERAL_DIR / "pcs-2026-02").tcb_info.raw_body
    start = original.index(body)
    refused = 0
    # change digits and letters inside the signed span; results stay valid JSON far more often than not
    positions = [start + i for i, b in enumerate(body) if chr(b).isalnum()][::5]
    for pos in positions:
        tampered = bytearray(original)
        tampered[pos] = ord("1") if tampered[pos] != ord("1") else ord("2")
        files_t = dict(files, **{name: bytes(tampered)})
        try:
            c = collateral_from_files(files_t)
            verify_quote(raw, collateral=c, at=when(AT_V5))
        except (ParseError, VerificationError) as exc:
            if isinstance(exc, VerificationError):
                assert exc.checks[-1].name == "tcb_info_signature"
            refused += 1
    assert refused == len(positions) > 500


def test_changed_qe_identity_is_refused(v5) -> None:
    raw, _ = v5
    files = _files("pcs-2026-02")
    files["qe_identity.json"] = files["qe_identity.json"].replace(b'"isvsvn":4', b'"isvsvn":3')
    with pytest.raises(VerificationError) as info:
        verify_quote(raw, collateral=collateral_from_files(files), at=when(AT_V5))
    assert info.value.checks[-1].name == "qe_identity_signature"


def test_collateral_after_next_update_or_before_issue_is_refused(v5) -> None:
    raw, _ = v5
    c = load_collateral_dir(COLLATERAL_DIR / "pcs-2026-02")
    stale = c.qe_identity.next_update + timedelta(seconds=1)  # QE identity expires first (2026-02-11)
    with pytest.raises(VerificationError) as info:
        verify_quote(raw, collateral=c, at=stale)
    assert info.value.checks[-1].name == "qe_identity_validity"
    with pytest.raises(VerificationError) as info:
        verify_quote(raw, collateral=c, at=c.tcb_info.next_update + timedelta(seconds=1))
    assert info.value.checks[-1].name in ("tcb_info_validity", "qe_identity_validity")
    with pytest.raises(VerificationError) as info:
        verify_quote(raw, collateral=c, at=c.tcb_info.issue_date - timedelta(seconds=1))
    assert info.value.checks[-1].name == "tcb_info_validity"
    # and the same verification inside the window still passes after those refusals (no cache poisoning)
    assert verify_quote(raw, collateral=c, at=when(AT_V5)).tcb_status == "UpToDate"


def test_expired_pck_crl_is_refused(expected: dict) -> None:
    entry = next(e for e in expected["tdx"] if e["quote"] == "tdx/trustee--tdx_quote_4.dat")
    c = load_collateral_dir(COLLATERAL_DIR / "pcs-2023-06")
    crl_next = c.pck_crl("platform").next_update_utc
    at = when("2023-07-01T00:00:00Z")
    assert verify_quote(quote_bytes(entry), collateral=c, at=at).tcb_status == "UpToDate"
    # in this set the QE identity expires minutes before the PCK CRL, so check the CRL time logic directly
    from attestation.tdx.chain import ChainError, check_crl_time, verify_crl
    from attestation.tdx.quote import parse_quote

    q = parse_quote(quote_bytes(entry))
    vcrl = verify_crl(c.pck_crl("platform"), c.pck_crl_der("platform"), q.sig_data.pck_chain[1], "PCK CRL")
    with pytest.raises(ChainError, match="expired"):
        check_crl_time(vcrl, crl_next + timedelta(seconds=1), "PCK CRL")
    with pytest.raises(ChainError, match="issued by"):
        verify_crl(c.pck_crl("platform"), c.pck_crl_der("platform"), q.sig_data.pck_chain[2], "PCK CRL")


def test_revoked_or_tampered_crl_entries_are_refused(expected: dict) -> None:
    from dataclasses import replace

    from attestation.tdx.chain import ChainError, check_not_revoked, verify_crl
    from attestation.tdx.quote import parse_quote

    entry = next(e for e in expected["tdx"] if e["quote"] == V5)
    q = parse_quote(quote_bytes(entry))
    c = load_collateral_dir(COLLATERAL_DIR / "pcs-2026-02")
    der = c.pck_crl_der("platform")
    vcrl = verify_crl(c.pck_crl("platform"), der, q.sig_data.pck_chain[1], "PCK CRL")
    assert len(vcrl.revoked_serials) > 10
    check_not_revoked(vcrl, q.pck_leaf, "PCK CRL")
    revoked = replace(vcrl, revoked_serials=vcrl.revoked_serials | {q.pck_leaf.serial_number})
    with pytest.raises(ChainError, match="revoked"):
        check_not_revoked(revoked, q.pck_leaf, "PCK CRL")
    # one byte changed inside the signed tbsCertList: the signature no longer verifies
    some_serial = next(iter(vcrl.revoked_serials)).to_bytes(20, "big").lstrip(b"\x00")
    at = der.index(some_serial)
    tampered = der[:at] + bytes([der[at] ^ 1]) + der[at + 1 :]
    from cryptography import x509

    with pytest.raises(ChainError, match="signature"):
        verify_crl(x509.load_der_x509_crl(tampered), tampered, q.sig_data.pck_chain[1], "PCK CRL")


def test_missing_crls_with_check_crl(v5) -> None:
    raw, _ = v5
    files = _files("pcs-2026-02")
    for name in ("pck_crl_platform.crl", "root_ca.crl"):
        partial = {k: v for k, v in files.items() if k != name}
        c = collateral_from_files(partial)
        with pytest.raises(CollateralError):
            verify_quote(raw, collateral=c, at=when(AT_V5))
        assert verify_quote(raw, collateral=c, at=when(AT_V5), check_crl=False).tcb_status == "UpToDate"


def test_collateral_for_another_platform_is_refused(expected: dict) -> None:
    entry = next(e for e in expected["tdx"] if e["quote"] == "tdx/trustee--tdx_quote_6.dat")
    c = load_collateral_dir(COLLATERAL_DIR / "pcs-2026-01", "90c06f000000")
    with pytest.raises(VerificationError) as info:
        verify_quote(quote_bytes(entry), collateral=c, at=when("2026-01-20T00:00:00Z"))
    assert info.value.checks[-1].name == "fmspc"


_TCB_RAW = (COLLATERAL_DIR / "pcs-2026-02" / "tcb_info_90c06f000000.json").read_bytes()
_QE_RAW = (COLLATERAL_DIR / "pcs-2026-02" / "qe_identity.json").read_bytes()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_collateral_json_parsers_give_a_result_or_a_typed_error(data: st.DataObject) -> None:
    raw = bytearray(data.draw(st.sampled_from([_TCB_RAW, _QE_RAW])))
    for _ in range(data.draw(st.integers(0, 3))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    for parser in (parse_tcb_info, parse_qe_identity):
        try:
            parser(bytes(raw))
        except AttestationError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_random_json_gives_a_result_or_a_typed_error(raw: bytes) -> None:
    for parser in (parse_tcb_info, parse_qe_identity):
        try:
            parser(raw)
        except AttestationError:
            pass


@settings(max_examples=100, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=20,
    )
)
def test_structured_json_gives_a_result_or_a_typed_error(body) -> None:
    raw = json.dumps({"tcbInfo": body, "signature": "00" * 64}).encode()
    try:
        parse_tcb_info(raw)
    except AttestationError:
        pass
    raw = json.dumps({"enclaveIdentity": body, "signature": "00" * 64}).encode()
    try:
        parse_qe_identity(raw)
    except AttestationError:
        pass


_SET_FILES = {p.name: p.read_bytes() for p in (COLLATERAL_DIR / "pcs-2026-02").iterdir()}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_collateral_files_give_a_result_or_a_typed_error(data: st.DataObject) -> None:
    files = dict(_SET_FILES)
    name = data.draw(st.sampled_from(sorted(files)))
    raw = bytearray(files[name])
    for _ in range(data.draw(st.integers(0, 3))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    files[name] = bytes(raw[: data.draw(st.integers(0, len(raw)))])
    if data.draw(st.booleans()):
        del files[data.draw(st.sampled_from(sorted(files)))]
    try:
        c = collateral_from_files(files)
    except AttestationError:
        return
    # whatever parsed must still verify or be refused with a typed error
    try:
        verify_quote((COLLATERAL_DIR.parent / "go-tdx-guest--quote_v5_sample.dat").read_bytes(), collateral=c, at=when(AT_V5))
    except AttestationError:
        pass


def test_collateral_age_counts_the_pck_crl(v5) -> None:
    # Each Intel object is signed on its own: a host can pair the newest TCB info and QE identity with a PCK
    # CRL from before a revocation. max_collateral_age_days must see the CRL's age too.
    from datetime import datetime, timezone

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    files = _files("pcs-2026-02")
    fresh = collateral_from_files(files, "90c06f000000")
    assert fresh.issued_at == fresh.pck_crl("platform").last_update_utc  # 2026-01-12 15:52, the oldest here
    key = ec.generate_private_key(ec.SECP256R1())
    old = (x509.CertificateRevocationListBuilder().issuer_name(fresh.pck_crl("platform").issuer)
           .last_update(datetime(2025, 12, 1, tzinfo=timezone.utc)).next_update(datetime(2026, 3, 1, tzinfo=timezone.utc))
           .sign(key, hashes.SHA256()))
    from cryptography.hazmat.primitives.serialization import Encoding

    mixed = collateral_from_files({**files, "pck_crl_platform.crl": old.public_bytes(Encoding.DER)}, "90c06f000000")
    assert mixed.issued_at == datetime(2025, 12, 1, tzinfo=timezone.utc)
