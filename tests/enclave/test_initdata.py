"""Confidential Containers init-data: the configuration comes from the init-data's ``cube-enclave.yaml`` entry and
the enclave serves only when HOST_DATA / MRCONFIGID carries the init-data digest with Kata's padding rule."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from attestation.evidence import Evidence
from attestation.policy import sim_policy_yaml
from attestation.providers import SimProvider
from attestation.providers.sim import SIM_HOST_DATA_ENV
from enclave.config import ConfigError
from enclave.config_binding import ConfigBindingError, check_config_binding, enforce_config_binding
from enclave.initdata import InitDataError, parse_initdata, read_initdata
from enclave.main import _parser, settings_from_args
from tests.enclave.test_config_binding import _clean_env, _quote_with_mrconfigid
from tests.enclave.test_main import free_port, wait_until_serving

CONFIG_TEXT = "log_json: true\nregistry_refresh_seconds: 3600\n"
HASHES = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}


def _initdata_text(algorithm: str = "sha384", config: str | None = CONFIG_TEXT, version: str = "0.1.0") -> str:
    text = f'version = "{version}"\nalgorithm = "{algorithm}"\n\n[data]\n"aa.toml" = """\n[token_configs]\n"""\n'
    if config is not None:
        text += f'"cube-enclave.yaml" = """\n{config}"""\n'
    return text


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "initdata.toml"
    path.write_bytes(text.encode())
    return path


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("initdata-sim")
    SimProvider(directory)
    return directory


# -- the document ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", sorted(HASHES))
def test_the_digest_is_over_the_exact_bytes_under_the_documents_algorithm(tmp_path: Path, algorithm: str) -> None:
    text = _initdata_text(algorithm)
    initdata = read_initdata(_write(tmp_path, text))
    assert initdata.binding.algorithm == algorithm
    assert initdata.binding.digest == HASHES[algorithm](text.encode()).digest()
    assert initdata.config == CONFIG_TEXT.encode()
    commented = parse_initdata((text + "# a comment\n").encode(), "x")
    assert commented.config == initdata.config and commented.binding.digest != initdata.binding.digest


@pytest.mark.parametrize("text, needle", [
    (_initdata_text("md5"), "algorithm 'md5' is not one of sha256, sha384, sha512"),
    (_initdata_text("SHA384"), "algorithm 'SHA384'"),
    (_initdata_text(version="0.2.0"), "version '0.2.0' is not supported"),
    (_initdata_text(config=None), "no [data] entry 'cube-enclave.yaml' holding the enclave's configuration "
                                  "(entries: aa.toml)"),
    ('version = "0.1.0"\nalgorithm = "sha256"\n', "no [data] table"),
    ('version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"cube-enclave.yaml" = 3\n', "must be a string"),
    ('version = "0.1.0"\nalgorithm = \n', "is not valid TOML"),
])
def test_a_malformed_document_is_refused(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(InitDataError) as err:
        parse_initdata(text.encode(), "initdata.toml")
    assert needle in str(err.value)
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="init-data"):          # the launch path: ConfigError, exit 2
        settings_from_args(_parser().parse_args(["serve", "--initdata", str(path)]), environ={})
    with pytest.raises(InitDataError, match="not UTF-8"):
        parse_initdata(b"\xff\xfe", "x")
    with pytest.raises(InitDataError, match="cannot read init-data"):
        read_initdata(tmp_path / "absent.toml")


def test_settings_come_from_the_entry_and_config_with_initdata_is_refused(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    path = _write(tmp_path, _initdata_text("sha512", CONFIG_TEXT + "listen: {port: 9555}\n"))
    settings = settings_from_args(_parser().parse_args(["serve", "--initdata", str(path)]), environ={})
    assert settings.log_json and settings.listen.port == 9555 and not settings.simulate
    assert settings.config_file.path == path and settings.config_file.initdata is not None
    assert settings.config_file.initdata.digest == hashlib.sha512(path.read_bytes()).digest()
    with pytest.raises(ConfigError, match="outside simulation"):   # the environment stays refused
        settings_from_args(_parser().parse_args(["serve", "--initdata", str(path)]),
                           environ={"CUBE_ENCLAVE__LISTEN__PORT": "1"})
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["serve", "--config", str(path), "--initdata", str(path)])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


# -- the padding rule on each layout ------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", sorted(HASHES))
def test_snp_host_data_is_the_digest_truncated_or_padded_to_32_bytes(tmp_path: Path, sim_dir: Path,
                                                                      algorithm: str) -> None:
    text = _initdata_text(algorithm)
    digest = HASHES[algorithm](text.encode()).digest()
    settings = settings_from_args(_parser().parse_args(["serve", "--initdata", str(_write(tmp_path, text))]),
                                  environ={})
    enforce_config_binding(SimProvider(sim_dir, host_data=digest[:32], environ={}), settings)
    config_digest = hashlib.sha256(CONFIG_TEXT.encode()).digest()     # the config-file rule does not apply here
    for wrong in (config_digest, digest[-32:] if len(digest) > 32 else bytes(31) + b"\x01"):
        with pytest.raises(ConfigBindingError, match="HOST_DATA .* does not match the init-data loaded") as err:
            enforce_config_binding(SimProvider(sim_dir, host_data=wrong, environ={}), settings)
        assert digest[:32].hex() in str(err.value)
        assert ("truncated to 32 bytes" in str(err.value)) == (algorithm != "sha256")
    with pytest.raises(ConfigBindingError, match="HOST_DATA is zero: the launch did not bind an init-data"):
        enforce_config_binding(SimProvider(sim_dir, environ={}), settings)


@pytest.mark.parametrize("algorithm, expected", [
    ("sha256", lambda d: d + bytes(16)),     # zero-padded
    ("sha384", lambda d: d),                 # exactly
    ("sha512", lambda d: d[:48]),            # truncated
])
def test_tdx_mrconfigid_is_the_digest_padded_or_truncated_to_48_bytes(algorithm: str, expected) -> None:
    """On a real TDX quote, its MRCONFIGID rewritten (the check reads the enclave's own quote)."""
    raw = _initdata_text(algorithm).encode()
    initdata = parse_initdata(raw, "initdata.toml")
    digest = HASHES[algorithm](raw).digest()
    value = expected(digest)
    assert len(value) == 48 and initdata.binding.launch_value(48) == value
    check_config_binding(_quote_with_mrconfigid(value), b"", initdata.binding)
    wrong = [bytes(48 - len(digest[:48])) + digest[:48] if len(digest) < 48 else digest[1:49].ljust(48, b"\0"),
             hashlib.sha256(initdata.config).digest() + bytes(16)]
    for other in wrong:
        with pytest.raises(ConfigBindingError, match="MRCONFIGID .* does not match the init-data loaded") as err:
            check_config_binding(_quote_with_mrconfigid(other), b"", initdata.binding)
        assert value.hex() in str(err.value)


def test_an_unreadable_own_report_is_no_start() -> None:
    initdata = parse_initdata(_initdata_text().encode(), "x")
    with pytest.raises(ConfigBindingError, match="cannot read this enclave's own snp report"):
        check_config_binding(Evidence(platform="snp", report=b"\x01" * 100), b"", initdata.binding)


# -- the real process --------------------------------------------------------------------------------------------

def _serve(tmp_path: Path, initdata: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "enclave.main", "serve", "--simulate", "--initdata", str(initdata), "--data-dir",
            str(tmp_path / "data"), "--port", str(port), "--pat-file", str(tmp_path / "admin.pat")]


def test_serve_refuses_a_launch_bound_to_the_config_entry_rather_than_the_initdata(tmp_path: Path) -> None:
    path = _write(tmp_path, _initdata_text("sha384"))
    entry_digest = hashlib.sha256(CONFIG_TEXT.encode()).hexdigest()
    proc = subprocess.run(_serve(tmp_path, path, free_port()), capture_output=True, text=True, timeout=120,
                          env=_clean_env(**{SIM_HOST_DATA_ENV: entry_digest}))
    assert proc.returncode == 2, proc.stderr
    assert "refusing to serve: HOST_DATA " + entry_digest + " does not match the init-data loaded" in proc.stderr
    assert hashlib.sha384(path.read_bytes()).hexdigest()[:64] in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "admin.pat").exists()


def test_serve_with_initdata_starts_and_a_policy_pinning_its_digest_accepts_it(tmp_path: Path) -> None:
    """CUBE_SIM_HOST_DATA unset: the simulated launch carries the init-data digest, as Kata's would."""
    path = _write(tmp_path, _initdata_text("sha512"))
    host_data = hashlib.sha512(path.read_bytes()).digest()[:32]
    port = free_port()
    env = _clean_env()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_serve(tmp_path, path, port), stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_serving(proc, tmp_path / "data" / "server-cert.pem", port, log)
        shown = subprocess.run([sys.executable, "-m", "attestation.cli", "sim-fingerprint", "--json", "--dir",
                                str(tmp_path / "data" / "sim")], capture_output=True, text=True, timeout=60, env=env,
                               check=True)
        policy = tmp_path / "policy.yaml"
        policy.write_text(sim_policy_yaml(json.loads(shown.stdout)["fingerprint"])
                          + f'  host_data: "{host_data.hex()}"\n')
        verified = subprocess.run([sys.executable, "-m", "attestation.cli", "verify-url", f"https://localhost:{port}",
                                   "--policy", str(policy), "--json"], capture_output=True, text=True, timeout=60,
                                  env=env)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert host_data.hex() in verified.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
