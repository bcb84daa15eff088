"""`cube-enclave serve` as a real process: bootstrap PAT in a 0600 file, printed examples that work, OpenAPI."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(proc: subprocess.Popen, cert: Path, port: int, log: Path) -> ssl.SSLContext:
    """Wait until the `serve` process answers /health over TLS (trusting its cert file); its log on failure."""
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if cert.exists():
                ctx = ssl.create_default_context(cafile=str(cert))
                if httpx.get(f"https://localhost:{port}/health", verify=ctx).status_code == 200:
                    return ctx
        except (httpx.HTTPError, ssl.SSLError, OSError):
            pass
        assert time.monotonic() < deadline, "service did not come up"
        time.sleep(0.2)


def test_serve_bootstraps_and_prints_working_examples(tmp_path: Path) -> None:
    port = free_port()
    pat_file = tmp_path / "admin.pat"
    config = tmp_path / "enclave.yaml"
    config.write_text("log_json: true\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUBE_ENCLAVE__")}
    proc = subprocess.Popen([sys.executable, "-m", "enclave.main", "serve", "--simulate", "--config", str(config),
                             "--data-dir", str(tmp_path / "data"), "--port", str(port), "--pat-file", str(pat_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        cert = tmp_path / "data" / "server-cert.pem"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if cert.exists():
                    ctx = ssl.create_default_context(cafile=str(cert))
                    if httpx.get(f"https://localhost:{port}/health", verify=ctx).status_code == 200:
                        break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "service did not come up"
            time.sleep(0.1)
        token = pat_file.read_text().strip()
        assert stat.S_IMODE(pat_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "data" / "platform-secrets.sealed").stat().st_mode) == 0o600
        assert not (tmp_path / "data" / "server_secret").exists()
        with httpx.Client(verify=ctx, headers={"Authorization": f"Bearer {token}"}) as c:
            me = c.get(f"https://localhost:{port}/users/me").json()
            assert me["user"]["superadmin"] is True and len(me["memberships"]) == 1
            domain = next(iter(me["memberships"]))
            assert c.get(f"https://localhost:{port}/proxy/{domain}/v1/models").json() == {"object": "list",
                                                                                          "data": []}
            spec = c.get(f"https://localhost:{port}/openapi.json").json()
            assert {"/proxy/{domain_id}/v1/models", "/admin/models", "/users/me/pats"} <= set(spec["paths"])
            tags = {t for p in spec["paths"].values() for op in p.values() for t in op.get("tags", [])}
            assert {"models", "platform admin", "domain admin", "self service", "operations"} <= tags
        # the printed openai-python example: attested client with the printed sim policy
        from attestation.atls.client import openai_client
        from attestation.policy import load_policy

        client = openai_client(f"https://localhost:{port}/proxy/{domain}/v1", api_key=token,
                               policy=load_policy(tmp_path / "data" / "sim-policy.yaml"))
        with client:
            assert client.models.list().data == []
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert token not in out and token not in err                 # --pat-file: never printed, never logged
    assert f"written to {pat_file}" in out and "No backends configured" in out
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("curl "))
    assert f"--cacert {cert}" in lines[at] and f"/proxy/{domain}/v1/models" in lines[at]
    assert "simulation only" in lines[at - 1] and "NO attestation check" in lines[at - 1]   # marked for what it is
    assert f"Domain 'default' (the bootstrap superadmin administers it): id {domain}" in out
    policy_file = tmp_path / "data" / "sim-policy.yaml"
    assert load_policy(policy_file).snp.require_crl  # the sim evidence carried its CRL, or the client had refused
    # the command config/policies/sim-development.yaml names finds the root this serve used (<data_dir>/sim)
    shown = subprocess.run([sys.executable, "-m", "attestation.cli", "sim-fingerprint", "--json", "--dir",
                            str(tmp_path / "data" / "sim")], capture_output=True, text=True, timeout=60, env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["fingerprint"] == load_policy(policy_file).sim_root_fingerprint
    assert f"cube-attest verify-url https://localhost:{port} --policy {policy_file}" in out
    assert "openai_client(" in out and str(policy_file) in out
    # second start: no new bootstrap, no token
    with open(tmp_path / "second.log", "w") as log:   # a file, not a pipe nobody reads while it runs
        proc = subprocess.Popen([sys.executable, "-m", "enclave.main", "serve", "--simulate", "--config",
                                 str(config), "--data-dir", str(tmp_path / "data"), "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        try:
            deadline = time.monotonic() + 60
            while True:   # up and serving (not merely printing) before it is asked to stop
                assert proc.poll() is None, (tmp_path / "second.log").read_text()[-2000:]
                try:
                    ctx = ssl.create_default_context(cafile=str(cert))
                    if httpx.get(f"https://localhost:{port}/health", verify=ctx).status_code == 200:
                        break
                except (httpx.HTTPError, ssl.SSLError, OSError):
                    pass
                assert time.monotonic() < deadline, "service did not come up again"
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=60)
    text = out
    assert "already initialised" in text and not re.search(r"cube_pat_[0-9A-Za-z]{20,}", text)


def test_serve_without_a_confidential_platform_refuses_to_start(tmp_path: Path) -> None:
    """Outside a confidential VM and without --simulate there is no evidence: fail closed, with a reason."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUBE_ENCLAVE__")}
    proc = subprocess.run([sys.executable, "-m", "enclave.main", "serve", "--data-dir", str(tmp_path / "data"),
                           "--port", str(free_port()), "--pat-file", str(tmp_path / "pat")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert "no attestation interface" in proc.stderr and "--simulate" in proc.stderr


def test_second_instance_leaves_the_running_ones_files_alone(tmp_path: Path) -> None:
    """A second `serve` on the same data directory or port exits with a reason before writing anything: the
    running instance's certificate (what `curl --cacert` users trust), policy and store stay as they were."""
    port = free_port()
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUBE_ENCLAVE__")}
    config = tmp_path / "enclave.yaml"
    config.write_text("log_json: true\n")
    base = [sys.executable, "-m", "enclave.main", "serve", "--simulate", "--config", str(config)]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([*base, "--data-dir", str(data), "--port", str(port), "--pat-file",
                                  str(tmp_path / "pat")], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        ctx = wait_until_serving(first, data / "server-cert.pem", port, tmp_path / "first.log")
        files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in data.iterdir() if p.is_file()}
        assert {"server-cert.pem", "sim-policy.yaml", "platform-secrets.sealed", "enclave.db"} <= set(files)
        other = tmp_path / "other"
        for args, reason in ((["--data-dir", str(data), "--port", str(port)], "another cube-enclave is running"),
                             (["--data-dir", str(data), "--port", str(free_port())], "another cube-enclave"),
                             (["--data-dir", str(other), "--port", str(port)], f"cannot listen on 127.0.0.1:{port}")):
            second = subprocess.run([*base, *args], capture_output=True, text=True, env=env, timeout=120)
            assert second.returncode == 2 and reason in second.stderr, second.stderr[-2000:]
            assert "Traceback" not in second.stderr
        assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in data.iterdir() if p.is_file()
                if p.name in files} == files
        assert sorted(p.name for p in other.iterdir()) == ["enclave.lock"]       # nothing else was written
        assert httpx.get(f"https://localhost:{port}/health", verify=ctx).status_code == 200   # still served
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=60)


