"""cube-attest: JSON shape and exit codes on the real vectors (accepted, refused, input error)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from attestation.cli import main
from attestation.evidence import SNP_CRL_FILE, Evidence, encode_cmw, evidence_to_json

KEYS = {"ok", "platform", "product", "status", "claims", "checks", "error"}


def run(capsys, *argv: str) -> tuple[int, dict]:
    code = main(list(argv))
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, out  # exactly one JSON object
    doc = json.loads(lines[0])
    assert set(doc) == KEYS
    for check in doc["checks"]:
        assert set(check) == {"name", "ok", "detail"}
    return code, doc


def snp_args(vectors_dir: Path, entry: dict) -> list[str]:
    return [str(vectors_dir / entry["report"]), "--vek", str(vectors_dir / entry["vek"]),
            "--chain", str(vectors_dir / entry["ask_ark"])]


def _entry(expected, kind, suffix):
    return next(e for e in expected[kind] if e.get("report", e.get("quote", "")).endswith(suffix))


def test_verify_report_accepted_hex_input(capsys, vectors_dir, expected):
    entry = _entry(expected, "snp", "report_milan.hex")
    code, doc = run(capsys, "verify-report", *snp_args(vectors_dir, entry), "--at", "2023-04-05T00:00:00Z", "--json")
    assert code == 0 and doc["ok"] and doc["status"] == "verified" and doc["error"] is None
    assert doc["platform"] == "snp" and doc["product"] == "Milan"
    for key in ("measurement", "report_data", "reported_tcb", "chip_id", "policy", "cpuid_fam_mod_step"):
        assert doc["claims"][key] == entry[key]


def test_verify_report_debug_guest_refused(capsys, vectors_dir, expected):
    entry = _entry(expected, "snp", "attestation.bin")
    code, doc = run(capsys, "verify-report", *snp_args(vectors_dir, entry), "--at", "2022-09-26T00:00:00Z", "--json")
    assert code == 1 and not doc["ok"] and doc["status"] == "refused"
    assert [c["name"] for c in doc["checks"] if not c["ok"]] == ["debug_disabled"]


def test_verify_report_expired_is_refused(capsys, vectors_dir, expected):
    entry = _entry(expected, "snp", "test-vlek-report.bin")
    code, doc = run(capsys, "verify-report", *snp_args(vectors_dir, entry), "--at", "2026-01-01T00:00:00Z", "--json")
    assert code == 1 and doc["status"] == "invalid"


def test_verify_report_with_policy(capsys, vectors_dir, expected, tmp_path):
    entry = _entry(expected, "snp", "test-report.bin")
    policy = tmp_path / "p.yaml"
    policy.write_text(f"snp:\n  allow_smt: true\n  measurements: ['{entry['measurement']}']\n  vmpl: 0\n")
    code, doc = run(capsys, "verify-report", *snp_args(vectors_dir, entry), "--at", "2023-01-26T00:00:00Z",
                    "--policy", str(policy), "--json")
    assert code == 0, doc["error"]
    policy.write_text("snp:\n  allow_smt: true\n  vmpl: 2\n")
    code, doc = run(capsys, "verify-report", *snp_args(vectors_dir, entry), "--at", "2023-01-26T00:00:00Z",
                    "--policy", str(policy), "--json")
    assert code == 1 and "vmpl" in doc["error"]


@pytest.mark.parametrize("problem", ["missing", "garbage", "bad-policy", "bad-at", "no-certs", "bad-cert",
                                     "bad-crl"])
def test_verify_report_input_errors(capsys, vectors_dir, expected, tmp_path, problem):
    entry = _entry(expected, "snp", "report_milan.hex")
    args = snp_args(vectors_dir, entry) + ["--at", "2023-04-05T00:00:00Z", "--json"]
    if problem == "missing":
        args[0] = str(tmp_path / "nope.bin")
    elif problem == "garbage":
        (tmp_path / "g.bin").write_bytes(b"\x01" * 100)
        args[0] = str(tmp_path / "g.bin")
    elif problem == "bad-policy":
        (tmp_path / "p.yaml").write_text("snp:\n  allow_debugg: true\n")
        args += ["--policy", str(tmp_path / "p.yaml")]
    elif problem == "bad-at":
        args[args.index("--at") + 1] = "yesterday"
    elif problem == "no-certs":
        args = [args[0], "--json"]
    elif problem == "bad-cert":
        (tmp_path / "c.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        args[args.index("--vek") + 1] = str(tmp_path / "c.pem")
    elif problem == "bad-crl":
        (tmp_path / "crl.der").write_bytes(b"\x30\x03\x02\x01\x00")
        args += ["--crl", str(tmp_path / "crl.der")]
    code, doc = run(capsys, "verify-report", *args)
    assert code == 2 and not doc["ok"] and doc["error"]
    if problem == "bad-policy":
        assert "snp.allow_debugg" in doc["error"]
    if problem == "bad-crl":
        assert "--crl" in doc["error"]


def test_verify_report_checks_a_given_crl(capsys, tmp_path, sim_platform, sim_dir):
    """--crl: the ASK must not be on the ARK's CRL (here the simulated chain's, revoking its ASK)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from tests.attestation.test_verifier import _sim_crl

    report, certs = sim_platform.report(bytes(64))
    (tmp_path / "report.bin").write_bytes(report)
    (tmp_path / "vcek.der").write_bytes(certs[0])
    chain_pem = b"".join(x509.load_der_x509_certificate(c).public_bytes(Encoding.PEM) for c in certs[1:])
    (tmp_path / "chain.pem").write_bytes(chain_pem)
    (tmp_path / "policy.yaml").write_text(f"platforms: [sim]\nsim_root_fingerprint: \"{sim_platform.fingerprint}\"\n")
    (tmp_path / "crl.der").write_bytes(_sim_crl(sim_dir, sim_platform, revoke_ask=True))
    base = ["verify-report", str(tmp_path / "report.bin"), "--vek", str(tmp_path / "vcek.der"), "--chain",
            str(tmp_path / "chain.pem"), "--policy", str(tmp_path / "policy.yaml"), "--json"]
    code, doc = run(capsys, *base)
    assert code == 0, doc["error"]
    code, doc = run(capsys, *base, "--crl", str(tmp_path / "crl.der"))
    assert code == 1 and "revoked" in doc["error"]


