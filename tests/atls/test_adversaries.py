"""Man in the middle, replayed evidence, old nonces, wrong policy, other origins, redirects."""

from __future__ import annotations

import dataclasses
import secrets

import pytest
from fastapi import APIRouter, Request
from fastapi.responses import Response

from attestation.atls.binding import binding_parameters
from attestation.atls.client import AsyncAttestedClient, AttestedClient, AttestedTLSError, openai_client
from attestation.errors import PolicyError
from attestation.evidence import encode_cmw
from attestation.policy import DEFAULT_POLICY, policy_from_yaml, sim_policy_yaml
from enclave.attestation_api import ATTESTATION_PATH, CMW_CBOR_MEDIA_TYPE
from enclave.tls import STATE_KEY

from .conftest import PAT, enclave_like_app
from .mitm import Mitm

AUTH = {"Authorization": f"Bearer {PAT}"}


def failed_step(exc: AttestedTLSError) -> str:
    failing = [s for s in exc.report.steps if not s.ok]
    assert len(failing) == 1 and exc.report.steps[-1] is failing[0]
    assert not exc.report.ok and exc.checks == exc.report.steps
    return failing[0].name


def test_mitm_with_copied_evidence_is_refused_and_never_sees_the_pat(make_server, sim_policy, tmp_path):
    server = make_server()
    mitm = Mitm(server.tls.current.certificate, server.port, tmp_path)
    try:
        with AttestedClient(mitm.url, policy=sim_policy) as client:
            with pytest.raises(AttestedTLSError) as info:
                client.get("/v1/secret", headers=AUTH)
        assert failed_step(info.value) == "certificate_appraisal"
        assert "report_data" in info.value.report.error
        with pytest.raises(AttestedTLSError):  # openai-python lets it through unchanged (not retried)
            openai_client(mitm.url + "/v1", PAT, sim_policy).models.list()
    finally:
        mitm.close()
    assert mitm.handshakes == 2  # both clients reached it and completed TLS (refusals are not retried)
    assert bytes(mitm.recorded) == b""  # not one decrypted byte: no request line, no header, no PAT
    assert server.app.state.seen_authorization == []


def test_pin_mismatch_after_restart_behind_a_mitm_sends_nothing(make_server, sim_policy, tmp_path):
    genuine = make_server()
    with AttestedClient(genuine.url, policy=sim_policy) as client:
        assert client.get("/v1/secret", headers=AUTH).status_code == 200
        port = genuine.port
        genuine.stop()
        elsewhere = make_server()  # the real enclave moved; an adversary now holds the old address
        mitm = Mitm(elsewhere.tls.current.certificate, elsewhere.port, tmp_path, port=port)
        try:
            with pytest.raises(AttestedTLSError) as info:
                client.get("/v1/secret", headers=AUTH)
        finally:
            mitm.close()
    assert failed_step(info.value) == "certificate_appraisal"
    assert info.value.report.previous_pin == genuine.tls.current.spki_sha256
    assert bytes(mitm.recorded) == b""
    assert elsewhere.app.state.seen_authorization == []


def lying_app(tls, answer):
    """An enclave whose attestation endpoint is replaced by ``answer(request, material, nonce) -> bytes``."""
    router = APIRouter()

    @router.get(ATTESTATION_PATH)
    async def attestation(request: Request) -> Response:
        nonce = bytes.fromhex(request.query_params["nonce"])
        body = answer(request.scope["state"][STATE_KEY], nonce)
        return Response(body, media_type=CMW_CBOR_MEDIA_TYPE)

    return enclave_like_app(tls, attestation=router)


