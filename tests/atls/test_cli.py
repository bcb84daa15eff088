"""cube-attest verify-url (attestation.atls.cli.verify_url_command)."""

from __future__ import annotations

import argparse
import io
import json

from attestation.atls.cli import verify_url_command
from attestation.policy import sim_policy_yaml

from .conftest import bind_loopback


def run(url: str, policy: str | None = None, as_json: bool = True) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = verify_url_command(argparse.Namespace(url=url, policy=policy, json=as_json), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_accepts_a_live_sim_enclave_with_the_sim_policy(make_server, sim_provider, tmp_path):
    server = make_server()
    policy = tmp_path / "sim.yaml"
    policy.write_text(sim_policy_yaml(sim_provider.fingerprint))
    code, out, _ = run(server.url, str(policy))
    assert code == 0
    doc = json.loads(out)
    assert set(doc) == {"ok", "platform", "product", "status", "claims", "checks", "error", "spki_sha256"}
    assert doc["ok"] is True and doc["platform"] == "sim" and doc["error"] is None
    assert doc["spki_sha256"] == server.tls.current.spki_sha256
    names = [c["name"] for c in doc["checks"]]
    assert names[:8] == ["certificate", "certificate_evidence", "certificate_appraisal", "certificate_binding",
                         "nonce_roundtrip", "nonce_appraisal", "nonce_binding", "pinned"]
    assert all(c["ok"] for c in doc["checks"])
    code, text, _ = run(server.url, str(policy), as_json=False)
    assert code == 0 and "ACCEPTED" in text and server.tls.current.spki_sha256 in text


def test_refuses_sim_under_the_default_policy(make_server):
    server = make_server()
    code, out, _ = run(server.url)
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False and "certificate_appraisal" in doc["error"]
    assert doc["status"] == "refused" and doc["claims"] == {}
    assert any(c["name"] == "certificate_appraisal" and not c["ok"] for c in doc["checks"])
    assert any(c["name"].startswith("evidence.") and not c["ok"] for c in doc["checks"])


def test_usage_errors_exit_2(tmp_path):
    assert run("http://127.0.0.1:1")[0] == 2
    assert run("not a url")[0] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("platforms: [sim]\n")  # sim without a root fingerprint
    code, _, err = run("https://127.0.0.1:1", str(bad))
    assert code == 2 and "sim_root_fingerprint" in err
    assert run("https://127.0.0.1:1", str(tmp_path / "missing.yaml"))[0] == 2


def test_unreachable_endpoint_is_a_refusal():
    sock = bind_loopback()
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there any more
    code, out, _ = run(f"https://127.0.0.1:{port}")
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False and doc["error"].startswith("connect")


def test_cube_attest_dispatches_verify_url(make_server, sim_provider, tmp_path, capsys):
    from attestation.cli import main

    server = make_server()
    policy = tmp_path / "sim.yaml"
    policy.write_text(sim_policy_yaml(sim_provider.fingerprint))
    assert main(["verify-url", server.url, "--policy", str(policy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["spki_sha256"] == server.tls.current.spki_sha256
    assert main(["verify-url", server.url, "--json"]) == 1
