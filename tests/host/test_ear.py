"""EAR status and expiry (item 11): "affirming" only under a measured policy with every check passed; at most
"warning" without a measurement; ``exp`` always set, configurable, and checked by verify_ear."""

from __future__ import annotations

import time

import jwt
import pytest
from fastapi.testclient import TestClient

from attestation.evidence import encode_cmw
from attestation.policy import DEFAULT_POLICY, policy_from_yaml
from attestation.verdict import Check, Verdict
from attestation.verifier import verify_evidence
from host.ear import AFFIRMING, CONTRAINDICATED, WARNING, EarSigner, build_ear, ear_status, verify_ear
from host.verify_service import create_app
from tests.conftest import inside_validity, parse_when
from tests.host.conftest import snp_evidence, tdx_evidence

CBOR = {"content-type": "application/cmw+cbor", "accept": "application/json"}


def _entry(expected: dict, kind: str, name: str) -> dict:
    return next(e for e in expected[kind] if e["report" if kind == "snp" else "quote"].endswith(name))


def _tdx_policy(entry: dict, rtmrs: tuple[str, ...] = ("rtmr0", "rtmr1", "rtmr2")) -> str:
    pins = ", ".join([f"mrtd: '{entry['mrtd']}'"] + [f"{r}: '{entry[r]}'" for r in rtmrs])
    return f"name: tdx-measured\nplatforms: [tdx]\ntdx:\n  require_collateral: true\n  measurements: [{{{pins}}}]\n"


def _snp_policy(entry: dict, kernel_hashes: bool) -> str:
    return (f"name: snp-measured\nplatforms: [snp]\nsnp:\n  allow_smt: true\n  measurements: "
            f"[{{measurement: '{entry['measurement']}', kernel_hashes: {str(kernel_hashes).lower()}}}]\n")


def test_real_tdx_quote_is_affirmed_only_under_a_measured_policy(vectors_dir, expected):
    entry = _entry(expected, "tdx", "quote_v5_sample.dat")
    evidence, at = tdx_evidence(vectors_dir, entry), parse_when(entry["tcb_evaluation"]["at"])
    for text, want in ((_tdx_policy(entry), AFFIRMING),
                       (_tdx_policy(entry, ()), WARNING),                 # MRTD only: firmware, not the OS
                       (_tdx_policy(entry, ("rtmr0", "rtmr1")), WARNING)):
        policy = policy_from_yaml(text)
        verdict = verify_evidence(evidence, policy=policy, at=at)
        assert verdict.ok and verdict.status == "UpToDate", verdict.error
        assert ear_status(verdict, policy) == want, text
    # the built-in default policy (nothing measured) used to affirm any genuine UpToDate image
    verdict = verify_evidence(evidence, policy=DEFAULT_POLICY, at=at)
    assert verdict.ok and ear_status(verdict, DEFAULT_POLICY) == WARNING
    assert ear_status(verdict, None) == WARNING


def test_real_snp_report_is_affirmed_only_with_kernel_hashes(vectors_dir, expected):
    entry = _entry(expected, "snp", "report_milan.hex")
    evidence, at = snp_evidence(vectors_dir, entry), inside_validity(entry["vek_not_before"])
    for kernel_hashes, want in ((True, AFFIRMING), (False, WARNING)):
        policy = policy_from_yaml(_snp_policy(entry, kernel_hashes))
        verdict = verify_evidence(evidence, policy=policy, at=at)
        assert verdict.ok, verdict.error
        # the vector carries no AMD CRL: revocation unknown, so at most warning (hardware warning too)
        assert not verdict.revocation_checked and ear_status(verdict, policy) == WARNING
        vector = build_ear(verdict, policy_name="p", nonce=None, developer="d", build="b",
                           policy=policy)["submods"]["cpu0"]["ear.trustworthiness-vector"]
        assert vector["hardware"] == 32
        verdict.revocation_checked = True  # as verification sets it when a current CRL covered the ASK
        assert ear_status(verdict, policy) == want
        claims = build_ear(verdict, policy_name="p", nonce=None, developer="d", build="b", policy=policy)
        vector = claims["submods"]["cpu0"]["ear.trustworthiness-vector"]
        assert vector["executables"] == (2 if kernel_hashes else 0)


