"""Cross-check against the peer verifier dcap-qvl on the same quotes, collateral bytes and times.

Outcomes are compared by class: the same TCB status (and advisory IDs) when both accept; "tcb_level" when
no TCB level matches; "time" for anything outside a validity window (certificates, collateral, CRLs).
dcap-qvl also applies policy inside verification (debug TDs, SEPT_VE_DISABLE, MRSERVICETD); we leave that to
the policy step, so there we must accept and the claims must show the reason dcap-qvl refused.
"""

from __future__ import annotations

import dcap_qvl
import pytest

from attestation.errors import AttestationError
from attestation.tdx import clear_caches, load_collateral_dir, verify_quote

from .test_tdx_helpers import COLLATERAL_DIR, quote_bytes, to_dcap_qvl, when

TIMES = [
    "2023-06-20T00:00:00Z",
    "2023-07-01T00:00:00Z",
    "2023-07-09T00:00:00Z",
    "2026-01-20T00:00:00Z",
    "2026-02-03T00:00:00Z",
    "2026-02-12T00:00:00Z",
]
_TIME_WORDS = ("not valid at", "expired", "issued after", "issued ")
_POLICY_REASONS = {
    "Debug mode is enabled": lambda claims: claims["debug"] is True,
    "SEPT_VE_DISABLE is not enabled": lambda claims: claims["sept_ve_disable"] is False,
    "Invalid mr service td": lambda claims: int(claims.get("mrservicetd", "0") or "0", 16) != 0,
}


def _ours(raw: bytes, collateral, at):
    try:
        evidence = verify_quote(raw, collateral=collateral, at=at)
    except AttestationError as exc:
        checks = getattr(exc, "checks", [])
        last = checks[-1] if checks else None
        if last is not None and last.name == "tcb_level":
            return ("tcb_level",), None
        if last is not None and (last.name.endswith("_validity") or any(w in last.detail for w in _TIME_WORDS)):
            return ("time",), None
        return ("error", type(exc).__name__, str(exc)), None
    return ("ok", evidence.tcb_status, tuple(evidence.advisory_ids)), evidence.claims


def _theirs(raw: bytes, collateral, at):
    try:
        report = dcap_qvl.verify(raw, to_dcap_qvl(collateral), int(at.timestamp()))
    except ValueError as exc:
        text = str(exc)
        if "No matching TCB level" in text:
            return ("tcb_level",)
        if any(w in text for w in ("expired", "Expired", "in the future", "NotValidYet", "CertExpired")):
            return ("time",)
        for reason in _POLICY_REASONS:
            if reason in text:
                return ("policy", reason)
        return ("error", text)
    return ("ok", report.status, tuple(report.advisory_ids))


def _cases(expected: dict):
    for entry in expected["tdx"]:
        for directory in sorted(COLLATERAL_DIR.iterdir()):
            if (directory / f"tcb_info_{entry['fmspc']}.json").exists():
                yield entry, directory


def test_same_outcome_as_dcap_qvl(expected: dict) -> None:
    compared = 0
    accepted = 0
    for entry, directory in _cases(expected):
        raw = quote_bytes(entry)
        collateral = load_collateral_dir(directory, entry["fmspc"])
        for text in TIMES:
            at = when(text)
            clear_caches()
            ours, claims = _ours(raw, collateral, at)
            theirs = _theirs(raw, collateral, at)
            where = f"{entry['quote']} + {directory.name} at {text}"
            if theirs[0] == "policy":
                assert ours[0] == "ok", where
                assert _POLICY_REASONS[theirs[1]](claims), where
            else:
                assert ours == theirs, where
            accepted += ours[0] == "ok"
            compared += 1
    assert compared >= 40
    assert accepted >= 5


@pytest.mark.parametrize("flip_at", [100, 700, 2000])
def test_both_refuse_a_tampered_quote(expected: dict, flip_at: int) -> None:
    entry = next(e for e in expected["tdx"] if e["quote"].endswith("quote_v5_sample.dat"))
    raw = bytearray(quote_bytes(entry))
    raw[flip_at] ^= 0x10
    collateral = load_collateral_dir(COLLATERAL_DIR / "pcs-2026-02")
    at = when("2026-02-03T00:00:00Z")
    assert _ours(bytes(raw), collateral, at)[0][0] == "error"
    assert _theirs(bytes(raw), collateral, at)[0] == "error"
