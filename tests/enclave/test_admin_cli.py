"""cube-admin against the running service over HTTPS: --json everywhere, pull progress, clean errors."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from enclave.admin_cli import main

from tests.enclave.conftest import EnclaveServer, FakeClock, World, make_settings
from tests.enclave.test_service import backends, start_service
from tests.fakes.ollama import FakeOllama
from tests.fakes.vllm import FakeVllm


@pytest.fixture
def svc(tmp_path) -> Iterator[tuple[EnclaveServer, World]]:
    with FakeOllama() as ollama, FakeVllm() as vllm:
        server, world = start_service(make_settings(tmp_path, backends=backends(ollama, vllm)), FakeClock())
        try:
            yield server, world
        finally:
            server.stop()


def cli(server: EnclaveServer, token: str, *args: str, capsys) -> tuple[int, str, str]:
    code = main(["--url", server.url, "--ca", str(server.cert_path), "--token", token, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_flows(svc, capsys, monkeypatch) -> None:
    server, world = svc
    root = world.tokens["superadmin"]
    code, out, _ = cli(server, root, "--json", "users", "create", "dave", capsys=capsys)
    assert code == 0
    dave = json.loads(out)
    code, out, _ = cli(server, root, "--json", "domains", "create", "ops", "--allow", "llama*", capsys=capsys)
    dom = json.loads(out)
    assert dom["model_allowlist"] == ["llama*"]
    assert cli(server, root, "--json", "members", "set", dom["id"], dave["id"], "--role", "admin",
               capsys=capsys)[0] == 0
    code, out, _ = cli(server, root, "--json", "members", "list", dom["id"], capsys=capsys)
    assert [m["user"]["name"] for m in json.loads(out)] == ["dave"]
    code, out, _ = cli(server, root, "--json", "pats", "create", "dave-key", "--user", dave["id"], "--scope",
                       "models:read", "--scope", "manage", "--days", "7", capsys=capsys)
    token = json.loads(out)["token"]
    monkeypatch.setenv("CUBE_TOKEN", token)                        # the token may come from the environment
    code = main(["--url", server.url, "--ca", str(server.cert_path), "--json", "whoami"])
    me = json.loads(capsys.readouterr().out)
    assert code == 0 and me["user"]["name"] == "dave" and me["memberships"] == {dom["id"]: "admin"}
    code, out, _ = cli(server, token, "--json", "pats", "list", capsys=capsys)
    listed = json.loads(out)
    assert token not in out and listed[0]["display"].endswith(token[-4:])
    code, out, _ = cli(server, token, "--json", "pats", "revoke", listed[0]["id"], capsys=capsys)
    assert code == 0
    code, _, err = cli(server, token, "--json", "whoami", capsys=capsys)
    assert code == 1 and "revoked" in err and "401" in err
    code, out, _ = cli(server, root, "users", "list", capsys=capsys)   # rich table output
    assert code == 0 and "dave" in out


def test_cli_pull_progress_and_remove(svc, capsys) -> None:
    server, world = svc
    root = world.tokens["superadmin"]
    code, out, _ = cli(server, root, "models", "pull", "ollama", "qwen2.5:0.5b", capsys=capsys)
    assert code == 0 and "success" in out
    code, out, _ = cli(server, root, "--json", "models", "list", capsys=capsys)
    assert "qwen2.5:0.5b" in [m["id"] for m in json.loads(out)]
    code, out, _ = cli(server, root, "--json", "models", "pull", "ollama", "nomic-embed-text:v1.5", capsys=capsys)
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and lines[-1] == {"status": "success"}
    code, out, _ = cli(server, root, "--json", "models", "pull", "ollama", "ghost:1b", capsys=capsys)
    assert code == 1 and "error" in json.loads(out.splitlines()[-1])
    code, out, _ = cli(server, root, "models", "pull", "ollama", "doesnotexist:1b", capsys=capsys)
    assert code == 1 and " ".join(out.split()).endswith(
        "pull failed: model 'doesnotexist:1b' not found on backend 'ollama': pull model manifest: file does not exist")
    assert cli(server, root, "models", "remove", "qwen2.5:0.5b", "--backend", "ollama", capsys=capsys)[0] == 0
    code, _, err = cli(server, root, "models", "remove", "qwen2.5:0.5b", capsys=capsys)
    assert code == 1 and "model_not_found" in err
    code, out, _ = cli(server, root, "--json", "backends", "list", capsys=capsys)
    assert {b["name"] for b in json.loads(out)} == {"ollama", "vllm"}


def test_cli_refuses_unsafe_options(capsys, monkeypatch) -> None:
    monkeypatch.delenv("CUBE_TOKEN", raising=False)
    assert main(["--url", "https://localhost:1", "whoami"]) == 1
    assert "no token" in capsys.readouterr().err
    assert main(["--url", "http://127.0.0.1:1", "--token", "t", "whoami"]) == 1
    assert "https" in capsys.readouterr().err
    assert main(["--url", "https://127.0.0.1:1", "--token", "t", "--policy", "/nonexistent.yaml", "whoami"]) == 1
    assert "--policy /nonexistent.yaml" in capsys.readouterr().err
    assert main(["--url", "https://127.0.0.1:1", "--token", "t", "--policy", "x.yaml", "--ca", "c.pem",
                 "whoami"]) == 1
    assert "exclude each other" in capsys.readouterr().err


def test_cli_verifies_the_enclave_before_sending_the_token(svc, capsys, tmp_path) -> None:
    """--policy: attested TLS first. The sim policy is accepted; a production policy refuses sim evidence."""
    from attestation.policy import sim_policy_yaml

    from tests.enclave.conftest import sim_provider

    server, world = svc
    sim_policy = tmp_path / "sim-policy.yaml"
    sim_policy.write_text(sim_policy_yaml(sim_provider().fingerprint))
    root = world.tokens["superadmin"]
    assert main(["--url", server.url, "--policy", str(sim_policy), "--token", root, "--json", "whoami"]) == 0
    assert json.loads(capsys.readouterr().out)["user"]["superadmin"] is True
    production = tmp_path / "snp.yaml"
    production.write_text('name: production\nplatforms: [snp]\nsnp: {measurements: ["' + "ab" * 48 + '"]}\n')
    assert main(["--url", server.url, "--policy", str(production), "--token", root, "whoami"]) == 1
    err = capsys.readouterr().err
    assert "not verified, nothing was sent" in err and "sim" in err
