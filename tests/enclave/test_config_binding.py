"""The configuration bound to the evidence: the enclave serves only when HOST_DATA / MRCONFIGID carries the SHA-256
of the configuration file it loaded, and outside simulation every setting comes from that file."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from attestation.errors import ProviderError
from attestation.evidence import Evidence
from attestation.policy import sim_policy_yaml
from attestation.providers import SimProvider, detect_provider
from attestation.providers.sim import SIM_HOST_DATA_ENV, sim_launch_host_data
from attestation.tdx.quote import parse_quote
from enclave.config import ConfigError, load_settings
from enclave.config_binding import (ConfigBindingError, check_config_binding, enforce_config_binding,
                                    expected_mrconfigid, launch_field)
from enclave.main import LAUNCH_SETTINGS, _parser, settings_from_args
from tests.enclave.test_main import free_port, wait_until_serving

VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "vectors"
TDX_QUOTE = VECTORS / "tdx" / "go-tdx-guest--cos-113-tdx-quote.dat"
CONFIG_TEXT = "log_json: true\nregistry_refresh_seconds: 3600\n"


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("binding-sim")
    SimProvider(directory)            # the RSA-4096 root once for the module
    return directory


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUBE_ENCLAVE__") and k != SIM_HOST_DATA_ENV}
    return {**env, **extra}


def _config(tmp_path: Path, text: str = CONFIG_TEXT) -> tuple[Path, bytes]:
    path = tmp_path / "enclave.yaml"
    path.write_bytes(text.encode())
    return path, hashlib.sha256(text.encode()).digest()


# -- the digest and the settings ---------------------------------------------------------------------------------

def test_the_digest_is_over_the_exact_bytes_of_the_file_loaded(tmp_path: Path) -> None:
    path, digest = _config(tmp_path)
    first = load_settings(path, environ={})
    assert first.config_file.path == path and first.config_file.sha256 == digest
    path.write_text(CONFIG_TEXT + "# a comment changes nothing the settings say, but the digest\n")
    second = load_settings(path, environ={})
    assert second.model_dump() == first.model_dump()
    assert second.config_file.sha256 != digest


@pytest.mark.parametrize("environ", [
    {"CUBE_ENCLAVE__LISTEN__PORT": "9443"},
    {"CUBE_ENCLAVE__DATABASE_URL": "postgresql+asyncpg://host@10.0.2.2/db"},
    {"CUBE_ENCLAVE__SIMULATE": "true"},                       # the environment cannot turn simulation on
    {"CUBE_ENCLAVE__BACKENDS": "[{name: x, kind: ollama, base_url: 'http://10.0.2.2:11434'}]"},
])
def test_environment_overrides_are_refused_outside_simulation(tmp_path: Path, environ: dict[str, str]) -> None:
    path, _ = _config(tmp_path)
    name = next(iter(environ))
    with pytest.raises(ConfigError, match=f"{name}: outside simulation every setting must come from the "
                                          "configuration file"):
        load_settings(path, environ=environ)
    with pytest.raises(ConfigError, match="outside simulation"):   # through the launch path too
        settings_from_args(_parser().parse_args(["serve", "--config", str(path)]), environ=environ)
    if name != "CUBE_ENCLAVE__SIMULATE":                          # in simulation they still work
        load_settings(path, environ=environ, overrides={"simulate": True})


def test_the_environment_cannot_switch_simulation_off_and_keep_its_overrides(tmp_path: Path) -> None:
    path, _ = _config(tmp_path, CONFIG_TEXT + "simulate: true\n")
    assert load_settings(path, environ={"CUBE_ENCLAVE__LISTEN__PORT": "9443"}).listen.port == 9443
    with pytest.raises(ConfigError, match="outside simulation"):
        load_settings(path, environ={"CUBE_ENCLAVE__SIMULATE": "false", "CUBE_ENCLAVE__LISTEN__PORT": "9443"})


@pytest.mark.parametrize("value", ['"true"', "1", "yes please"])
def test_simulation_is_a_yaml_boolean_or_nothing(tmp_path: Path, value: str) -> None:
    """A string or number must not turn simulation on: the environment gate reads only a real boolean, so such
    a file would simulate while refusing overrides "outside simulation", or the other way round."""
    path, _ = _config(tmp_path, CONFIG_TEXT + f"simulate: {value}\n")
    with pytest.raises(ConfigError, match="simulate: Input should be a valid boolean"):
        load_settings(path, environ={})


def test_environment_names_in_another_case_do_nothing(tmp_path: Path) -> None:
    """Only CUBE_ENCLAVE__ (exact case) is read, so other spellings are neither refused nor applied."""
    path, _ = _config(tmp_path)
    plain = load_settings(path, environ={})
    odd = load_settings(path, environ={"cube_enclave__database_url": "postgresql+asyncpg://h@10.0.2.2/db",
                                       "Cube_Enclave__LISTEN__PORT": "1", "CUBE_ENCLAVE_SIMULATE": "true"})
    assert odd.model_dump() == plain.model_dump() and not odd.simulate


def test_launch_flags_set_only_where_data_lives_and_where_to_listen(tmp_path: Path) -> None:
    path, digest = _config(tmp_path)
    args = _parser().parse_args(["serve", "--config", str(path), "--data-dir", str(tmp_path / "d"),
                                 "--host", "0.0.0.0", "--port", "9443", "--pat-file", str(tmp_path / "pat")])
    settings = settings_from_args(args, environ={})
    assert LAUNCH_SETTINGS == {"data_dir", "listen"}
    assert settings.data_dir == tmp_path / "d" and settings.listen.port == 9443 and not settings.simulate
    assert settings.config_file.sha256 == digest
    with pytest.raises(ConfigError, match="--simulate"):
        settings_from_args(_parser().parse_args(["serve", "--config", str(path), "--backend",
                                                 "ollama=http://10.0.2.2:11434"]), environ={})


# -- the check on the report -------------------------------------------------------------------------------------

def test_sim_reports_the_digest_it_is_given_unless_the_launcher_chooses(sim_dir: Path) -> None:
    digest = hashlib.sha256(b"some configuration").digest()
    chosen = bytes(range(32))
    assert sim_launch_host_data(digest, environ={}) == digest
    assert sim_launch_host_data(None, environ={}) == bytes(32)
    assert sim_launch_host_data(digest, environ={SIM_HOST_DATA_ENV: chosen.hex()}) == chosen
    for bad in ("00", "zz" * 32, chosen.hex() + "00"):
        with pytest.raises(ProviderError, match=SIM_HOST_DATA_ENV):
            sim_launch_host_data(digest, environ={SIM_HOST_DATA_ENV: bad})
    provider = detect_provider(simulate=True, sim_dir=sim_dir, sim_host_data=digest)
    assert launch_field(provider.get_evidence(bytes(64))) == ("HOST_DATA", digest)
    provider = SimProvider(sim_dir, host_data=digest, environ={SIM_HOST_DATA_ENV: chosen.hex()})
    assert launch_field(provider.get_evidence(bytes(64))) == ("HOST_DATA", chosen)


def test_enforce_match_mismatch_and_zero_on_the_sim(tmp_path: Path, sim_dir: Path) -> None:
    path, digest = _config(tmp_path)
    settings = load_settings(path, environ={})                     # not simulated: the hardware path
    enforce_config_binding(SimProvider(sim_dir, host_data=digest, environ={}), settings)
    other = hashlib.sha256(b"another configuration").digest()
    with pytest.raises(ConfigBindingError) as err:
        enforce_config_binding(SimProvider(sim_dir, host_data=other, environ={}), settings)
    assert other.hex() in str(err.value) and digest.hex() in str(err.value)
    assert f"host-data={base64.b64encode(digest).decode()}" in str(err.value)
    with pytest.raises(ConfigBindingError, match="HOST_DATA is zero: the launch did not bind the configuration") as err:
        enforce_config_binding(SimProvider(sim_dir, environ={}), settings)
    assert "cube-host qemu-cmd" in str(err.value) and digest.hex() in str(err.value)


def test_no_configuration_file_outside_simulation_is_refused(sim_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import enclave.config as config

    monkeypatch.setattr(config, "DEFAULT_CONFIG", Path("/nonexistent/enclave.yaml"))
    settings = load_settings(None, environ={})
    assert settings.config_file.path is None
    empty = hashlib.sha256(b"").digest()
    with pytest.raises(ConfigBindingError, match="no configuration file"):
        enforce_config_binding(SimProvider(sim_dir, host_data=empty, environ={}), settings)
    simulated = load_settings(None, environ={}, overrides={"simulate": True})
    enforce_config_binding(SimProvider(sim_dir, host_data=empty, environ={}), simulated)   # defaults = empty file


def test_no_report_is_no_start(tmp_path: Path) -> None:
    class NoReport:
        platform = "snp"

        def get_evidence(self, report_data: bytes) -> Evidence:
            raise ProviderError("sev-guest: SNP_GET_EXT_REPORT failed (test)")

    path, _ = _config(tmp_path)
    with pytest.raises(ProviderError, match="test"):
        enforce_config_binding(NoReport(), load_settings(path, environ={}))
    garbage = Evidence(platform="snp", report=b"\x01" * 100)
    with pytest.raises(ConfigBindingError, match="cannot read this enclave's own snp report"):
        check_config_binding(garbage, hashlib.sha256(b"").digest())


def _quote_with_mrconfigid(value: bytes) -> Evidence:
    raw = bytearray(TDX_QUOTE.read_bytes())
    original = parse_quote(bytes(raw)).body.mrconfigid
    at = 48 + 16 + 48 + 48 + 8 + 8 + 8 + 48   # header, TEE_TCB_SVN, MRSEAM, MRSIGNERSEAM, attributes, XFAM, MRTD
    assert raw[at:at + 48] == original
    raw[at:at + 48] = value
    assert parse_quote(bytes(raw)).body.mrconfigid == value
    return Evidence(platform="tdx", report=bytes(raw))


def test_tdx_mrconfigid_is_the_sha256_then_16_zero_bytes() -> None:
    """On a real TDX quote (MRCONFIGID rewritten; the check reads the enclave's own quote, no signature involved)."""
    digest = hashlib.sha256(CONFIG_TEXT.encode()).digest()
    assert expected_mrconfigid(digest) == digest + bytes(16)
    check_config_binding(_quote_with_mrconfigid(digest + bytes(16)), digest)
    for wrong in (bytes(16) + digest, digest + b"\x01" + bytes(15), hashlib.sha384(CONFIG_TEXT.encode()).digest()):
        with pytest.raises(ConfigBindingError, match="MRCONFIGID .* does not match") as err:
            check_config_binding(_quote_with_mrconfigid(wrong), digest)
        assert f"mrconfigid={base64.b64encode(digest + bytes(16)).decode()}" in str(err.value)
    assert not any(parse_quote(TDX_QUOTE.read_bytes()).body.mrconfigid)   # the vector's own launch bound nothing
    with pytest.raises(ConfigBindingError, match="MRCONFIGID is zero"):
        check_config_binding(Evidence(platform="tdx", report=TDX_QUOTE.read_bytes()), digest)


# -- the real process --------------------------------------------------------------------------------------------

def _serve(tmp_path: Path, config: Path, env: dict[str, str], port: int) -> list[str]:
    return [sys.executable, "-m", "enclave.main", "serve", "--simulate", "--config", str(config), "--data-dir",
            str(tmp_path / "data"), "--port", str(port), "--pat-file", str(tmp_path / "admin.pat")]


@pytest.mark.parametrize("chosen, needle", [
    ("ab" * 32, "HOST_DATA " + "ab" * 32 + " does not match the configuration loaded"),
    ("00" * 32, "HOST_DATA is zero"),
])
def test_serve_refuses_a_launch_bound_to_another_configuration(tmp_path: Path, chosen: str, needle: str) -> None:
    config, digest = _config(tmp_path)
    proc = subprocess.run(_serve(tmp_path, config, {}, free_port()), capture_output=True, text=True, timeout=120,
                          env=_clean_env(**{SIM_HOST_DATA_ENV: chosen}))
    assert proc.returncode == 2, proc.stderr
    assert "cube-enclave: refusing to serve:" in proc.stderr and needle in proc.stderr
    assert digest.hex() in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "enclave.db").exists()          # nothing was bootstrapped before the check
    assert not (tmp_path / "admin.pat").exists()


