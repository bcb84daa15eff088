"""The host's verify service: TDX evidence carrying only the CC event log still needs Intel collateral."""

from __future__ import annotations

from attestation.evidence import TDX_CCEL_FILE, Evidence
from host.verify_service import _self_contained
from tests.attestation.test_eventlog import COS_LOG, COS_QUOTE


def test_a_ccel_alone_does_not_make_tdx_evidence_self_contained(vectors_dir):
    quote = (vectors_dir / COS_QUOTE).read_bytes()
    log = (vectors_dir / COS_LOG).read_bytes()[:18101]
    assert not _self_contained(Evidence(platform="tdx", report=quote, collateral={TDX_CCEL_FILE: log}))
    assert _self_contained(Evidence(platform="tdx", report=quote,
                                    collateral={TDX_CCEL_FILE: log, "qe_identity.json": b"{}"}))
