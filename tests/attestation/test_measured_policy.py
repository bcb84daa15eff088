"""What "measured" means (item 8): the whole boot chain pinned, checked by the attested client before any
connection. Real values from ../shared/vectors; the shipped production examples refuse to load until their
placeholders are replaced."""

from __future__ import annotations

from pathlib import Path

import pytest

from attestation.atls.client import require_measured_policy
from attestation.errors import PolicyError
from attestation.policy import DEFAULT_POLICY, load_policy, policy_from_yaml
from attestation.verifier import verify_evidence

POLICIES = Path(__file__).resolve().parents[2] / "config" / "policies"
V5 = "go-tdx-guest--quote_v5_sample.dat"


def _tdx_entry(entry: dict, *rtmrs: str) -> str:
    fields = [f"mrtd: '{entry['mrtd']}'"] + [f"{r}: '{entry[r]}'" for r in rtmrs]
    return "platforms: [tdx]\ntdx:\n  measurements:\n    - {" + ", ".join(fields) + "}\n"


def test_mrtd_only_entry_of_a_real_quote_is_refused_by_the_client_check(tdx_vector):
    evidence, entry, at = tdx_vector(V5, "pcs-2026-02")
    mrtd_only = policy_from_yaml(_tdx_entry(entry))
    # the quote passes such a policy (MRTD is firmware only: any kernel/initrd/cmdline would too) ...
    assert verify_evidence(evidence, policy=mrtd_only, at=at).ok
    # ... so a client that sends credentials refuses it before connecting
    assert not mrtd_only.is_measured("tdx")
    with pytest.raises(PolicyError, match=r"tdx: .*MRTD and RTMR0-2.*0 \(no RTMR0, RTMR1, RTMR2\)"):
        require_measured_policy(mrtd_only)
    for partial in (("rtmr0",), ("rtmr0", "rtmr1"), ("rtmr1", "rtmr2")):
        with pytest.raises(PolicyError, match="RTMR"):
            require_measured_policy(policy_from_yaml(_tdx_entry(entry, *partial)))


def test_whole_tdx_boot_chain_is_measured_and_accepts_the_quote(tdx_vector):
    evidence, entry, at = tdx_vector(V5, "pcs-2026-02")
    full = policy_from_yaml(_tdx_entry(entry, "rtmr0", "rtmr1", "rtmr2"))
    require_measured_policy(full)
    assert full.is_measured("tdx") and full.measurement_gaps() == {}
    assert verify_evidence(evidence, policy=full, at=at).ok
    # one measured and one MRTD-only entry: the weakest entry decides
    mixed = policy_from_yaml(_tdx_entry(entry, "rtmr0", "rtmr1", "rtmr2")
                             + f"    - {{mrtd: '{entry['mrtd']}'}}\n")
    with pytest.raises(PolicyError, match=r"entries must pin MRTD and RTMR0-2 .*: 1 \("):
        require_measured_policy(mixed)


def test_snp_digest_counts_as_measured_only_with_kernel_hashes(snp_vector):
    evidence, entry, at = snp_vector("virtee-sev--report_milan.hex")
    digest = entry["measurement"]
    bare = policy_from_yaml(f"platforms: [snp]\nsnp:\n  allow_smt: true\n  measurements: ['{digest}']\n")
    assert bare.snp.measurements[0].kernel_hashes is False
    assert verify_evidence(evidence, policy=bare, at=at).ok
    with pytest.raises(PolicyError, match="snp: snp.measurements entry 0 lacks kernel_hashes: true"):
        require_measured_policy(bare)
    explicit_off = policy_from_yaml(
        f"platforms: [snp]\nsnp:\n  measurements: [{{measurement: '{digest}', kernel_hashes: false}}]\n")
    assert not explicit_off.is_measured("snp")
    measured = policy_from_yaml(
        f"platforms: [snp]\nsnp:\n  allow_smt: true\n  measurements: [{{measurement: '{digest}', kernel_hashes: true}}]\n")
    require_measured_policy(measured)
    verdict = verify_evidence(evidence, policy=measured, at=at)
    assert verdict.ok and "with kernel hashes" in next(c.detail for c in verdict.checks if c.name == "measurement")


def test_every_allowed_platform_must_be_measured_and_allow_unmeasured_opts_out(tdx_vector):
    _, entry, _ = tdx_vector(V5)
    both = policy_from_yaml(_tdx_entry(entry, "rtmr0", "rtmr1", "rtmr2").replace("platforms: [tdx]", "platforms: [snp, tdx]"))
    assert both.measurement_gaps() == {"snp": "no measurement allowlist"}
    with pytest.raises(PolicyError, match="snp: no measurement allowlist"):
        require_measured_policy(both)
    require_measured_policy(both.model_copy(update={"allow_unmeasured": True}))
    assert set(DEFAULT_POLICY.measurement_gaps()) == {"snp", "tdx"}
    assert not DEFAULT_POLICY.is_measured("snp") and not DEFAULT_POLICY.is_measured(None)