def test_fresh_evidence_for_an_earlier_key_is_refused(make_server, sim_policy):
    def answer(material, nonce):
        earlier = answer.earlier
        assert earlier.spki_der != material.spki_der
        return encode_cmw(answer.tls.evidence_for_key(earlier, nonce))

    def factory(tls):
        answer.tls, answer.earlier = tls, tls.current
        tls.rotate()
        return lying_app(tls, answer)

    server = make_server(factory)
    with AttestedClient(server.url, policy=sim_policy) as client:
        with pytest.raises(AttestedTLSError) as info:
            client.get("/v1/secret", headers=AUTH)
    assert failed_step(info.value) == "nonce_appraisal"
    assert server.app.state.seen_authorization == []


def test_replayed_response_for_an_old_nonce_is_refused(make_server, sim_policy):
    recorded: list[bytes] = []

    def answer(material, nonce):
        if not recorded:
            recorded.append(encode_cmw(answer.tls.evidence_for_key(material, nonce)))
        return recorded[0]

    def factory(tls):
        answer.tls = tls
        return lying_app(tls, answer)

    server = make_server(factory)
    with AttestedClient(server.url, policy=sim_policy) as first:
        assert first.get("/v1/secret", headers=AUTH).status_code == 200
    with AttestedClient(server.url, policy=sim_policy) as second:
        with pytest.raises(AttestedTLSError) as info:
            second.get("/v1/secret", headers=AUTH)
    assert failed_step(info.value) == "nonce_roundtrip"
    assert "nonce" in info.value.report.error
    assert server.app.state.seen_authorization == [f"Bearer {PAT}"]  # only the first, verified client


def test_old_nonce_relabelled_as_new_is_refused(make_server, sim_policy):
    def answer(material, nonce):
        old_nonce = secrets.token_bytes(32)
        evidence = answer.tls.evidence_for_key(material, old_nonce)
        return encode_cmw(dataclasses.replace(evidence, binding=binding_parameters(nonce)))  # claims our nonce

    def factory(tls):
        answer.tls = tls
        return lying_app(tls, answer)

    server = make_server(factory)
    with AttestedClient(server.url, policy=sim_policy) as client:
        with pytest.raises(AttestedTLSError) as info:
            client.get("/v1/secret", headers=AUTH)
    assert failed_step(info.value) == "nonce_appraisal"
    assert server.app.state.seen_authorization == []


PRODUCTION_POLICY = policy_from_yaml('name: production\nplatforms: [snp]\nsnp:\n  measurements: [{measurement: "'
                                     + "ab" * 48 + '", kernel_hashes: true}]\n')


def test_production_policy_refuses_sim_evidence(make_server):
    server = make_server()
    with AttestedClient(server.url, policy=PRODUCTION_POLICY) as client:
        with pytest.raises(AttestedTLSError) as info:
            client.get("/v1/secret", headers=AUTH)
    assert failed_step(info.value) == "certificate_appraisal"
    assert "sim" in info.value.report.error
    assert server.app.state.seen_authorization == []


def test_a_policy_pinning_no_measurement_is_refused_before_connecting(make_server):
    """Any genuine SNP/TDX image would pass such a policy: the client refuses it unless explicitly allowed."""
    server = make_server()
    with pytest.raises(PolicyError, match="no measurement allowlist"):
        AttestedClient(server.url, policy=DEFAULT_POLICY)
    opted_in = DEFAULT_POLICY.model_copy(update={"allow_unmeasured": True})
    with AttestedClient(server.url, policy=opted_in) as client:   # accepted, and still refuses sim evidence
        with pytest.raises(AttestedTLSError) as info:
            client.get("/v1/secret", headers=AUTH)
    assert failed_step(info.value) == "certificate_appraisal"
    assert server.app.state.seen_authorization == []


def test_requests_to_other_origins_are_refused(make_server, sim_policy):
    server = make_server()
    with AttestedClient(server.url, policy=sim_policy) as client:
        for url in ("https://example.invalid/v1/secret", f"https://localhost:{server.port}/v1/secret",
                    f"http://127.0.0.1:{server.port}/v1/secret", f"https://127.0.0.1:{server.port + 1}/x"):
            with pytest.raises(AttestedTLSError) as info:
                client.get(url, headers=AUTH)
            assert failed_step(info.value) == "origin"
        assert client.attestor.verifications == 0
    assert server.app.state.seen_authorization == []
    with pytest.raises(ValueError):
        AttestedClient(f"http://127.0.0.1:{server.port}", policy=sim_policy)
    with pytest.raises(TypeError):
        AttestedClient(server.url, policy=sim_policy, verify=False)


