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
    return _launched_with(bytes([5]) * 32)   # a launch with a configuration digest, as the config binding needs


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


REAL = {"simulate": False, "server_secret": None}   # make_settings simulates unless told otherwise


def test_outside_simulation_the_sim_and_unmeasured_policies_are_refused(tmp_path: Path):
    sim_only = {"platforms": ["sim"], "sim_root_fingerprint": sim_provider().fingerprint, "allow_unmeasured": True}
    with pytest.raises(JoinError, match="simulated platform is for development"):
        join_policy(make_settings(tmp_path, **REAL, join={"policy": sim_only}), _own())
    assert join_policy(make_settings(tmp_path, simulate=True, join={"policy": sim_only}), _own()).platforms == ["sim"]
    unmeasured = {"platforms": ["snp"], "snp": {"measurements": ["ab" * 48]}}   # firmware-only digest
    with pytest.raises(JoinError, match="does not pin the whole boot chain"):
        join_policy(make_settings(tmp_path, **REAL, join={"policy": unmeasured}), _own())
    assert join_policy(make_settings(tmp_path, **REAL, join={"policy": MEASURED_SNP}), _own()).name == "measured"


def test_outside_simulation_a_policy_file_on_the_data_disk_is_refused(tmp_path: Path):
    """data_dir is the host's disk: a join policy read from there is the host's choice of who gets the secrets
    (the configuration's digest covers the path, not the file). Refused, however the path is spelled."""
    import yaml

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    policy_file = data / "join-policy.yaml"
    policy_file.write_text(yaml.safe_dump(MEASURED_SNP))
    (tmp_path / "link.yaml").symlink_to(policy_file)
    for spelled in (policy_file, data / "sub" / ".." / "join-policy.yaml", tmp_path / "link.yaml"):
        with pytest.raises((ConfigError, JoinError), match="data_dir"):   # the settings refuse it, and join_policy
            join_policy(make_settings(data, **REAL, join={"policy_file": str(spelled)}), _own())
    image_file = tmp_path / "image" / "join-policy.yaml"   # elsewhere (e.g. /usr/share/cube-ai in the image)
    image_file.parent.mkdir()
    image_file.write_text(yaml.safe_dump(MEASURED_SNP))
    assert join_policy(make_settings(data, **REAL, join={"policy_file": str(image_file)}), _own()).name == "measured"


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


def _launched_with(host_data: bytes):
    """Sim evidence of a launch whose HOST_DATA is ``host_data`` (the session's sim platform, its root)."""
    from attestation.providers import SimProvider

    return SimProvider(sim_provider().sim.directory, host_data=host_data).get_evidence(bytes(64))


def test_outside_simulation_an_explicit_policy_pins_this_replicas_configuration(tmp_path: Path):
    """A measured policy pins the code, not the configuration the host gives it: a genuine image launched with
    the host's own configuration (its database, its operator key) must not get the secrets. Where the policy
    leaves HOST_DATA / MRCONFIGID open, the peer must show this replica's; a value the policy pins stays."""
    from attestation.policy import policy_from_dict
    from attestation.verifier import verify_evidence
    from enclave.join.policy import same_configuration

    config = bytes([5]) * 32
    own = _launched_with(config)
    policy = join_policy(make_settings(tmp_path, **REAL, join={"policy": MEASURED_SNP}), own)
    assert policy.snp.host_data == config.hex() and policy.tdx.mrconfigid == (config + bytes(16)).hex()
    pinned = {**MEASURED_SNP, "snp": {**MEASURED_SNP["snp"], "host_data": "cd" * 32}}
    assert join_policy(make_settings(tmp_path, **REAL, join={"policy": pinned}), own).snp.host_data == "cd" * 32
    with pytest.raises(JoinError, match="no configuration digest"):
        join_policy(make_settings(tmp_path, **REAL, join={"policy": MEASURED_SNP}), _launched_with(bytes(32)))
    # the completed pin is enforced (on sim evidence, with the same completion of a sim policy)
    sim_rules = {"platforms": ["sim"], "sim_root_fingerprint": sim_provider().fingerprint, "allow_unmeasured": True}
    completed = same_configuration(policy_from_dict(sim_rules), own)
    assert verify_evidence(own, policy=completed, expected_report_data=bytes(64)).ok
    refused = verify_evidence(_launched_with(bytes([7]) * 32), policy=completed, expected_report_data=bytes(64))
    assert not refused.ok and "host_data" in (refused.error or "").lower()