def _filled(path: Path, values: dict[str, str]) -> str:
    text = path.read_text()
    for placeholder, value in values.items():
        assert placeholder in text, placeholder
        text = text.replace(placeholder, value)
    assert "\"REPLACE" not in text
    return text


def test_production_examples_refuse_to_load_until_filled_in(tdx_vector, snp_vector):
    for name, key in (("tdx-production.yaml", "tdx.measurements.0.mrtd"),
                      ("snp-production.yaml", "snp.measurements.0.measurement")):
        with pytest.raises(PolicyError, match=rf"{name}.*{key}: is a placeholder"):
            load_policy(POLICIES / name)

    evidence, entry, at = tdx_vector(V5, "pcs-2026-02")
    tdx = policy_from_yaml(_filled(POLICIES / "tdx-production.yaml", {
        f"REPLACE-with-your-TD-{k.upper()}": entry[k] for k in ("mrtd", "rtmr0", "rtmr1", "rtmr2")}))
    require_measured_policy(tdx)
    assert tdx.tdx.require_collateral and tdx.name == "tdx-production"
    assert verify_evidence(evidence, policy=tdx, at=at).ok

    evidence, entry, at = snp_vector("virtee-sev--report_milan.hex")
    snp = policy_from_yaml(_filled(POLICIES / "snp-production.yaml",
                                   {"REPLACE-with-your-launch-digest": entry["measurement"]}))
    require_measured_policy(snp)
    assert snp.snp.vmpl == 0
    # the example requires AMD's CRL, which no vector carries: refused for that alone, and only for that
    refused = verify_evidence(evidence, policy=snp, at=at)
    assert not refused.ok and refused.status == "collateral_unavailable" and "CRL" in refused.error
    without_crl = snp.model_copy(update={"snp": snp.snp.model_copy(update={"require_crl": False})})
    assert verify_evidence(evidence, policy=without_crl, at=at).ok, "the example's other rules accept a current Milan report"


def test_attested_clients_refuse_an_mrtd_only_policy_before_any_connection(tdx_vector):
    from attestation.atls.client import AsyncAttestedClient, AttestedClient

    _, entry, _ = tdx_vector(V5)
    mrtd_only = policy_from_yaml(_tdx_entry(entry))
    for client in (AttestedClient, AsyncAttestedClient):
        with pytest.raises(PolicyError, match="does not pin the whole boot chain"):
            client("https://127.0.0.1:9", policy=mrtd_only)  # port 9 (discard): nothing is ever dialled


def test_simulated_evidence_is_never_measured_whatever_the_policy_pins(sim_platform):
    # The sim root's key is a file: whoever reads it signs any report, with the pinned "launch digest", for any
    # key. A policy allowing sim must say allow_unmeasured, and nothing (client, EAR) may count it as measured.
    from attestation.atls.client import require_measured_policy
    from attestation.errors import PolicyError
    from attestation.policy import sim_policy_yaml
    from attestation.sim import SIM_MEASUREMENT
    from host.ear import WARNING, ear_status
    from attestation.verifier import verify_evidence

    pinned = f"snp:\n  measurements: [{{measurement: '{SIM_MEASUREMENT.hex()}', kernel_hashes: true}}]\n"
    policy = policy_from_yaml(f"platforms: [sim]\nsim_root_fingerprint: '{sim_platform.fingerprint}'\n" + pinned)
    assert "sim" in policy.measurement_gaps() and not policy.is_measured("sim")
    with pytest.raises(PolicyError, match="simulated evidence"):
        require_measured_policy(policy)
    dev = policy_from_yaml(sim_policy_yaml(sim_platform.fingerprint))  # what `./dev serve` writes
    assert dev.allow_unmeasured
    require_measured_policy(dev)
    from attestation.evidence import SNP_CRL_FILE, Evidence

    report, certs = sim_platform.report(bytes(64))
    evidence = Evidence("sim", report, tuple(certs), product="Sim", collateral={SNP_CRL_FILE: sim_platform.crl()})
    verdict = verify_evidence(evidence, policy=policy)
    assert verdict.ok, verdict.error
    assert ear_status(verdict, policy) == WARNING


def test_an_all_zero_rtmr_pins_nothing(tdx_vector):
    # All zeros is an RTMR's reset value: a TD whose firmware measured no kernel (or command line) shows it, so
    # pinning it accepts any kernel booted that way; it must not make the policy measured.
    _, entry, _ = tdx_vector(V5, "pcs-2026-02")
    zero = "00" * 48
    policy = policy_from_yaml(
        f"platforms: [tdx]\ntdx:\n  measurements:\n    - {{mrtd: '{entry['mrtd']}', rtmr0: '{entry['rtmr0']}', "
        f"rtmr1: '{zero}', rtmr2: '{zero}'}}\n")
    assert not policy.is_measured("tdx")
    with pytest.raises(PolicyError, match=r"all-zero .*: 0 \(no RTMR1, RTMR2\)"):
        require_measured_policy(policy)