def test_redirects_are_never_followed(make_server, sim_policy):
    server = make_server()
    with AttestedClient(server.url, policy=sim_policy) as client:
        response = client.get("/v1/redirect", headers=AUTH, follow_redirects=True)
        assert response.status_code == 302
        request = client.build_request("GET", "/v1/redirect", headers=AUTH)
        assert client.send(request, follow_redirects=True).status_code == 302


def test_wrong_content_from_endpoint_is_refused(make_server, sim_policy):
    server = make_server(lambda tls: lying_app(tls, lambda material, nonce: b"\x83not cbor"))
    with AttestedClient(server.url, policy=sim_policy) as client:
        with pytest.raises(AttestedTLSError) as info:
            client.get("/v1/secret", headers=AUTH)
    assert failed_step(info.value) == "nonce_roundtrip"
    assert server.app.state.seen_authorization == []


async def test_async_client_sends_nothing_to_a_mitm(make_server, sim_policy, tmp_path):
    server = make_server()
    mitm = Mitm(server.tls.current.certificate, server.port, tmp_path)
    try:
        async with AsyncAttestedClient(mitm.url, policy=sim_policy) as client:
            with pytest.raises(AttestedTLSError) as info:
                await client.get("/v1/secret", headers=AUTH)
    finally:
        mitm.close()
    assert failed_step(info.value) == "certificate_appraisal"
    assert mitm.handshakes == 1 and bytes(mitm.recorded) == b""
    assert server.app.state.seen_authorization == []


def test_sim_policy_naming_another_root_refuses(make_server):
    server = make_server()
    other = policy_from_yaml(sim_policy_yaml("ab" * 32))
    with AttestedClient(server.url, policy=other) as client:
        with pytest.raises(AttestedTLSError) as info:
            client.get("/v1/secret", headers=AUTH)
    assert failed_step(info.value) == "certificate_appraisal"
    assert server.app.state.seen_authorization == []


def busy_then_ok(busy_answers: int):
    """An attestation endpoint that is busy (503) for the first ``busy_answers`` calls."""
    calls = []

    def factory(tls):
        router = APIRouter()

        @router.get(ATTESTATION_PATH)
        async def attestation(request: Request) -> Response:
            calls.append(1)
            if len(calls) <= busy_answers:
                return Response(b"busy", status_code=503)
            nonce = bytes.fromhex(request.query_params["nonce"])
            return Response(encode_cmw(tls.evidence_for_key(request.scope["state"][STATE_KEY], nonce)),
                            media_type=CMW_CBOR_MEDIA_TYPE)

        return enclave_like_app(tls, attestation=router)

    return factory, calls


def test_a_transient_verification_failure_is_retried_once(make_server, sim_policy):
    factory, calls = busy_then_ok(1)
    server = make_server(factory)
    with AttestedClient(server.url, policy=sim_policy) as client:
        assert client.get("/v1/secret", headers=AUTH).status_code == 200
        assert client.attestor.verifications == 2 and len(calls) == 2
    assert server.app.state.seen_authorization == [f"Bearer {PAT}"]


def test_only_one_retry(make_server, sim_policy):
    factory, calls = busy_then_ok(10)
    server = make_server(factory)
    with AttestedClient(server.url, policy=sim_policy) as client:
        with pytest.raises(AttestedTLSError) as info:
            client.get("/v1/secret", headers=AUTH)
        assert client.attestor.verifications == 2 and len(calls) == 2
    assert failed_step(info.value) == "nonce_roundtrip" and "503" in info.value.report.error
    assert server.app.state.seen_authorization == []