def test_verify_quote_v5_up_to_date(capsys, vectors_dir, expected):
    entry = _entry(expected, "tdx", "quote_v5_sample.dat")
    code, doc = run(capsys, "verify-quote", str(vectors_dir / entry["quote"]),
                    "--collateral", str(vectors_dir / "tdx/collateral/pcs-2026-02"),
                    "--at", "2026-02-03T00:00:00Z", "--json")
    assert code == 0, doc["error"]
    assert doc["ok"] and doc["status"] == "UpToDate" and doc["platform"] == "tdx"
    for key in ("mrtd", "rtmr0", "rtmr1", "report_data", "tee_tcb_svn", "fmspc", "mrservicetd"):
        assert doc["claims"][key] == entry[key]


def test_verify_quote_refused_and_errors(capsys, vectors_dir, expected, tmp_path):
    debug = _entry(expected, "tdx", "tdx_quote_4.dat")
    code, doc = run(capsys, "verify-quote", str(vectors_dir / debug["quote"]), "--at", "2023-02-08T08:02:55Z", "--json")
    # Without --collateral the default policy also misses the Intel collateral it requires.
    assert code == 1 and [c["name"] for c in doc["checks"] if not c["ok"]] == ["debug_disabled", "collateral_present"]
    no_level = _entry(expected, "tdx", "tdx_quote_5.dat")
    code, doc = run(capsys, "verify-quote", str(vectors_dir / no_level["quote"]),
                    "--collateral", str(vectors_dir / "tdx/collateral/pcs-2026-01"), "--at", "2026-01-20T00:00:00Z", "--json")
    assert code == 1 and doc["status"] == "invalid"
    (tmp_path / "q.dat").write_bytes(b"\x05\x00" * 50)
    code, doc = run(capsys, "verify-quote", str(tmp_path / "q.dat"), "--json")
    assert code == 2
    code, doc = run(capsys, "verify-quote", str(vectors_dir / debug["quote"]), "--collateral", str(tmp_path), "--json")
    assert code == 2  # a directory without collateral


