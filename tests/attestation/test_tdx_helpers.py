"""Shared helpers for the TDX tests (vector access, quote surgery, dcap-qvl collateral), plus their own tests."""

from __future__ import annotations

import struct
from datetime import datetime
from pathlib import Path

import dcap_qvl

from attestation.tdx import parse_quote
from attestation.tdx.collateral import Collateral, qvl_collateral_fields
from attestation.tdx.quote import HEADER_SIZE

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors"
TDX_DIR = VECTORS / "tdx"
COLLATERAL_DIR = TDX_DIR / "collateral"


def quote_bytes(entry: dict) -> bytes:
    return (VECTORS / entry["quote"]).read_bytes()


def sig_offsets(raw: bytes) -> dict[str, int]:
    """Absolute offsets of the parts of a quote's signature data."""
    version = struct.unpack_from("<H", raw, 0)[0]
    if version == 4:
        signed = HEADER_SIZE + 584
    else:
        signed = HEADER_SIZE + 6 + struct.unpack_from("<I", raw, HEADER_SIZE + 2)[0]
    sd = signed + 4
    cd = sd + 134
    auth_len = struct.unpack_from("<H", raw, cd + 384 + 64)[0]
    return {
        "signed_length": signed,
        "signature": sd,
        "attestation_key": sd + 64,
        "qe_report": cd,
        "qe_report_signature": cd + 384,
        "qe_auth_data": cd + 384 + 64 + 2,
        "qe_auth_len": auth_len,
        "pck_chain": cd + 384 + 64 + 2 + auth_len + 6,
    }


def with_pck_chain(raw: bytes, pem: bytes) -> bytes:
    """The same quote with its PCK PEM chain replaced, every enclosing length fixed up."""
    q = parse_quote(raw)
    off = sig_offsets(raw)
    inner_hdr = off["pck_chain"] - 6
    sig_len_at = off["signature"] - 4
    old_sig_len = struct.unpack_from("<I", raw, sig_len_at)[0]
    end = off["signature"] + old_sig_len
    head = bytearray(raw[:inner_hdr])
    new_sd_len = old_sig_len - (end - off["pck_chain"]) + len(pem)
    struct.pack_into("<I", head, sig_len_at, new_sd_len)
    struct.pack_into("<I", head, off["signature"] + 130, new_sd_len - 134)
    out = bytes(head) + struct.pack("<HI", 5, len(pem)) + pem
    assert q.trailing_bytes >= 0
    return out


def pem_of(raw: bytes) -> bytes:
    return parse_quote(raw).sig_data.pck_chain_pem


def when(text: str) -> datetime:
    """expected.json times ("2023-04-03 19:23:43+00:00" or "2023-07-01T00:00:00Z") as aware datetimes."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def to_dcap_qvl(c: Collateral, ca: str = "platform") -> "dcap_qvl.QuoteCollateralV3":
    """Our collateral as dcap-qvl's QuoteCollateralV3 (same signed bytes, same chains, same CRLs)."""
    return dcap_qvl.QuoteCollateralV3(**qvl_collateral_fields(c, ca))


def collateral_path(entry: dict) -> Path:
    return VECTORS / entry["tcb_evaluation"]["collateral"]


def test_with_pck_chain_round_trips(expected: dict) -> None:
    for entry in expected["tdx"]:
        raw = quote_bytes(entry)
        q = parse_quote(raw)
        rebuilt = with_pck_chain(raw, q.sig_data.pck_chain_pem)
        assert parse_quote(rebuilt).sig_data == q.sig_data
        assert rebuilt[: q.signed_length] == raw[: q.signed_length]
