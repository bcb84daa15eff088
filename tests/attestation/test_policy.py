"""Policies: strict YAML, errors that name the key, shipped examples."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation.errors import PolicyError
from attestation.policy import DEFAULT_POLICY, Policy, load_policy, policy_from_yaml, sim_policy_yaml

POLICIES = Path(__file__).resolve().parents[2] / "config" / "policies"
FP = "ab" * 32


def test_example_policies_load():
    names = sorted(p.name for p in POLICIES.glob("*.yaml"))
    assert {"evidence-only.yaml", "snp-production.yaml", "tdx-production.yaml", "sim-development.yaml"} <= set(names)
    for path in POLICIES.glob("*.yaml"):
        if "production" in path.name:  # placeholders: test_measured_policy fills them in
            with pytest.raises(PolicyError, match="placeholder"):
                load_policy(path)
        elif path.name != "sim-development.yaml":   # no fingerprint: see test_sim_example_holds_no_placeholder...
            assert isinstance(load_policy(path), Policy)


def test_sim_example_holds_no_placeholder_and_names_the_command_for_its_directory(tmp_path):
    """The shipped sim policy has no fingerprint a user could take for a value: loading it says what to run,
    for the directory `cube-enclave serve --simulate` really uses (<data_dir>/sim)."""
    text = (POLICIES / "sim-development.yaml").read_text()
    assert "sim_root_fingerprint:" not in text.split("name:", 1)[1] and "0" * 64 not in text
    assert "cube-attest sim-fingerprint --dir ~/.local/share/cube-ai/enclave/sim" in text
    with pytest.raises(PolicyError, match=r"sim-policy\.yaml.*sim-fingerprint --dir <data_dir>/sim"):
        load_policy(POLICIES / "sim-development.yaml")
    filled = tmp_path / "p.yaml"
    filled.write_text(text + f'sim_root_fingerprint: "{FP}"\n')
    policy = load_policy(filled)
    assert policy.platforms == ["sim"] and policy.snp.require_crl and policy.snp.vmpl == 0


def test_evidence_only_example_matches_default():
    example = load_policy(POLICIES / "evidence-only.yaml")
    assert example.model_dump(exclude={"name"}) == DEFAULT_POLICY.model_dump(exclude={"name"})


def test_defaults_are_strict_and_default_policy_permissive():
    strict = policy_from_yaml("{}")
    assert strict.platforms == ["snp", "tdx"]
    assert strict.accepted_tcb_statuses == ["UpToDate"]
    assert not strict.snp.allow_debug and not strict.snp.allow_smt and not strict.snp.allow_migrate_ma
    assert strict.tdx.require_sept_ve_disable and not strict.tdx.allow_service_td and not strict.tdx.allow_debug
    assert not DEFAULT_POLICY.snp.allow_debug and not DEFAULT_POLICY.tdx.allow_debug
    assert DEFAULT_POLICY.snp.allow_smt and not DEFAULT_POLICY.tdx.require_sept_ve_disable
    assert "sim" not in DEFAULT_POLICY.platforms


def test_values_normalised():
    p = policy_from_yaml(f"snp:\n  measurements: ['0x{'AB' * 48}']\nreport_data: '{'Cd' * 64}'\n")
    assert [m.measurement for m in p.snp.measurements] == ["ab" * 48]
    assert p.report_data == "cd" * 64


@pytest.mark.parametrize(
    "text, key, why",
    [
        ("platfroms: [snp]\n", "platfroms", "unknown key"),
        ("snp:\n  allow_debugg: true\n", "snp.allow_debugg", "unknown key"),
        ("tdx:\n  measurements:\n    - {mrtd: '00', rtmr9: '00'}\n", "tdx.measurements.0", ""),
        ("snp:\n  measurements: ['abcd']\n", "snp.measurements.0", "96 hex digits"),
        ("snp:\n  measurements: ['" + "zz" * 48 + "']\n", "snp.measurements.0", "hex"),
        ("platforms: [snp, sgx]\n", "platforms.1", ""),
        ("platforms: snp\n", "platforms", "list"),
        ("platforms: []\n", "platforms", "at least 1"),
        ("platforms: [sim]\n", "sim_root_fingerprint", "required"),
        ("platforms: [snp, snp]\n", "platforms", "twice"),
        ("snp:\n  vmpl: 4\n", "snp.vmpl", "less than or equal to 3"),
        ("snp:\n  vmpl: '0'\n", "snp.vmpl", "integer"),
        ("snp:\n  allow_debug: 'yes'\n", "snp.allow_debug", "boolean"),
        ("snp:\n  min_tcb: {microcode: 300}\n", "snp.min_tcb.microcode", "255"),
        ("snp:\n  min_tcb: {ucode: 3}\n", "snp.min_tcb.ucode", "unknown key"),
        ("accepted_tcb_statuses: [Fine]\n", "accepted_tcb_statuses.0", ""),
        ("max_collateral_age_days: -1\n", "max_collateral_age_days", "greater than 0"),
        ("sim_root_fingerprint: 1234\n", "sim_root_fingerprint", "string"),
        ("tdx:\n  min_tee_tcb_svn: '00'\n", "tdx.min_tee_tcb_svn", "32 hex digits"),
        ("snp:\n  signing_keys: [PEK]\n", "snp.signing_keys.0", ""),
        ("report_data: 00\n", "report_data", "string"),
    ],
)
def test_bad_policies_name_the_key(text, key, why):
    with pytest.raises(PolicyError) as info:
        policy_from_yaml(text)
    message = str(info.value)
    assert key in message
    assert why in message


@pytest.mark.parametrize(
    "text, words",
    [
        ("snp: [\n", "not valid YAML"),
        ("- a\n- b\n", "mapping"),
        ("42\n", "mapping"),
        ("name: a\nname: b\n", "name: key given twice"),
        ("snp:\n  vmpl: 0\n  vmpl: 1\n", "vmpl: key given twice"),
        ("!!python/object:os.system {}\n", "not valid YAML"),
    ],
)
def test_broken_yaml(text, words):
    with pytest.raises(PolicyError, match=words):
        policy_from_yaml(text)


def test_load_policy_errors(tmp_path):
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError, match="UTF-8"):
        load_policy(bad)
    bad.write_text("snp:\n  allow_debugg: true\n")
    with pytest.raises(PolicyError, match=r"bad.yaml.*snp.allow_debugg"):
        load_policy(bad)


def test_sim_policy_yaml_round_trips():
    p = policy_from_yaml(sim_policy_yaml(FP))
    assert p.platforms == ["sim"] and p.sim_root_fingerprint == FP and p.snp.vmpl == 0


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_random_text_only_policy_error(text):
    try:
        policy_from_yaml(text)
    except PolicyError:
        pass


def test_revocation_is_required_by_the_examples_and_tdx_collateral_by_default() -> None:
    """Without these the host can drop the CRL / Intel collateral and a revoked or OutOfDate platform passes."""
    def raw(name: str) -> dict:   # the production examples hold placeholders the loader refuses
        return yaml.safe_load((POLICIES / name).read_text())

    assert raw("snp-production.yaml")["snp"]["require_crl"] is True
    assert raw("sim-development.yaml")["snp"]["require_crl"] is True
    assert raw("tdx-production.yaml")["tdx"].get("require_collateral", True) is True
    assert load_policy(POLICIES / "evidence-only.yaml").tdx.require_collateral is True
    assert Policy().tdx.require_collateral is True and DEFAULT_POLICY.tdx.require_collateral is True
