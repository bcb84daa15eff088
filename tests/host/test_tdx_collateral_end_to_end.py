"""TDX revocation end to end with the real v5 quote and Intel collateral: the enclave's provider attaches the
collateral it fetches through the host agent's PCS mirror, verifiers require it by default, and a client can
fetch it from a local mirror itself. The mirror is untrusted: what it can do is withhold or age collateral,
and both get the evidence refused."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

import attestation.tdx.verify as tdx_verify
from attestation.errors import ProviderError
from attestation.evidence import Evidence, decode_cmw, encode_cmw
from attestation.policy import DEFAULT_POLICY, policy_from_yaml
from attestation.providers import ConfigfsTsmProvider
from attestation.tdx.pcs import PcsClient
from attestation.verifier import verify_evidence
from tests.attestation.test_providers import FakeTsmKernel
from tests.conftest import parse_when
from tests.host.servers import free_port

V5_QUOTE = "tdx/go-tdx-guest--quote_v5_sample.dat"
V5_AT = parse_when("2026-02-03T00:00:00Z")  # pcs-2026-02 is current then and rates the platform UpToDate
COLLATERAL_NAMES = {"tcb_info_90c06f000000.json", "tcb_info_90c06f000000_chain.txt", "qe_identity.json",
                    "qe_identity_chain.txt", "pck_crl_platform.crl", "pck_crl_platform_chain.txt", "root_ca.crl"}


@pytest.fixture
def mirror(tmp_config, vectors_dir):
    """`cube-host serve` on loopback, offline, serving the pcs-2026-02 collateral set (no upstream)."""
    from host.verify_service import create_app
    from tests.fakes.server import LoopbackServer

    config = tmp_config(collateral={"enabled": True, "offline": True,
                                    "pcs_seed_dir": str(vectors_dir / "tdx/collateral/pcs-2026-02"),
                                    "pcs_upstream": f"http://127.0.0.1:{free_port()}"})
    server = LoopbackServer(create_app(config), name="agent")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def quote(vectors_dir) -> bytes:
    return (vectors_dir / V5_QUOTE).read_bytes()


def _enclave_evidence(tmp_path, quote: bytes, pcs: PcsClient) -> Evidence:
    kernel = FakeTsmKernel(tmp_path / "report", tdx_quote=quote)
    return ConfigfsTsmProvider(kernel.root, fs=kernel, pcs=pcs).get_evidence(bytes(64))


def test_enclave_evidence_carries_intel_collateral_and_verifies(tmp_path, mirror, quote) -> None:
    with PcsClient(base_url=f"{mirror.base_url}/pcs", cache_dir=tmp_path / "pcs", max_retries=0) as pcs:
        evidence = _enclave_evidence(tmp_path, quote, pcs)
    assert evidence.platform == "tdx" and set(evidence.collateral) == COLLATERAL_NAMES
    received = decode_cmw(encode_cmw(evidence))  # as a client reads it from the certificate
    verdict = verify_evidence(received, policy=DEFAULT_POLICY, at=V5_AT)
    assert verdict.ok, verdict.error
    assert verdict.status == "UpToDate"
    passed = {c.name for c in verdict.checks if c.ok}
    assert {"pck_crl", "root_ca_crl", "tcb_info_signature", "qe_identity_signature", "tcb_status"} <= passed
    production = policy_from_yaml("platforms: [tdx]\ntdx: {require_collateral: true}")
    assert verify_evidence(received, policy=production, at=V5_AT).ok


def test_stripped_collateral_is_refused_by_default(tmp_path, mirror, quote) -> None:
    with PcsClient(base_url=f"{mirror.base_url}/pcs", max_retries=0) as pcs:
        evidence = _enclave_evidence(tmp_path, quote, pcs)
    stripped = dataclasses.replace(evidence, collateral={})  # what a host relaying the evidence could do
    verdict = verify_evidence(decode_cmw(encode_cmw(stripped)), at=V5_AT)
    assert not verdict.ok
    assert [c.name for c in verdict.checks if not c.ok] == ["collateral_present"]
    # Half the collateral (the CRLs left out) is no better: revocation cannot be checked.
    partial = dataclasses.replace(evidence, collateral={k: v for k, v in evidence.collateral.items()
                                                        if not k.endswith(".crl")})
    assert not verify_evidence(partial, at=V5_AT).ok


def test_collateral_past_its_next_update_is_refused(tmp_path, mirror, quote) -> None:
    """A mirror that keeps serving an old set (the stale-serving cache does) cannot keep a platform current."""
    with PcsClient(base_url=f"{mirror.base_url}/pcs", max_retries=0) as pcs:
        evidence = _enclave_evidence(tmp_path, quote, pcs)
    verdict = verify_evidence(evidence, at=V5_AT + timedelta(days=120))
    assert not verdict.ok and verdict.status == "invalid"
    assert any(not c.ok and c.name in ("tcb_info_validity", "qe_identity_validity", "pck_crl", "root_ca_crl")
               for c in verdict.checks)


def test_out_of_date_or_revoked_tcb_status_is_refused(tmp_path, mirror, quote, monkeypatch) -> None:
    with PcsClient(base_url=f"{mirror.base_url}/pcs", max_retries=0) as pcs:
        evidence = _enclave_evidence(tmp_path, quote, pcs)
    evaluate = tdx_verify.evaluate_tcb
    for status in ("OutOfDate", "Revoked"):
        monkeypatch.setattr(tdx_verify, "evaluate_tcb",
                            lambda *a, _s=status, **k: dataclasses.replace(evaluate(*a, **k), status=_s))
        verdict = verify_evidence(evidence, at=V5_AT)
        assert not verdict.ok and verdict.status == status
        assert [c.name for c in verdict.checks if not c.ok] == ["tcb_status"]


def test_no_evidence_without_the_collateral_it_is_configured_to_carry(tmp_path, quote) -> None:
    """An enclave whose mirror has nothing (or is down) publishes no evidence rather than bare evidence."""
    with PcsClient(base_url=f"http://127.0.0.1:{free_port()}/pcs", max_retries=0, timeout=2.0) as pcs:
        with pytest.raises(ProviderError, match="Intel collateral of FMSPC 90c06f000000"):
            _enclave_evidence(tmp_path, quote, pcs)


def test_client_fetches_collateral_from_a_local_mirror(mirror, quote) -> None:
    bare = Evidence(platform="tdx", report=quote)
    assert not verify_evidence(bare, at=V5_AT).ok  # nothing carried, nothing fetched
    with PcsClient(base_url=f"{mirror.base_url}/pcs", max_retries=0) as pcs:
        verdict = verify_evidence(bare, at=V5_AT, pcs=pcs)
        assert verdict.ok, verdict.error
        assert verdict.status == "UpToDate"
        assert pcs.network_fetches == 4  # TCB info, QE identity, PCK CRL, root CA CRL: from the mirror


def test_attested_client_hands_its_collateral_source_to_the_verifier(mirror, quote) -> None:
    """AttestedClient(..., pcs=...) / openai_client(..., pcs=...) verify with that source: the bare quote
    (what a host that strips collateral leaves) is appraised with collateral from the mirror."""
    from attestation.atls.client import AttestedClient, AttestedTLSError, openai_client

    seen: list[dict] = []

    def at_vector_time(evidence, **kwargs):  # the vectors' collateral is current at V5_AT only
        seen.append(kwargs)
        return verify_evidence(evidence, at=V5_AT, **kwargs)

    policy = policy_from_yaml("platforms: [tdx]\nallow_unmeasured: true")
    bare = Evidence("tdx", quote)
    report_data = bytes.fromhex(verify_evidence(bare, policy=policy_from_yaml("tdx: {require_collateral: false}"),
                                                at=V5_AT).claims["report_data"])
    with PcsClient(base_url=f"{mirror.base_url}/pcs", max_retries=0) as pcs:
        with AttestedClient("https://127.0.0.1:1", policy=policy, verify_fn=at_vector_time, pcs=pcs) as client:
            verdict = client.attestor._appraise(client.attestor.new_report(), "fresh_appraisal", bare, report_data)
        assert verdict.ok and verdict.status == "UpToDate"
        assert seen == [{"policy": policy, "expected_report_data": report_data, "pcs": pcs}]
        with AttestedClient("https://127.0.0.1:1", policy=policy, verify_fn=at_vector_time) as no_source:
            with pytest.raises(AttestedTLSError, match="no Intel collateral"):
                no_source.attestor._appraise(no_source.attestor.new_report(), "fresh_appraisal", bare, report_data)
        wrapped = openai_client("https://127.0.0.1:1/v1", "key", policy, pcs=pcs)
        assert wrapped._client.attestor._collateral_sources == {"pcs": pcs}


def test_cube_attest_fetches_collateral_with_pcs(mirror, vectors_dir, capsys) -> None:
    import json

    from attestation.cli import main

    args = ["verify-quote", str(vectors_dir / V5_QUOTE), "--at", "2026-02-03T00:00:00Z", "--json"]
    assert main(args) == 1  # the default policy requires collateral: none given, none fetched
    assert "collateral_present" in [c["name"] for c in json.loads(capsys.readouterr().out)["checks"] if not c["ok"]]
    assert main(args + ["--pcs", f"{mirror.base_url}/pcs"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "UpToDate"
