"""The join policy from the configuration: inline, a file, or "same as me"; what is refused outside simulation."""

from __future__ import annotations

from pathlib import Path

import pytest

from attestation.policy import sim_policy_yaml
from enclave.config import ConfigError, load_settings
from enclave.join.policy import join_policy
from enclave.join.protocol import JoinError

from .conftest import make_settings, sim_provider

MEASURED_SNP = {"name": "measured", "platforms": ["snp"],
                "snp": {"measurements": [{"measurement": "ab" * 48, "kernel_hashes": True}]}}


def _own():
    return sim_provider().get_evidence(bytes(64))


def test_default_is_same_as_me(tmp_path: Path):
    policy = join_policy(make_settings(tmp_path), _own(), sim_root_fingerprint=sim_provider().fingerprint)
    assert policy.name == "join: same as this replica" and policy.platforms == ["sim"]
    assert policy.snp.measurements[0].measurement == _own().report[0x90:0xC0].hex()


def test_inline_and_file_policies(tmp_path: Path):
    inline = join_policy(make_settings(tmp_path, join={"policy": MEASURED_SNP}), _own())
    assert inline.name == "measured"
    policy_file = tmp_path / "join-policy.yaml"
    policy_file.write_text(sim_policy_yaml(sim_provider().fingerprint))
    from_file = join_policy(make_settings(tmp_path, simulate=True, join={"policy_file": str(policy_file)}), _own())
    assert from_file.sim_root_fingerprint == sim_provider().fingerprint


def test_one_policy_only_and_bad_policies_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match="not both"):
        make_settings(tmp_path, join={"policy": MEASURED_SNP, "policy_file": "/x.yaml"})
    with pytest.raises(ConfigError, match="join"):
        make_settings(tmp_path, join={"rate_limit": 0})
    with pytest.raises(JoinError, match="join policy: .*unknown key"):
        join_policy(make_settings(tmp_path, join={"policy": {"no_such_key": 1}}), _own())
    with pytest.raises(JoinError, match="cannot read"):
        join_policy(make_settings(tmp_path, join={"policy_file": str(tmp_path / "missing.yaml")}), _own())


def test_outside_simulation_the_sim_and_unmeasured_policies_are_refused(tmp_path: Path):
    sim_only = {"platforms": ["sim"], "sim_root_fingerprint": sim_provider().fingerprint, "allow_unmeasured": True}
    confidential = {"simulate": False, "server_secret": None}   # make_settings simulates by default
    with pytest.raises(JoinError, match="simulated platform is for development"):
        join_policy(make_settings(tmp_path, **confidential, join={"policy": sim_only}), _own())
    assert join_policy(make_settings(tmp_path, simulate=True, join={"policy": sim_only}), _own()).platforms == ["sim"]
    unmeasured = {"platforms": ["snp"], "snp": {"measurements": ["ab" * 48]}}   # firmware-only digest
    with pytest.raises(JoinError, match="does not pin the whole boot chain"):
        join_policy(make_settings(tmp_path, **confidential, join={"policy": unmeasured}), _own())


def test_join_section_in_a_config_file(tmp_path: Path):
    config = tmp_path / "enclave.yaml"
    config.write_text("join:\n  accept: false\n  rate_limit: 0.5\n  policy:\n    name: inline\n"
                      "    platforms: [snp]\n    snp:\n      measurements:\n"
                      f"        - {{measurement: '{'cd' * 48}', kernel_hashes: true}}\n")
    settings = load_settings(config, environ={})
    assert settings.join.accept is False and settings.join.rate_limit == 0.5
    assert join_policy(settings, _own()).snp.measurements[0].measurement == "cd" * 48


def test_accept_off_serves_no_join_routes(tmp_path: Path):
    from enclave.join.startup import join_serving

    from enclave.join.startup import peer_policy

    off = make_settings(tmp_path, join={"accept": False})
    assert peer_policy(off, sim_provider(), joining=False) is None
    assert peer_policy(off, sim_provider(), joining=True) is not None     # --join still appraises the peer
    policy = peer_policy(make_settings(tmp_path), sim_provider(), joining=False)
    assert join_serving(off, policy, lambda: None) == ([], {})  # type: ignore[arg-type]
    routers, gates = join_serving(make_settings(tmp_path), policy, lambda: None)  # type: ignore[arg-type]
    assert len(routers) == 1 and set(gates) == {"/internal/join/v1/challenge", "/internal/join/v1/secrets"}


def test_a_broken_join_policy_stops_the_start_with_a_hint(tmp_path: Path):
    from enclave.join.startup import peer_policy

    broken = make_settings(tmp_path, join={"policy": {"platforms": ["nope"]}})
    with pytest.raises(JoinError, match=r"join policy: .*join.accept: false turns the join routes off"):
        peer_policy(broken, sim_provider(), joining=False)