def test_measured_but_not_up_to_date_or_refused():
    policy = policy_from_yaml("platforms: [tdx]\naccepted_tcb_statuses: [UpToDate, SWHardeningNeeded]\n"
                              f"tdx: {{measurements: [{{mrtd: '{'aa' * 48}', rtmr0: '{'bb' * 48}', "
                              f"rtmr1: '{'cc' * 48}', rtmr2: '{'dd' * 48}'}}]}}\n")
    checks = [Check("quote_signature", True), Check("measurement", True)]
    up_to_date = Verdict(ok=True, platform="tdx", product=None, status="UpToDate", claims={}, checks=checks,
                         revocation_checked=True)
    assert ear_status(up_to_date, policy) == AFFIRMING
    hardening = Verdict(ok=True, platform="tdx", product=None, status="SWHardeningNeeded", claims={}, checks=checks)
    assert ear_status(hardening, policy) == WARNING
    no_collateral = Verdict(ok=True, platform="tdx", product=None, status="verified", claims={}, checks=checks)
    assert ear_status(no_collateral, policy) == WARNING
    refused = Verdict(ok=False, platform="tdx", product=None, status="refused", claims={}, checks=checks)
    assert ear_status(refused, policy) == CONTRAINDICATED


def test_exp_is_set_and_checked(tmp_path):
    signer = EarSigner.load_or_create(tmp_path)
    jwks = signer.jwks()
    verdict = Verdict(ok=True, platform="snp", product="Milan", status="verified", claims={}, checks=[])
    now = time.time()
    claims = build_ear(verdict, policy_name="p", nonce=None, developer="d", build="b", now=now, lifetime=60)
    assert claims["exp"] == int(now) + 60
    assert verify_ear(signer.sign(claims), jwks)["exp"] == claims["exp"]
    old = build_ear(verdict, policy_name="p", nonce=None, developer="d", build="b", now=now - 3600, lifetime=60)
    with pytest.raises(jwt.ExpiredSignatureError):
        verify_ear(signer.sign(old), jwks)
    assert verify_ear(signer.sign(old), jwks, leeway=3600)["iat"] == int(now - 3600)
    forever = {k: v for k, v in claims.items() if k != "exp"}  # an EAR without exp never expires: refused
    with pytest.raises(jwt.MissingRequiredClaimError):
        verify_ear(signer.sign(forever), jwks)
    assert build_ear(verdict, policy_name="p", nonce=None, developer="d", build="b")["exp"] - int(time.time()) <= 300
    with pytest.raises(ValueError):
        build_ear(verdict, policy_name="p", nonce=None, developer="d", build="b", lifetime=0)


def test_service_uses_the_configured_lifetime_and_measured_policies(tmp_path, tmp_config, vectors_dir, expected):
    entry = _entry(expected, "tdx", "quote_v5_sample.dat")
    measured = tmp_path / "tdx-measured.yaml"
    measured.write_text(_tdx_policy(entry))
    config = tmp_config(verify={"ear_lifetime_seconds": 30},
                        policies={"default": "builtin:default", "measured": str(measured)})
    body = encode_cmw(tdx_evidence(vectors_dir, entry))
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        jwks = c.get("/.well-known/jwks.json").json()
        for policy, want in (("measured", AFFIRMING), ("default", WARNING)):
            r = c.post("/v1/verify", params={"at": entry["tcb_evaluation"]["at"], "policy": policy},
                       content=body, headers=CBOR)
            assert r.status_code == 200 and r.json()["status"] == want, r.json()
            claims = verify_ear(r.json()["ear"], jwks)
            assert claims["submods"]["cpu0"]["ear.status"] == want
            assert claims["exp"] - claims["iat"] == 30


def test_verify_ear_binds_the_callers_nonce(tmp_path):
    # A token issued for another request (or replayed within its lifetime) carries another eat_nonce, or none.
    signer = EarSigner.load_or_create(tmp_path)
    jwks = signer.jwks()
    verdict = Verdict(ok=True, platform="snp", product="Milan", status="verified", claims={}, checks=[])
    mine = signer.sign(build_ear(verdict, policy_name="p", nonce="n-mine", developer="d", build="b"))
    theirs = signer.sign(build_ear(verdict, policy_name="p", nonce="n-theirs", developer="d", build="b"))
    bare = signer.sign(build_ear(verdict, policy_name="p", nonce=None, developer="d", build="b"))
    assert verify_ear(mine, jwks, nonce="n-mine")["eat_nonce"] == "n-mine"
    for token in (theirs, bare):
        with pytest.raises(jwt.InvalidTokenError, match="eat_nonce"):
            verify_ear(token, jwks, nonce="n-mine")