def test_backend_flag_points_the_dev_service_at_a_running_backend() -> None:
    """`./dev serve --backend ollama=URL`: one flag per backend, named after its kind; only with --simulate
    (outside development, where prompts go is configuration, not a launch argument)."""
    import pytest

    from enclave.config import ConfigError
    from enclave.main import _parser, settings_from_args

    args = _parser().parse_args(["serve", "--simulate", "--backend", "ollama=http://127.0.0.1:11434",
                                 "--backend", "vllm=http://127.0.0.1:8000", "--backend", "ollama=http://127.0.0.1:11435"])
    settings = settings_from_args(args, environ={})
    assert [(b.name, b.kind, b.base_url) for b in settings.backends] == [
        ("ollama", "ollama", "http://127.0.0.1:11434"), ("vllm", "vllm", "http://127.0.0.1:8000"),
        ("ollama-2", "ollama", "http://127.0.0.1:11435")]
    with pytest.raises(ConfigError, match="--simulate"):
        settings_from_args(_parser().parse_args(["serve", "--backend", "ollama=http://127.0.0.1:11434"]), environ={})
    with pytest.raises(ConfigError, match="KIND=URL"):
        settings_from_args(_parser().parse_args(["serve", "--simulate", "--backend", "llama=http://x"]), environ={})
