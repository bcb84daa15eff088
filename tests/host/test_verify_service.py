"""POST /v1/verify and friends: every vector -> expected EAR status, signed EAR checks, error envelopes."""

from __future__ import annotations

import base64
import json
import os
import stat

import cbor2
import jwt
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.evidence import encode_cmw, evidence_to_json
from host.cli import main as cli_main
from host.ear import EAR_PROFILE, KEY_FILE, jwk_thumbprint, verify_ear
from host.verify_service import create_app
from tests.conftest import inside_validity
from tests.host.conftest import snp_evidence, tdx_evidence

# What the agent must conclude for each vector under the built-in default policy: it pins no measurement,
# so a genuine, accepted image is at most "warning" (test_ear.py has the measured policies that affirm).
SNP_EXPECTED = {
    "snp/virtee-sev--report_milan.hex": "warning",
    "snp/go-sev-guest--attestation.bin": "contraindicated",        # debug guest
    "snp/trustee--test-report.bin": "warning",
    "snp/trustee--test-vlek-report.bin": "warning",
}
TDX_EXPECTED = {
    "tdx/go-tdx-guest--tdx_prod_quote_SPR_E4.dat": "contraindicated",  # no matching TCB level (pcs-2023-06)
    "tdx/go-tdx-guest--quote_v5_sample.dat": "warning",                # pcs-2026-02 at 2026-02-03: UpToDate, unmeasured policy
    "tdx/go-tdx-guest--cos-113-tdx-quote.dat": "contraindicated",      # no Intel collateral: required by default
    "tdx/trustee--tdx_quote_4.dat": "contraindicated",                 # debug TD
    "tdx/trustee--tdx_quote_5.dat": "contraindicated",                 # no matching TCB level (pcs-2026-01)
    "tdx/trustee--tdx_quote_6.dat": "contraindicated",                 # no collateral
    "tdx/trustee--td-quote.bin": "contraindicated",                    # no collateral
}
NONCE = "0123456789abcdef0123456789abcdef"
CBOR = {"content-type": "application/cmw+cbor", "accept": "application/json"}


@pytest.fixture
def client(tmp_config):
    with TestClient(create_app(tmp_config()), raise_server_exceptions=False) as c:
        yield c


def _snp_at(entry: dict) -> str:
    return inside_validity(entry["vek_not_before"]).isoformat()


def _tdx_at(entry: dict) -> str:
    evaluation = entry.get("tcb_evaluation")
    return evaluation["at"] if evaluation else inside_validity(entry["pck_not_before"]).isoformat()


def test_expected_table_covers_every_vector(expected) -> None:
    assert set(SNP_EXPECTED) == {e["report"] for e in expected["snp"]}
    assert set(TDX_EXPECTED) == {e["quote"] for e in expected["tdx"]}


@pytest.mark.parametrize("encoding", ["cbor", "json"])
def test_every_vector_gives_the_expected_ear_status(client, vectors_dir, expected, encoding) -> None:
    jwks = client.get("/.well-known/jwks.json").json()
    cases = [(snp_evidence(vectors_dir, e), _snp_at(e), SNP_EXPECTED[e["report"]], e["report"]) for e in expected["snp"]]
    cases += [(tdx_evidence(vectors_dir, e), _tdx_at(e), TDX_EXPECTED[e["quote"]], e["quote"]) for e in expected["tdx"]]
    for evidence, at, want, name in cases:
        if encoding == "cbor":
            r = client.post("/v1/verify", params={"at": at, "nonce": NONCE}, content=encode_cmw(evidence), headers=CBOR)
        else:
            r = client.post("/v1/verify", json={"evidence": evidence_to_json(evidence), "at": at, "nonce": NONCE,
                                                "policy": "default"}, headers={"accept": "application/json"})
        assert r.status_code == 200, (name, r.text)
        body = r.json()
        assert body["status"] == want, (name, body)
        claims = verify_ear(body["ear"], jwks)
        submod = claims["submods"]["cpu0"]
        assert submod["ear.status"] == want, name
        assert claims["eat_nonce"] == NONCE
        assert claims["eat_profile"] == EAR_PROFILE
        assert submod["ear.appraisal-policy-id"] == "cube-ai:policy:default"
        assert submod["ear.cube-ai.claims"]["platform"] == evidence.platform
        vector = submod["ear.trustworthiness-vector"]
        if want == "warning" and name in ("snp/virtee-sev--report_milan.hex", "tdx/go-tdx-guest--quote_v5_sample.dat"):
            # the SNP vector carries no AMD CRL: revocation unknown, so hardware is a warning (32)
            assert vector["instance-identity"] == 2 and vector["hardware"] == (32 if name.startswith("snp/") else 2)
            assert vector["executables"] == 0  # the default policy pins no measurement
        if want == "contraindicated":
            assert 96 in vector.values() or 99 in vector.values()