def test_verify_evidence_cbor_and_json(capsys, tmp_path, sim_platform, sim_dir):
    report, certs = sim_platform.report(bytes(64))
    # the sim-fingerprint policy requires the CRL (snp.require_crl), which the sim issues itself
    evidence = Evidence("sim", report, tuple(certs), product="Sim", collateral={SNP_CRL_FILE: sim_platform.crl()})
    (tmp_path / "e.cbor").write_bytes(encode_cmw(evidence))
    (tmp_path / "e.json").write_text(json.dumps(evidence_to_json(evidence)))
    policy = tmp_path / "sim.yaml"
    assert main(["sim-fingerprint", "--dir", str(sim_dir)]) == 0
    policy.write_text(capsys.readouterr().out)
    for name in ("e.cbor", "e.json"):
        code, doc = run(capsys, "verify-evidence", str(tmp_path / name), "--policy", str(policy), "--json")
        assert code == 0 and doc["platform"] == "sim" and doc["status"] == "verified", doc["error"]
        code, doc = run(capsys, "verify-evidence", str(tmp_path / name), "--json")  # default policy: no sim
        assert code == 1 and doc["status"] == "refused"
    (tmp_path / "bad.cbor").write_bytes(b"\xa0")
    code, doc = run(capsys, "verify-evidence", str(tmp_path / "bad.cbor"), "--json")
    assert code == 2
    (tmp_path / "bad.json").write_text("{nope")
    code, doc = run(capsys, "verify-evidence", str(tmp_path / "bad.json"), "--json")
    assert code == 2


def test_sim_commands(capsys, tmp_path, sim_platform, sim_dir):
    assert main(["sim-fingerprint", "--dir", str(tmp_path / "none")]) == 2
    capsys.readouterr()
    assert main(["sim-fingerprint", "--dir", str(sim_dir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fingerprint"] == sim_platform.fingerprint
    assert sim_platform.fingerprint in doc["policy_yaml"]
    assert main(["sim-init", "--dir", str(sim_dir)]) == 0
    assert sim_platform.fingerprint in capsys.readouterr().out


def test_human_output_and_usage(capsys, vectors_dir, expected):
    entry = _entry(expected, "snp", "report_milan.hex")
    assert main(["verify-report", *snp_args(vectors_dir, entry), "--at", "2023-04-05T00:00:00Z"]) == 0
    out = capsys.readouterr().out
    assert "report_signature" in out and "ACCEPTED" in out
    assert main([]) == 2
    assert main(["verify-report"]) == 2
    assert main(["frobnicate"]) == 2


def test_verify_url_registered(capsys, monkeypatch):
    import types

    seen = {}
    fake = types.ModuleType("attestation.atls.cli")

    def verify_url_command(args):
        seen.update(vars(args))
        return 1

    fake.verify_url_command = verify_url_command
    monkeypatch.setitem(sys.modules, "attestation.atls.cli", fake)
    assert main(["verify-url", "https://127.0.0.1:8443", "--policy", "p.yaml", "--json"]) == 1
    assert seen["url"] == "https://127.0.0.1:8443" and seen["policy"] == "p.yaml" and seen["json"] is True


def test_console_script_subprocess(vectors_dir, expected):
    script = Path(sys.executable).parent / "cube-attest"
    assert script.exists(), "cube-attest console script missing: install the project (./dev test does pip install -e .)"
    entry = _entry(expected, "tdx", "quote_v5_sample.dat")
    proc = subprocess.run(
        [str(script), "verify-quote", str(vectors_dir / entry["quote"]), "--collateral",
         str(vectors_dir / "tdx/collateral/pcs-2026-02"), "--at", "2026-02-03T00:00:00Z", "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == KEYS and doc["status"] == "UpToDate"
