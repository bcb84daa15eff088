"""The join binding and the default join policy ("a peer exactly like me"), on real SNP/TDX vectors and the sim."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from types import SimpleNamespace

import pytest

from attestation.errors import EvidenceError
from attestation.evidence import Evidence
from attestation.peer import JOIN_LABEL, join_report_data, same_as_me_policy
from attestation.sim import GUEST_POLICY, SIM_MEASUREMENT
from attestation.verifier import verify_evidence


def _failed(verdict) -> set[str]:
    return {c.name for c in verdict.checks if not c.ok}


def _sim_evidence(sim_platform, **report_kw) -> Evidence:
    report, certs = sim_platform.report(bytes(64), **report_kw)
    return Evidence(platform="sim", report=report, certificates=tuple(certs), product=sim_platform.product,
                    collateral={"crl.der": sim_platform.crl()})


def test_join_report_data_is_labelled_and_fixed_length():
    spki, nonce, key = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    assert join_report_data(spki, nonce, key) == hashlib.sha512(JOIN_LABEL + spki + nonce + key).digest()
    assert len({join_report_data(spki, nonce, key), join_report_data(nonce, spki, key),
                join_report_data(spki, key, nonce)}) == 3
    for bad in (b"", b"\x01" * 31, b"\x01" * 33, "x" * 32):
        with pytest.raises(ValueError):
            join_report_data(bad, nonce, key)  # type: ignore[arg-type]


def test_sim_peer_like_me_passes_and_each_difference_is_refused(sim_platform):
    own = _sim_evidence(sim_platform)
    policy = same_as_me_policy(own, sim_root_fingerprint=sim_platform.fingerprint)
    assert policy.platforms == ["sim"] and policy.snp.require_crl
    assert verify_evidence(_sim_evidence(sim_platform), policy=policy).ok
    other = hashlib.sha384(b"another image").digest()
    cases = {
        "measurement": _sim_evidence(sim_platform, measurement=other),
        "host_data": _sim_evidence(sim_platform, host_data=b"\x01" * 32),
        "vmpl": _sim_evidence(sim_platform, vmpl=1),
        "debug_disabled": _sim_evidence(sim_platform, policy=GUEST_POLICY | 1 << 19),
        "smt": _sim_evidence(sim_platform, policy=GUEST_POLICY | 1 << 16),
    }
    for check, evidence in cases.items():
        verdict = verify_evidence(evidence, policy=policy)
        assert not verdict.ok and check in _failed(verdict), (check, verdict.error)


def test_sim_policy_needs_the_root_and_refuses_a_debug_self(sim_platform):
    own = _sim_evidence(sim_platform)
    with pytest.raises(EvidenceError, match="fingerprint"):
        same_as_me_policy(own)
    with pytest.raises(EvidenceError, match="debug guest"):
        same_as_me_policy(_sim_evidence(sim_platform, policy=GUEST_POLICY | 1 << 19),
                          sim_root_fingerprint=sim_platform.fingerprint)
    assert own.report[0x90:0xC0] == SIM_MEASUREMENT


def test_snp_policy_from_a_real_report_pins_its_launch(snp_vector):
    evidence, entry, at = snp_vector("virtee-sev--report_milan.hex")
    policy = same_as_me_policy(evidence)
    assert policy.platforms == ["snp"]
    assert [m.measurement for m in policy.snp.measurements] == [entry["measurement"]]
    assert not policy.snp.require_crl          # the vector carries no CRL: neither must a peer
    verdict = verify_evidence(evidence, policy=policy, at=at)
    assert verdict.ok, verdict.error
    flipped = bytearray(evidence.report)
    flipped[0x90] ^= 1                        # one bit of the measurement: the signature fails first
    assert not verify_evidence(dataclasses.replace(evidence, report=bytes(flipped)), policy=policy, at=at).ok


def test_snp_policy_refuses_a_debug_report(snp_vector):
    evidence, _, _ = snp_vector("go-sev-guest--attestation.bin")   # a debug guest's report
    assert struct.unpack_from("<Q", evidence.report, 8)[0] & 1 << 19
    with pytest.raises(EvidenceError, match="debug"):
        same_as_me_policy(evidence)


def test_tdx_policy_from_a_real_quote_pins_mrtd_rtmrs_and_config(tdx_vector):
    evidence, entry, at = tdx_vector("go-tdx-guest--quote_v5_sample.dat", "pcs-2026-02")
    policy = same_as_me_policy(evidence)
    entry_m = policy.tdx.measurements[0]
    assert (entry_m.mrtd, entry_m.rtmr0, entry_m.rtmr1, entry_m.rtmr2) == (
        entry["mrtd"], entry["rtmr0"], entry["rtmr1"], entry["rtmr2"])
    assert policy.tdx.require_collateral and policy.tdx.td_attributes.exact == entry["td_attributes"]
    verdict = verify_evidence(evidence, policy=policy, at=at)
    assert verdict.ok, verdict.error
    bare = dataclasses.replace(evidence, collateral={})
    assert "collateral_present" in _failed(verify_evidence(bare, policy=policy, at=at))
    # evidence carrying only the CC event log (providers that attach it) carries no collateral (duck-typed: this
    # branch's Evidence does not know the event log's file name yet)
    log_only = SimpleNamespace(platform="tdx", report=evidence.report, collateral={"ccel.bin": b"\x00" * 64})
    assert not same_as_me_policy(log_only).tdx.require_collateral  # type: ignore[arg-type]
    from attestation.policy import policy_from_dict

    changed = policy.model_dump()
    changed["tdx"]["measurements"][0]["rtmr1"] = "00" * 48
    changed["tdx"]["mrconfigid"] = "11" * 48
    assert {"measurement", "mrconfigid"} <= _failed(verify_evidence(evidence, policy=policy_from_dict(changed), at=at))
