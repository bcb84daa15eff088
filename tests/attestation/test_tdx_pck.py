"""PCK SGX extension parsing (against expected.json and dcap-qvl) and PCK chain rules."""

from __future__ import annotations

import urllib.parse

import dcap_qvl
import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.errors import AttestationError, ParseError
from attestation.tdx import parse_quote
from attestation.tdx.chain import ChainError, verify_chain_structure
from attestation.tdx.pck import SGX_EXTENSION_OID, parse_pck_extension, pck_ca_kind, verify_pck_chain_structure
from attestation.tdx.trust import TCB_SIGNING_CN

from .test_tdx_helpers import COLLATERAL_DIR, quote_bytes


def _raw_extension(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSION_OID)).value.value


def test_extension_of_every_vector(expected: dict) -> None:
    for entry in expected["tdx"]:
        q = parse_quote(quote_bytes(entry))
        ext = q.pck_extension
        assert ext.fmspc.hex() == entry["fmspc"]
        assert ext.pceid.hex() == entry["pceid"]
        assert ext.pcesvn == entry["pcesvn"]
        assert ext.cpusvn.hex() == entry["cpusvn"]
        assert ext.sgx_type == entry["sgx_type"]
        assert len(ext.tcb_components) == 16
        peer = dcap_qvl.parse_pck_extension_from_pem(q.sig_data.pck_chain_pem)
        assert (ext.ppid, ext.cpusvn, ext.pcesvn, ext.pceid, ext.fmspc, ext.sgx_type) == (
            peer.ppid, peer.cpu_svn, peer.pce_svn, peer.pce_id, peer.fmspc, peer.sgx_type
        )
        assert ext.platform_instance_id == peer.platform_instance_id
        assert pck_ca_kind(q.sig_data.pck_chain) == "platform"


def test_platform_ca_configuration_is_read(expected: dict) -> None:
    entry = next(e for e in expected["tdx"] if e["sgx_type"] == 2)
    ext = parse_quote(quote_bytes(entry)).pck_extension
    assert ext.platform_instance_id is not None and len(ext.platform_instance_id) == 16
    assert (ext.dynamic_platform, ext.cached_keys, ext.smt_enabled) == (True, False, True)


def test_der_strictness(expected: dict) -> None:
    raw = _raw_extension(parse_quote(quote_bytes(expected["tdx"][0])).pck_leaf)
    assert raw[:2] == b"\x30\x82"
    parse_pck_extension(raw)
    with pytest.raises(ParseError, match="trailing"):
        parse_pck_extension(raw + b"\x00")
    with pytest.raises(ParseError):
        parse_pck_extension(raw[:-1])
    # long-form length where short form is required
    with pytest.raises(ParseError, match="non-minimal"):
        parse_pck_extension(b"\x30\x81\x03\x02\x01\x00")
    # indefinite length
    with pytest.raises(ParseError):
        parse_pck_extension(b"\x30\x80\x00\x00")
    # duplicate entry: the PPID twice
    body = raw[4:]
    first_len = body[1] + 2
    doubled = body[:first_len] + body
    with pytest.raises(ParseError, match="duplicate"):
        parse_pck_extension(b"\x30\x82" + len(doubled).to_bytes(2, "big") + doubled)
    # FMSPC missing
    fm = bytes.fromhex("060a2a864886f84d010d0104")
    at = body.index(fm) - 2
    without = body[:at] + body[at + body[at + 1] + 2 :]
    with pytest.raises(ParseError, match="FMSPC"):
        parse_pck_extension(b"\x30\x82" + len(without).to_bytes(2, "big") + without)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_extension_parser_gives_a_result_or_a_typed_error(expected: dict, data: st.DataObject) -> None:
    entry = data.draw(st.sampled_from(expected["tdx"]))
    raw = bytearray(_raw_extension(parse_quote(quote_bytes(entry)).pck_leaf))
    for _ in range(data.draw(st.integers(0, 3))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        parse_pck_extension(bytes(raw))
    except AttestationError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_der_gives_a_result_or_a_typed_error(raw: bytes) -> None:
    try:
        parse_pck_extension(raw)
    except AttestationError:
        pass


def test_chain_rules(expected: dict) -> None:
    q = parse_quote(quote_bytes(expected["tdx"][1]))
    leaf, ca, root = q.sig_data.pck_chain
    verify_pck_chain_structure((leaf, ca, root))
    with pytest.raises(ChainError, match="3 certificates"):
        verify_pck_chain_structure((leaf, root))
    with pytest.raises(ChainError):
        verify_pck_chain_structure((ca, ca, root))  # a CA as leaf: wrong CN
    with pytest.raises(ChainError, match="pinned"):
        verify_pck_chain_structure((leaf, ca, ca))
    tcb_chain = x509.load_pem_x509_certificates(
        urllib.parse.unquote((COLLATERAL_DIR / "pcs-2026-02" / "qe_identity_chain.txt").read_text()).encode()
    )
    signing, root2 = tcb_chain
    verify_chain_structure((signing, root2), leaf_cns=(TCB_SIGNING_CN,))
    with pytest.raises(ChainError, match="CN"):
        verify_chain_structure((signing, root2), leaf_cns=("Intel SGX PCK Certificate",))
    with pytest.raises(ChainError, match="intermediate CN"):
        verify_pck_chain_structure((leaf, signing, root))  # signing cert is no PCK CA
