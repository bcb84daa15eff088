"""Settings: YAML + CUBE_ENCLAVE__ environment overrides; errors name the key; server secret file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from enclave.config import DEFAULT_CONFIG, ConfigError, load_server_secret, load_settings
from enclave.main import main


def write(tmp: Path, text: str) -> Path:
    path = tmp / "enclave.yaml"
    path.write_text(text)
    return path


def test_repository_config_is_valid() -> None:
    settings = load_settings(DEFAULT_CONFIG, environ={})
    assert settings.listen.port == 8443 and settings.pat_default_ttl_days == 30


def test_yaml_and_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: {port: 9000}\nbackends:\n  - {name: ol, kind: ollama, base_url: 'http://127.0.0.1:11434'}\n")
    env = {"CUBE_ENCLAVE__LISTEN__PORT": "9443", "CUBE_ENCLAVE__DATABASE_URL": "postgresql+asyncpg://u@127.0.0.1/db",
           "CUBE_ENCLAVE__PAT_MAX_TTL_DAYS": "90", "UNRELATED": "x"}
    s = load_settings(path, environ=env, overrides={"simulate": True})     # environment overrides: simulation only
    assert s.listen.port == 9443 and s.simulate is True and s.pat_max_ttl_days == 90
    assert s.effective_database_url() == "postgresql+asyncpg://u@127.0.0.1/db"
    assert s.auth_cache_enabled() is False            # PostgreSQL: replicas, no in-process cache
    assert s.backends[0].name == "ol" and s.backends[0].kind == "ollama"
    env2 = {"CUBE_ENCLAVE__BACKENDS": "[{name: v, kind: vllm, base_url: 'http://127.0.0.1:8000', api_key: k}]"}
    assert load_settings(path, environ=env2, overrides={"simulate": True}).backends[0].api_key.get_secret_value() == "k"


@pytest.mark.parametrize("text,env,needle", [
    ("listen: {port: 99999}\n", {}, "listen.port"),
    ("lisen: {port: 1}\n", {}, "lisen: unknown key"),
    ("backends: [{name: x, kind: tgi, base_url: 'http://h'}]\n", {}, "backends.0.kind"),
    ("backends: [{name: x, kind: ollama, base_url: 'ftp://h'}]\n", {}, "backends.0.base_url"),
    ("database_url: mysql://x\n", {}, "database_url"),
    ("attestation: {kds_url: 'ftp://kds'}\n", {}, "attestation.kds_url"),
    ("attestation: {kds_url: 'https://u:p@kds.example'}\n", {}, "attestation.kds_url"),
    ("pat_default_ttl_days: 400\n", {}, "pat_default_ttl_days must not exceed"),
    ("simulate: true\n", {"CUBE_ENCLAVE__LISTEN__PORT": "many"}, "listen.port"),
    ("simulate: true\n", {"CUBE_ENCLAVE__NOPE": "1"}, "nope: unknown key"),
    ("- a\n- b\n", {}, "top level must be a mapping"),
    ("listen: [\n", {}, "not valid YAML at line"),
    # One key twice: PyYAML would keep the last silently, so a reader of the file could see another setting.
    ("join:\n  accept: false\n  accept: true\n", {}, "at line 3, column 3 (duplicate key 'accept')"),
    ("log_level: INFO\nlog_level: DEBUG\n", {}, "duplicate key 'log_level'"),
    ("backends:\n - {name: a, kind: ollama, base_url: 'http://h'}\n - {name: a, kind: vllm, base_url: 'http://i'}\n",
     {}, "duplicate backend name"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, env: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text), environ=env)
    assert needle in str(err.value)


def test_a_key_merged_from_an_anchor_may_be_overridden(tmp_path: Path) -> None:
    """Not a duplicate: a key written beside a merge key (<<: *anchor) overrides the merged one, as YAML says."""
    settings = load_settings(write(tmp_path, "listen: &l {port: 9000, host: 127.0.0.2}\n"
                                             "limits: {max_connections: 5}\n"), environ={})
    assert settings.listen.port == 9000
    text = "listen: {<<: {port: 9000, host: 127.0.0.2}, port: 9001}\n"
    settings = load_settings(write(tmp_path, text), environ={})
    assert (settings.listen.host, settings.listen.port) == ("127.0.0.2", 9001)


def test_a_join_policy_file_on_the_hosts_disk_is_refused(tmp_path: Path) -> None:
    """join.policy_file must lie in the measured image: in data_dir (the host's disk) the host would write the
    policy that says who receives the platform secrets. Also through a --data-dir the host passes."""
    data = tmp_path / "data"
    with pytest.raises(ConfigError, match="join.policy_file: .* lies in data_dir"):
        load_settings(write(tmp_path, f"data_dir: {data}\njoin: {{policy_file: {data}/sub/../join.yaml}}\n"),
                      environ={})
    with pytest.raises(ConfigError, match="lies in data_dir"):
        load_settings(write(tmp_path, f"join: {{policy_file: {data}/join.yaml}}\n"), environ={},
                      overrides={"data_dir": str(data)})
    fine = load_settings(write(tmp_path, f"data_dir: {data}\njoin: {{policy_file: {tmp_path}/image/join.yaml}}\n"),
                         environ={})
    assert fine.join.policy_file == tmp_path / "image" / "join.yaml"


def test_kds_url_for_the_snp_crl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """attestation.kds_url reaches detect_provider as a KdsClient (default: the host agent's mirror as a
    guest reaches it); the sim ignores it."""
    defaults = load_settings(DEFAULT_CONFIG, environ={}).attestation
    assert defaults.kds_url == "http://10.0.2.2:7080/kds" and defaults.pcs_url == "http://10.0.2.2:7080/pcs"
    assert load_settings(write(tmp_path, "attestation: {}\n"), environ={}).attestation.kds_url == defaults.kds_url
    path = write(tmp_path, "attestation: {kds_url: 'http://127.0.0.1:7080/kds/'}\n")
    assert load_settings(path, environ={}).attestation.kds_url == "http://127.0.0.1:7080/kds"
    import attestation.providers
    from attestation.errors import ProviderError

    seen: dict = {}

    def fake_detect(**kwargs):
        seen.update(kwargs)
        raise ProviderError("no attestation interface (test)")

    monkeypatch.setattr(attestation.providers, "detect_provider", fake_detect)
    monkeypatch.setattr("enclave.logs.configure_logging", lambda *a, **k: None)  # leave the root logger alone
    assert main(["serve", "--config", str(path), "--data-dir", str(tmp_path / "data"), "--port", "0",
                 "--pat-file", str(tmp_path / "pat")]) == 2
    assert seen["kds"].base_url == "http://127.0.0.1:7080/kds"
    assert main(["serve", "--config", str(path), "--data-dir", str(tmp_path / "data"), "--simulate"]) == 2
    assert seen["kds"] is None and seen["simulate"] is True


def test_pcs_url_for_the_tdx_collateral(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """attestation.pcs_url reaches detect_provider as a PcsClient (the root CA CRL from the same mirror);
    null turns it off; the sim gets none."""
    import attestation.providers
    from attestation.errors import ProviderError

    seen: dict = {}

    def fake_detect(**kwargs):
        seen.update(kwargs)
        raise ProviderError("no attestation interface (test)")

    monkeypatch.setattr(attestation.providers, "detect_provider", fake_detect)
    monkeypatch.setattr("enclave.logs.configure_logging", lambda *a, **k: None)
    data = str(tmp_path / "data")
    pat = ["--pat-file", str(tmp_path / "pat")]   # outside simulation the bootstrap key needs a safe delivery
    assert main(["serve", "--config", str(write(tmp_path, "attestation: {}\n")), "--data-dir", data, *pat]) == 2
    assert seen["pcs"].base_url == "http://10.0.2.2:7080/pcs"
    assert seen["pcs"].root_ca_crl_url == "http://10.0.2.2:7080/pcs/sgx/certification/v4/rootcacrl"
    off = write(tmp_path, "attestation: {pcs_url: null, kds_url: null}\n")
    assert main(["serve", "--config", str(off), "--data-dir", data, *pat]) == 2
    assert seen["pcs"] is None and seen["kds"] is None
    assert main(["serve", "--config", str(write(tmp_path, "attestation: {}\n")), "--data-dir", data, "--simulate"]) == 2
    assert seen["pcs"] is None
    with pytest.raises(ConfigError, match="attestation.pcs_url"):
        load_settings(write(tmp_path, "attestation: {pcs_url: 'ftp://pcs'}\n"), environ={})


def test_missing_collateral_mirror_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Real hardware with no mirror at the default address: no evidence, no start, and a message saying why."""
    import attestation.providers
    from attestation.errors import ProviderError

    class NoCollateral:
        platform = "tdx"
        sealing_binding = "none"

        def derived_key(self, context: bytes) -> bytes:
            from attestation.errors import NoSealingKey

            raise NoSealingKey("TDX has no sealing key (test)")

        def get_evidence(self, report_data: bytes):
            raise ProviderError("cannot fetch the Intel collateral of FMSPC 90c06f000000 (test)")

    monkeypatch.setattr(attestation.providers, "detect_provider", lambda **kwargs: NoCollateral())
    monkeypatch.setattr("enclave.logs.configure_logging", lambda *a, **k: None)
    path = write(tmp_path, "attestation: {}\n")
    assert main(["serve", "--config", str(path), "--data-dir", str(tmp_path / "data"),
                 "--pat-file", str(tmp_path / "pat")]) == 2
    err = capsys.readouterr().err
    assert "cannot obtain attestation evidence: cannot fetch the Intel collateral" in err
    assert "attestation.kds_url / pcs_url" in err and "cube-host serve" in err
    assert not (tmp_path / "data" / "server-cert.pem").exists()


def test_cli_prints_config_errors_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "listen: {port: -1}\n")
    assert main(["serve", "--config", str(path), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cube-enclave: configuration error:") and "listen.port" in err
    assert "Traceback" not in err


def test_server_secret_only_in_simulation_and_never_created(tmp_path: Path) -> None:
    """The plaintext data_dir/server_secret is gone: nothing creates it, and a configured secret is refused
    outside simulation (whoever holds the image or the file would read it)."""
    s = load_settings(write(tmp_path, f"data_dir: {tmp_path / 'data'}\n"), environ={})
    assert load_server_secret(s) is None and not (tmp_path / "data" / "server_secret").exists()
    secret_file = tmp_path / "secret"
    secret_file.write_text("y" * 40)
    secret_file.chmod(0o600)
    for text in (f"server_secret: {'x' * 40}\n", f"server_secret_file: {secret_file}\n"):
        outside = write(tmp_path, text)
        outside.chmod(0o600)
        with pytest.raises(ConfigError, match="only with --simulate"):
            load_server_secret(load_settings(outside, environ={}))
    short = load_settings(write(tmp_path, "simulate: true\n"), environ={"CUBE_ENCLAVE__SERVER_SECRET": "short"})
    with pytest.raises(ConfigError, match="server_secret"):
        load_server_secret(short)
    assert load_server_secret(load_settings(write(tmp_path, "simulate: true\n"),
                                            environ={"CUBE_ENCLAVE__SERVER_SECRET": "x" * 40})) == b"x" * 40


def test_loose_server_secret_file_refused_naming_the_fix(tmp_path: Path, monkeypatch) -> None:
    """A server_secret others can read (or write, or that another user owns) may have leaked: refuse to start."""
    secret = tmp_path / "named-secret"
    secret.write_text("n" * 40 + "\n")
    s = load_settings(write(tmp_path, f"simulate: true\nserver_secret_file: {secret}\n"), environ={})
    for mode in (0o640, 0o604, 0o620):
        os.chmod(secret, mode)
        with pytest.raises(ConfigError, match=rf"server_secret_file {secret}: its mode {mode:03o} .*chmod 600 {secret}"):
            load_server_secret(s)
    os.chmod(secret, 0o600)
    assert load_server_secret(s) == b"n" * 40
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    with pytest.raises(ConfigError, match="not by this process's user"):
        load_server_secret(s)


def test_config_file_holding_the_server_secret_must_be_private(tmp_path: Path) -> None:
    path = write(tmp_path, "server_secret: " + "z" * 40 + "\n")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="configuration file holding server_secret .*chmod 600"):
        load_settings(path, environ={})
    os.chmod(path, 0o600)
    assert load_settings(path, environ={}).server_secret.get_secret_value() == "z" * 40
    with_key = write(tmp_path, "backends: [{name: v, kind: vllm, base_url: 'http://127.0.0.1:8000', api_key: k}]\n")
    os.chmod(with_key, 0o640)
    with pytest.raises(ConfigError, match="holding a backend api_key .*enclave.yaml: its mode 640"):
        load_settings(with_key, environ={})


def test_cube_enclave_refuses_to_migrate_a_loose_legacy_secret(tmp_path: Path) -> None:
    import subprocess
    import sys

    data = tmp_path / "data"
    data.mkdir()
    (data / "server_secret").write_text("q" * 64 + "\n")
    os.chmod(data / "server_secret", 0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUBE_ENCLAVE__")}
    proc = subprocess.run([sys.executable, "-m", "enclave.main", "serve", "--simulate", "--config",
                           str(write(tmp_path, "{}\n")), "--data-dir", str(data), "--port", "0"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "configuration error" in proc.stderr and f"chmod 600 {data / 'server_secret'}" in proc.stderr
