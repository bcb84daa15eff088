"""Simulation mode end to end over real TLS on 127.0.0.1: enclave server + attested client."""

from __future__ import annotations

import pytest

from attestation.atls.client import AsyncAttestedClient, AttestedClient, AttestedTLSError

from .conftest import PAT


def test_client_verifies_then_sends_pat(make_server, sim_policy):
    server = make_server()
    with AttestedClient(server.url, policy=sim_policy) as client:
        response = client.get("/v1/secret", headers={"Authorization": f"Bearer {PAT}"})
        assert response.status_code == 200 and response.json() == {"secret": "ok"}
        report = client.verification_report
        assert report is not None and report.ok
        names = [s.name for s in report.steps]
        assert names == ["certificate", "certificate_evidence", "certificate_appraisal", "certificate_binding",
                         "nonce_roundtrip", "nonce_appraisal", "nonce_binding", "pinned"]
        assert all(s.ok for s in report.steps)
        assert report.spki_sha256 == server.tls.current.spki_sha256
        assert client.attestor.pinned == server.tls.current.spki_sha256
        # warm: same connection, cached verdict, no new verification
        for _ in range(3):
            assert client.get("/v1/secret", headers={"Authorization": f"Bearer {PAT}"}).status_code == 200
        assert client.attestor.verifications == 1


async def test_async_client_verifies_then_sends_pat(make_server, sim_policy):
    server = make_server()
    async with AsyncAttestedClient(server.url, policy=sim_policy) as client:
        response = await client.get("/v1/secret", headers={"Authorization": f"Bearer {PAT}"})
        assert response.status_code == 200
        assert client.verification_report.ok
        assert client.attestor.pinned == server.tls.current.spki_sha256
        assert (await client.get("/v1/secret", headers={"Authorization": f"Bearer {PAT}"})).status_code == 200
        assert client.attestor.verifications == 1


async def test_async_attest_reports_every_step(make_server, sim_policy):
    server = make_server()
    async with AsyncAttestedClient(server.url, policy=sim_policy) as client:
        first = await client.attest()
        second = await client.attest()  # attest() always verifies afresh, ignoring the cache
    assert first.ok and second.ok and first is not second
    assert first.spki_sha256 == second.spki_sha256 == server.tls.current.spki_sha256
    assert first.to_json()["status"] == "verified"
    assert first.to_json()["claims"]["report_data"]


def test_failure_report_is_attached_and_nothing_is_pinned(make_server):
    from attestation.policy import DEFAULT_POLICY

    server = make_server()
    unmeasured = DEFAULT_POLICY.model_copy(update={"allow_unmeasured": True})  # refuses sim: the failure here
    with AttestedClient(server.url, policy=unmeasured) as client:
        with pytest.raises(AttestedTLSError) as info:
            client.get("/v1/secret", headers={"Authorization": f"Bearer {PAT}"})
        assert client.attestor.pinned is None
        assert not client.attestor.trusted(server.tls.current.spki_sha256)
    report = info.value.report
    assert report is client.verification_report and not report.ok
    assert [s.ok for s in report.steps] == [True, True, False]



def test_client_requiring_the_crl_accepts_the_sim_enclave(make_server, sim_policy):
    """Revocation end to end: the sim enclave's certificate and nonce evidence carry its CRL, and a
    client whose policy requires one (the development sim policy does) checks it on both."""
    from attestation.atls.certificate import evidence_from_certificate
    from attestation.evidence import MAX_EVIDENCE_BYTES, SNP_CRL_FILE, decode_cmw

    assert sim_policy.snp.require_crl
    server = make_server()
    material = server.tls.current
    in_certificate = evidence_from_certificate(material.certificate)
    assert len(in_certificate) < MAX_EVIDENCE_BYTES
    assert SNP_CRL_FILE in decode_cmw(in_certificate).collateral
    assert SNP_CRL_FILE in server.tls.evidence_for_key(material, b"\x01" * 32).collateral  # per-nonce evidence too
    with AttestedClient(server.url, policy=sim_policy) as client:
        assert client.get("/v1/secret", headers={"Authorization": f"Bearer {PAT}"}).status_code == 200
        report = client.verification_report
    assert report.ok
    for verdict in (report.certificate_verdict, report.fresh_verdict):
        assert verdict is not None and [c.ok for c in verdict.checks if c.name == "crl"] == [True]


def test_client_requiring_the_crl_refuses_an_enclave_that_leaves_it_out(make_server, sim_provider, sim_policy):
    """A host (or provider) that strips the CRL from the evidence cannot get past require_crl."""
    import dataclasses

    from enclave.tls import TlsManager

    class WithoutCrl:
        platform = "sim"

        def get_evidence(self, report_data: bytes):
            return dataclasses.replace(sim_provider.get_evidence(report_data), collateral={})

    server = make_server(tls=TlsManager(WithoutCrl(), hostnames=["127.0.0.1"], rotate_every=None))
    with AttestedClient(server.url, policy=sim_policy) as client:
        with pytest.raises(AttestedTLSError) as info:
            client.get("/v1/secret", headers={"Authorization": f"Bearer {PAT}"})
        assert client.attestor.pinned is None
    assert info.value.report.certificate_verdict.status == "collateral_unavailable"
    assert server.app.state.seen_authorization == []  # the key never left the client
