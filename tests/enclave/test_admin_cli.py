"""cube-admin against the running service over HTTPS: --json everywhere, pull progress, clean errors."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from attestation.policy import sim_policy_yaml
from enclave.admin_cli import main

from tests.enclave.conftest import EnclaveServer, FakeClock, World, make_settings, sim_provider
from tests.enclave.test_service import backends, start_service
from tests.fakes.ollama import FakeOllama
from tests.fakes.vllm import FakeVllm


@pytest.fixture
def svc(tmp_path) -> Iterator[tuple[EnclaveServer, World]]:
    with FakeOllama() as ollama, FakeVllm() as vllm:
        server, world = start_service(make_settings(tmp_path, backends=backends(ollama, vllm)), FakeClock())
        policy = tmp_path / "sim-policy.yaml"
        policy.write_text(sim_policy_yaml(sim_provider().fingerprint))
        server.policy_path = policy
        try:
            yield server, world
        finally:
            server.stop()


def cli(server: EnclaveServer, token: str, *args: str, capsys) -> tuple[int, str, str]:
    """cube-admin over attested TLS, as a user runs it against `./dev serve`."""
    code = main(["--url", server.url, "--policy", str(server.policy_path), "--token", token, *args])
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
    code = main(["--url", server.url, "--policy", str(server.policy_path), "--json", "whoami"])
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
    assert "--policy excludes --ca" in capsys.readouterr().err


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
    production.write_text('name: production\nplatforms: [snp]\nsnp: {measurements: [{measurement: "' + "ab" * 48
                          + '", kernel_hashes: true}]}\n')
    assert main(["--url", server.url, "--policy", str(production), "--token", root, "whoami"]) == 1
    err = capsys.readouterr().err
    assert "not verified, nothing was sent" in err and "sim" in err


def test_cli_never_sends_the_token_without_attestation_unless_told(capsys, monkeypatch) -> None:
    """Item 7: without --policy cube-admin used to fall back to WebPKI TLS and send the token to whoever holds
    a certificate for the name. Now it refuses before connecting at all."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.3)
    url = f"https://127.0.0.1:{listener.getsockname()[1]}"
    try:
        assert main(["--url", url, "--token", "cube_pat_secret", "whoami"]) == 1
        err = capsys.readouterr().err
        assert "--policy" in err and "--insecure-no-attestation" in err
        assert main(["--url", url, "--token", "cube_pat_secret", "--ca", "some.pem", "whoami"]) == 1
        assert "--insecure-no-attestation" in capsys.readouterr().err
        with pytest.raises(TimeoutError):
            listener.accept()                                         # nobody ever connected
    finally:
        listener.close()


def test_cli_insecure_opt_in_warns_and_ignores_proxies(svc, capsys, monkeypatch) -> None:
    """The explicit opt-in works, warns on stderr, and neither mode honours *_PROXY (a proxy that does not
    exist would fail the request if it were used)."""
    server, world = svc
    dead = socket.create_server(("127.0.0.1", 0))
    dead_proxy = f"http://127.0.0.1:{dead.getsockname()[1]}"
    dead.close()
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    root = world.tokens["superadmin"]
    code = main(["--url", server.url, "--insecure-no-attestation", "--ca", str(server.cert_path), "--token", root,
                 "--json", "whoami"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert json.loads(out.out)["user"]["superadmin"] is True
    assert "WARNING" in out.err and "not verified" in out.err
    code, out, err = cli(server, root, "--json", "whoami", capsys=capsys)
    assert code == 0 and "WARNING" not in err


def test_cli_keys_by_id_names_and_member_model_view(svc, capsys, monkeypatch) -> None:
    """Items 20-22: a superadmin revokes anyone's key by id alone; `pats create --user` prints the id; names
    work where ids do; tables keep whole ids on a narrow terminal; a member lists its own models."""
    server, world = svc
    root = world.tokens["superadmin"]
    code, out, _ = cli(server, root, "pats", "create", "laptop", "--user", "user-member_a", "--scope",
                       "models:read", capsys=capsys)
    assert code == 0
    new_id = next(w for w in out.split() if len(w) == 36 and w.count("-") == 4)
    code, out, _ = cli(server, root, "--json", "pats", "show", new_id, capsys=capsys)
    assert code == 0 and json.loads(out)["issued_by"] == world.users["superadmin"]
    victim = world.pat_ids["member_a"]
    code, out, err = cli(server, root, "pats", "revoke", victim, capsys=capsys)
    assert code == 0, err
    code, out, err = cli(server, world.tokens["member_a"], "whoami", capsys=capsys)
    assert code == 1 and "revoked" in err
    monkeypatch.setenv("COLUMNS", "60")
    code, out, _ = cli(server, root, "pats", "list", "--user", "user-member_a", capsys=capsys)
    assert code == 0 and "…" not in out
    assert new_id in out and victim in out and world.users["superadmin"] in out   # issued_by, whole
    code, out, _ = cli(server, root, "members", "set", "domain-a", "user-nonmember", capsys=capsys)
    assert code == 0 and json.loads(out)["user"]["id"] == world.users["nonmember"]
    code, out, _ = cli(server, root, "members", "list", "domain-a", capsys=capsys)
    assert code == 0 and world.users["nonmember"] in out and "…" not in out
    code, out, err = cli(server, world.tokens["allow_a"], "--json", "models", "list", "--domain", "domain-a",
                         capsys=capsys)
    assert code == 0, err
    assert [m["id"] for m in json.loads(out)] == ["llama3.2:3b"]
    code, _, err = cli(server, world.tokens["allow_a"], "models", "list", capsys=capsys)
    assert code == 1 and "not_superadmin" in err
