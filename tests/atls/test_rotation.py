"""Key rotation without dropping connections, SNI-less clients, enclave restart, verdict TTL."""

from __future__ import annotations

import secrets
import socket
import ssl
import time

import pytest

from attestation.atls.binding import report_data_for, spki_der_of, spki_sha256
from attestation.atls.client import AttestedClient
from attestation.evidence import decode_cmw
from attestation.verifier import verify_evidence
from cryptography import x509
from enclave.tls import TlsManager

from .conftest import PAT, Server, enclave_like_app

AUTH = {"Authorization": f"Bearer {PAT}"}


def served_spki(port: int, server_hostname: str | None) -> str:
    """SPKI hash of the certificate a raw TLS handshake gets (server_hostname None: no SNI is sent)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only reading which certificate is served
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            der = tls.getpeercert(True)
    return spki_sha256(spki_der_of(x509.load_der_x509_certificate(der)))


@pytest.mark.parametrize("loop,http", [("uvloop", "httptools"), ("asyncio", "h11"), ("asyncio", "httptools")])
def test_new_handshakes_get_current_key_with_and_without_sni(make_server, sim_policy, loop, http):
    server = make_server(loop=loop, http=http)
    first = server.tls.current.spki_sha256
    assert served_spki(server.port, None) == first
    assert served_spki(server.port, "localhost") == first
    second = server.tls.rotate().spki_sha256
    assert second != first
    assert served_spki(server.port, None) == second  # the sni_callback runs even when no SNI is sent
    assert served_spki(server.port, "localhost") == second
    with AttestedClient(server.url, policy=sim_policy) as client:  # and requests see their connection's key
        assert client.get("/v1/connection-key").json()["spki_sha256"] == second


def test_evidence_for_nonce_binds_the_current_key(sim_provider, sim_policy):
    tls = TlsManager(sim_provider, hostnames=["localhost"], rotate_every=None)
    tls.start()
    tls.rotate()
    nonce = secrets.token_bytes(32)
    evidence = tls.evidence_for_nonce(nonce)
    assert evidence.binding == {"scheme": "cube-ai/atls/v1", "nonce": nonce}
    assert verify_evidence(evidence, policy=sim_policy,
                           expected_report_data=report_data_for(tls.current.spki_der, nonce)).ok
    with pytest.raises(ValueError):
        tls.evidence_for_nonce(nonce[:16])
    pem_cert = x509.load_pem_x509_certificate(tls.current_certificate_pem())
    assert spki_sha256(spki_der_of(pem_cert)) == tls.current.spki_sha256


def test_rotation_keeps_open_keep_alive_connections(make_server, sim_policy):
    server = make_server()
    old = server.tls.current
    with AttestedClient(server.url, policy=sim_policy) as client:
        assert client.get("/v1/connection-key").json()["spki_sha256"] == old.spki_sha256
        new = server.tls.rotate()
        # same keep-alive connection: still served, still by the key it was handshaken with
        assert client.get("/v1/connection-key").json()["spki_sha256"] == old.spki_sha256
        assert client.get("/v1/secret", headers=AUTH).status_code == 200
        assert client.attestor.verifications == 1
        # the attestation endpoint on the old connection binds to the old connection's key
        nonce = secrets.token_bytes(32)
        body = client.get("/.well-known/cube-ai/attestation", params={"nonce": nonce.hex()}).content
        verdict = verify_evidence(decode_cmw(body), policy=sim_policy,
                                  expected_report_data=report_data_for(old.spki_der, nonce))
        assert verdict.ok, verdict.error
    with AttestedClient(server.url, policy=sim_policy) as fresh:
        assert fresh.get("/v1/connection-key").json()["spki_sha256"] == new.spki_sha256
        assert fresh.verification_report.spki_sha256 == new.spki_sha256


def test_background_rotation(sim_provider):
    tls = TlsManager(sim_provider, hostnames=["127.0.0.1"], rotate_every=0.05)
    tls.start()
    try:
        deadline = time.monotonic() + 10
        while tls.current.generation < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert tls.current.generation >= 3
    finally:
        tls.stop()
    generation = tls.current.generation
    time.sleep(0.15)
    assert tls.current.generation == generation  # stopped


def test_restart_with_new_key_is_handled_without_user_action(make_server, sim_provider, sim_policy):
    first = make_server()
    port, old_spki = first.port, first.tls.current.spki_sha256
    client = AttestedClient(first.url, policy=sim_policy)
    try:
        assert client.get("/v1/secret", headers=AUTH).status_code == 200
        first.stop()
        tls = TlsManager(sim_provider, hostnames=["127.0.0.1"], rotate_every=None)
        tls.start()
        second = Server(enclave_like_app(tls), tls, port=port).start()
        try:
            response = client.get("/v1/secret", headers=AUTH)
            assert response.status_code == 200
            report = client.verification_report
            assert client.attestor.verifications == 2
            assert report.ok and report.previous_pin == old_spki
            assert report.spki_sha256 == tls.current.spki_sha256 != old_spki
            assert "re-verifying" in report.steps[0].detail
        finally:
            second.stop()
    finally:
        client.close()


def test_expired_verdict_is_verified_again(make_server, sim_policy):
    server = make_server()
    with AttestedClient(server.url, policy=sim_policy, verdict_ttl=0.2) as client:
        assert client.get("/v1/secret", headers=AUTH).status_code == 200
        time.sleep(0.3)
        assert client.get("/v1/secret", headers=AUTH).status_code == 200
        assert client.attestor.verifications == 2  # the idle connection was dropped and a new one verified


def test_no_key_means_no_handshake(sim_provider):
    """Before start() there is no certificate anywhere: handshakes fail instead of using a stale key."""
    tls = TlsManager(sim_provider, hostnames=["localhost"], rotate_every=None)
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = tls.server_context().wrap_bio(s_in, s_out, server_side=True)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE  # only checking that the server cannot complete a handshake
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    s_in.write(c_out.read())  # the ClientHello
    with pytest.raises(ssl.SSLError) as info:
        server.do_handshake()
    assert not isinstance(info.value, ssl.SSLWantReadError)


@pytest.mark.parametrize("highest", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.MAXIMUM_SUPPORTED])
def test_no_session_resumption_every_connection_shows_its_own_certificate(make_server, highest):
    """A resumed TLS session skips the Certificate message: after a rotation the client would still hold the
    old certificate while the enclave attributes (and attests) the connection to the new key."""
    server = make_server()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only observing the handshake
    ctx.maximum_version = highest

    def connect(session: ssl.SSLSession | None = None) -> tuple[ssl.SSLSession, bool, str, str] | None:
        raw = socket.create_connection(("127.0.0.1", server.port))
        try:
            tls = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
        except ssl.SSLError:
            raw.close()
            return None  # this TLS version is refused: nothing to resume either
        with tls:
            tls.sendall(b"GET /v1/connection-key HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
            held = spki_sha256(spki_der_of(x509.load_der_x509_certificate(tls.getpeercert(True))))
            attributed = response.rsplit(b'"spki_sha256":"', 1)[1].split(b'"')[0].decode()
            return tls.session, tls.session_reused, held, attributed

    first = connect()
    if first is None:
        assert highest == ssl.TLSVersion.TLSv1_2
        return
    server.tls.rotate()
    second = connect(first[0])
    assert second is not None
    _, reused, held, attributed = second
    assert not reused
    assert held == attributed == server.tls.current.spki_sha256