def test_serve_with_the_bound_configuration_and_a_policy_pinning_it(tmp_path: Path) -> None:
    """The launch carries the config's digest (CUBE_SIM_HOST_DATA, as `cube-host qemu-cmd` passes host-data=):
    it serves, and a policy pinning snp.host_data to that digest accepts it while one pinning another refuses."""
    config, digest = _config(tmp_path)
    port = free_port()
    env = _clean_env(**{SIM_HOST_DATA_ENV: digest.hex()})
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_serve(tmp_path, config, env, port), stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_serving(proc, tmp_path / "data" / "server-cert.pem", port, log)
        shown = subprocess.run([sys.executable, "-m", "attestation.cli", "sim-fingerprint", "--json", "--dir",
                                str(tmp_path / "data" / "sim")], capture_output=True, text=True, timeout=60, env=env,
                               check=True)
        fingerprint = json.loads(shown.stdout)["fingerprint"]
        results = {}
        for name, pinned in (("bound", digest), ("other", hashlib.sha256(b"another").digest())):
            policy = tmp_path / f"{name}.yaml"
            policy.write_text(sim_policy_yaml(fingerprint) + f'  host_data: "{pinned.hex()}"\n')
            results[name] = subprocess.run([sys.executable, "-m", "attestation.cli", "verify-url",
                                            f"https://localhost:{port}", "--policy", str(policy), "--json"],
                                           capture_output=True, text=True, timeout=60, env=env)
        assert results["bound"].returncode == 0, results["bound"].stdout + results["bound"].stderr
        assert digest.hex() in results["bound"].stdout
        assert results["other"].returncode == 1
        assert "HOST_DATA" in results["other"].stdout + results["other"].stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