def test_ear_claims_shape_and_raw_jwt_response(client, vectors_dir, expected) -> None:
    entry = next(e for e in expected["tdx"] if e["quote"].endswith("quote_v5_sample.dat"))
    r = client.post("/v1/verify", params={"at": _tdx_at(entry), "nonce": NONCE},
                    content=encode_cmw(tdx_evidence(vectors_dir, entry)),
                    headers={"content-type": "application/cmw+cbor"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/eat+jwt")
    token = r.text
    header = jwt.get_unverified_header(token)
    jwks = client.get("/.well-known/jwks.json").json()
    assert header["alg"] == "ES256" and header["kid"] == jwks["keys"][0]["kid"]
    assert jwks["keys"][0]["kid"] == jwk_thumbprint(jwks["keys"][0])
    claims = verify_ear(token, jwks)
    assert set(claims) >= {"eat_profile", "iat", "exp", "ear.verifier-id", "eat_nonce", "submods"}
    assert claims["exp"] - claims["iat"] == 300  # the default lifetime
    assert claims["ear.verifier-id"] == {"developer": "cube-ai", "build": "cube-host 0.1.0"}
    cube = claims["submods"]["cpu0"]["ear.cube-ai.claims"]
    assert cube["tcb_status"] == "UpToDate"
    assert cube["evidence"]["mrtd"] == entry["mrtd"]
    assert claims["submods"]["cpu0"]["ear.trustworthiness-vector"] == {
        "instance-identity": 2, "hardware": 2, "configuration": 2, "executables": 0}


def test_ear_fails_verification_after_a_one_byte_change(client, vectors_dir, expected) -> None:
    entry = expected["snp"][0]
    r = client.post("/v1/verify", params={"at": _snp_at(entry)}, content=encode_cmw(snp_evidence(vectors_dir, entry)),
                    headers={"content-type": "application/cmw+cbor"})
    token = r.text
    jwks = client.get("/.well-known/jwks.json").json()
    assert verify_ear(token, jwks)["submods"]["cpu0"]["ear.status"] == "warning"
    head, payload, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    raw[raw.index(b"warning")] ^= 0x01  # one byte of the claims
    forged = ".".join([head, base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode(), sig])
    with pytest.raises(jwt.InvalidSignatureError):
        verify_ear(forged, jwks)
    sig_raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    sig_raw[10] ^= 0x01  # one byte of the signature
    with pytest.raises(jwt.InvalidSignatureError):
        verify_ear(".".join([head, payload, base64.urlsafe_b64encode(bytes(sig_raw)).rstrip(b"=").decode()]), jwks)


def test_signing_key_is_persisted_0600_and_reused(tmp_config) -> None:
    config = tmp_config()
    with TestClient(create_app(config)) as c1:
        kid1 = c1.get("/.well-known/jwks.json").json()["keys"][0]["kid"]
    key_path = config.data_dir / KEY_FILE
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    with TestClient(create_app(config)) as c2:
        assert c2.get("/.well-known/jwks.json").json()["keys"][0]["kid"] == kid1


def test_policies_are_listed_and_selected_by_name(tmp_path, tmp_config, vectors_dir, expected) -> None:
    strict = tmp_path / "strict.yaml"
    strict.write_text("name: strict\nplatforms: [snp]\nsnp:\n  measurements: [\"" + "00" * 48 + "\"]\n")
    config = tmp_config(policies={"default": "builtin:default", "strict": str(strict)})
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        listed = c.get("/v1/policies").json()
        assert [p["name"] for p in listed["data"]] == ["default", "strict"]
        assert listed["data"][1]["policy"]["platforms"] == ["snp"]
        entry = expected["snp"][0]
        r = c.post("/v1/verify", params={"at": _snp_at(entry), "policy": "strict"},
                   content=encode_cmw(snp_evidence(vectors_dir, entry)), headers=CBOR)
        assert r.json()["status"] == "contraindicated"  # measurement not in the allowlist
        vector = verify_ear(r.json()["ear"], c.get("/.well-known/jwks.json").json())["submods"]["cpu0"][
            "ear.trustworthiness-vector"]
        assert vector["executables"] == 96 and vector["instance-identity"] == 2
        r = c.post("/v1/verify", params={"policy": "nope"}, content=encode_cmw(snp_evidence(vectors_dir, entry)),
                   headers=CBOR)
        assert r.status_code == 404 and r.json()["error"]["code"] == "policy_not_found"


def test_bad_requests_get_4xx_envelopes(client, tmp_config, vectors_dir, expected) -> None:
    good = encode_cmw(snp_evidence(vectors_dir, expected["snp"][0]))

    def check(r, status: int, code: str) -> None:
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == code and err["message"] and "type" in err and "param" in err

    check(client.post("/v1/verify", content=b"\xa0", headers=CBOR), 400, "invalid_evidence")
    check(client.post("/v1/verify", content=b"", headers=CBOR), 400, "invalid_evidence")
    check(client.post("/v1/verify", content=good, headers={"content-type": "text/plain"}), 415,
          "unsupported_media_type")
    check(client.post("/v1/verify", content=b"x" * (600 * 1024), headers=CBOR), 413, "body_too_large")
    check(client.post("/v1/verify", params={"nonce": "short"}, content=good, headers=CBOR), 400, "invalid_nonce")
    check(client.post("/v1/verify", params={"bogus": "1"}, content=good, headers=CBOR), 400, "invalid_query")
    check(client.post("/v1/verify", content=b"[1,2]", headers={"content-type": "application/json"}), 400,
          "invalid_json")
    check(client.post("/v1/verify", content=b"{nope", headers={"content-type": "application/json"}), 400,
          "invalid_json")
    check(client.post("/v1/verify", json={"evidence": {}, "extra": 1}), 400, "invalid_request")
    check(client.post("/v1/verify", json={"policy": "default"}), 400, "invalid_evidence")
    check(client.post("/v1/verify", json={"evidence": {"v": 1, "platform": "snp", "report": "!!"}}), 400,
          "invalid_evidence")
    check(client.post("/v1/verify", params={"at": "yesterday"}, content=good, headers=CBOR), 400, "invalid_time")
    check(client.get("/v1/nothing"), 404, "not_found")
    with TestClient(create_app(tmp_config(verify={"allow_time_override": False})), raise_server_exceptions=False) as c:
        check(c.post("/v1/verify", params={"at": "2024-01-01T00:00:00Z"}, content=good, headers=CBOR), 400,
              "time_override_disabled")


def test_unparseable_report_inside_valid_cmw_is_contraindicated(client) -> None:
    from attestation.evidence import Evidence

    for platform in ("snp", "tdx"):
        r = client.post("/v1/verify", content=encode_cmw(Evidence(platform=platform, report=b"\x00" * 100)),
                        headers=CBOR)
        assert r.status_code == 200 and r.json()["status"] == "contraindicated"
    # sim evidence under a policy that does not allow sim: refused, not an error
    r = client.post("/v1/verify", content=encode_cmw(Evidence(platform="sim", report=b"\x01" * 1184)), headers=CBOR)
    assert r.json()["status"] == "contraindicated"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=2048))
def test_fuzz_cbor_body_never_500(client, body: bytes) -> None:
    r = client.post("/v1/verify", content=body, headers=CBOR)
    assert r.status_code in (200, 400), r.text


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(evidence=st.dictionaries(st.sampled_from(["v", "platform", "report", "certificates", "collateral",
                                                  "product", "binding", "media_type", "x"]), _json_values, max_size=6),
       extra=st.dictionaries(st.sampled_from(["policy", "nonce", "at", "report_data"]), _json_values, max_size=3))
def test_fuzz_json_body_never_500(client, evidence, extra) -> None:
    r = client.post("/v1/verify", json={"evidence": evidence, **extra})
    assert r.status_code in (200, 400, 404), r.text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_real_evidence_never_500(client, vectors_dir, expected, data) -> None:
    entry = expected["snp"][0]
    payload = bytearray(encode_cmw(snp_evidence(vectors_dir, entry)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    r = client.post("/v1/verify", params={"at": _snp_at(entry)}, content=bytes(payload), headers=CBOR)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200 and bytes(payload) != encode_cmw(snp_evidence(vectors_dir, entry)):
        # a changed byte in the signed report or a certificate is never affirmed... unless it hit unsigned padding
        assert r.json()["status"] in ("warning", "contraindicated")


def test_health_ready_metrics(client, vectors_dir, expected) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    entry = expected["snp"][1]  # debug guest -> contraindicated
    client.post("/v1/verify", params={"at": _snp_at(entry)}, content=encode_cmw(snp_evidence(vectors_dir, entry)),
                headers=CBOR)
    text = client.get("/metrics").text
    assert 'cube_host_verify_results_total{policy="default",status="contraindicated"}' in text
    assert "cube_host_relay_bytes_total" in text


def test_status_command_reports_last_verification(tmp_config, vectors_dir, expected, capsys) -> None:
    config = tmp_config()
    assert cli_main(["status", "--data-dir", str(config.data_dir)]) == 0
    assert "nothing verified yet" in capsys.readouterr().out
    with TestClient(create_app(config)) as c:
        for entry in expected["snp"][:2]:
            c.post("/v1/verify", params={"at": _snp_at(entry), "nonce": NONCE},
                   content=encode_cmw(snp_evidence(vectors_dir, entry)), headers=CBOR)
    assert cli_main(["status", "--data-dir", str(config.data_dir), "--policy", "default", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["ear_status"] for r in rows] == ["contraindicated", "warning"]  # newest first
    assert rows[1]["enclave"] == "snp:" + expected["snp"][0]["measurement"]
    assert rows[0]["nonce"] == NONCE and rows[0]["at"]
    enclave = rows[1]["enclave"]
    assert cli_main(["status", "--data-dir", str(config.data_dir), "--enclave", enclave]) == 0
    assert "warning" in capsys.readouterr().out
    assert cli_main(["status", "--data-dir", str(config.data_dir), "--policy", "other"]) == 1


def test_simulated_evidence_under_a_sim_policy(tmp_path, tmp_config) -> None:
    from attestation.policy import sim_policy_yaml
    from attestation.providers import SimProvider
    from attestation.sim import SIM_MEASUREMENT

    provider = SimProvider(tmp_path / "sim")
    policy_file = tmp_path / "sim.yaml"
    # the sim's launch digest pinned as if measured with kernel hashes: still no hardware measured it
    policy_file.write_text(sim_policy_yaml(provider.fingerprint)
                           + f"  measurements: [{{measurement: '{SIM_MEASUREMENT.hex()}', kernel_hashes: true}}]\n")
    config = tmp_config(policies={"default": "builtin:default", "sim": str(policy_file)})
    report_data = bytes(range(64))
    evidence = encode_cmw(provider.get_evidence(report_data))
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        ok = c.post("/v1/verify", params={"policy": "sim", "report_data": report_data.hex()}, content=evidence,
                    headers=CBOR).json()
        assert ok["status"] == "warning", ok  # simulated evidence is never measured, whatever the policy pins
        wrong = c.post("/v1/verify", params={"policy": "sim", "report_data": "00" * 64}, content=evidence,
                       headers=CBOR).json()
        assert wrong["status"] == "contraindicated"  # REPORT_DATA not the one the caller expected
        # The default policy (AMD roots only) never vouches for simulated evidence.
        assert c.post("/v1/verify", content=evidence, headers=CBOR).json()["status"] == "contraindicated"
