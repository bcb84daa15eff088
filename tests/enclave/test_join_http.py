"""The join routes over the service's real attested TLS, in-process: the joiner client against them, the rate
limit taken before a body is read, no PAT needed on the join routes while every other body still needs one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from attestation.peer import same_as_me_policy
from enclave.config import load_server_secret
from enclave.join.client import join_peer, obtain_from_peers
from enclave.join.protocol import CHALLENGE_PATH, SECRETS_PATH, JoinError
from enclave.join.server import JoinService, join_body_gates, join_router
from enclave.platform_secrets import PlatformSecrets

from .conftest import EnclaveServer, make_settings, sim_provider
from .test_main import free_port


def _policy():
    provider = sim_provider()
    return same_as_me_policy(provider.get_evidence(bytes(64)), sim_root_fingerprint=provider.fingerprint)


def _serve(tmp_path: Path, **service_kw) -> tuple[EnclaveServer, JoinService]:
    settings = make_settings(tmp_path)
    service = JoinService(lambda: PlatformSecrets(load_server_secret(settings)), _policy(), **service_kw)
    server = EnclaveServer(settings, extra_routers=[join_router(service)], body_gates=join_body_gates(service))
    return server.start(), service


@pytest.fixture
def joinable(tmp_path: Path) -> Iterator[tuple[EnclaveServer, JoinService]]:
    server, service = _serve(tmp_path)
    try:
        yield server, service
    finally:
        server.stop()


def test_joiner_gets_the_servers_root_after_trying_a_dead_peer(joinable):
    server, _ = joinable
    dead = f"https://127.0.0.1:{free_port()}"
    secrets = obtain_from_peers([dead, server.url], sim_provider(), _policy(), timeout=5)
    assert secrets.root == load_server_secret(server.settings)
    requests = server.ctx.metrics.join_requests.labels(outcome="accepted", reason="appraised")._value.get()
    assert requests == 1.0


def test_a_dead_peer_alone_fails_after_the_timeout():
    with pytest.raises(JoinError, match="no peer handed over"):
        obtain_from_peers([f"https://127.0.0.1:{free_port()}"], sim_provider(), _policy(), timeout=0.5)


def test_join_routes_take_no_pat_other_bodies_still_need_one(joinable):
    server, _ = joinable
    with server.client() as c:
        nonce = c.post(CHALLENGE_PATH)
        assert nonce.status_code == 200 and set(nonce.json()) == {"v", "nonce", "server_spki_sha256", "expires_in"}
        assert nonce.headers["cache-control"] == "no-store"
        malformed = c.post(SECRETS_PATH, content=b'{"v": 1}', headers={"Content-Type": "application/json"})
        assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_join_request"
        other = c.post("/users/me/pats", json={"name": "x"})
        assert other.status_code == 401                           # the gate is the join routes' only
        padded = c.post(SECRETS_PATH + "/", content=b"{}")
        assert padded.status_code == 401                          # an exact path: a PAT needed around it


def test_rate_limit_is_taken_before_the_body_is_read(tmp_path: Path):
    server, _ = _serve(tmp_path, rate=0.001, burst=2)
    try:
        with server.client() as c:
            statuses = [c.post(SECRETS_PATH, content=json.dumps({"v": 1}).encode()).status_code for _ in range(2)]
            assert statuses == [400, 400]
        with server.client() as c:
            limited = c.post(SECRETS_PATH, content=b"x" * 100_000)
            assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
            assert limited.headers.get("connection") == "close"      # refused on the headers, body left unread
        with server.client() as c:
            assert c.post(CHALLENGE_PATH).status_code == 429       # one bucket for the whole replica
        counted = server.ctx.metrics.join_requests.labels(outcome="refused", reason="rate_limited")._value.get()
        assert counted == 2.0
    finally:
        server.stop()


def test_joiner_refuses_a_server_outside_its_policy_before_any_request(joinable):
    server, _ = joinable
    provider = sim_provider()
    from attestation.policy import policy_from_dict

    strict = _policy().model_dump()
    strict["snp"]["host_data"] = "11" * 32                       # a peer with another configuration
    with pytest.raises(JoinError, match="nothing was sent") as refused:
        join_peer(server.url, provider, policy_from_dict(strict))
    assert "HOST_DATA" in str(refused.value)
    seen = server.ctx.metrics.requests.collect()[0].samples
    assert not any(CHALLENGE_PATH in s.labels.get("route", "") or SECRETS_PATH in s.labels.get("route", "")
                   for s in seen)


def test_peer_urls_must_be_https():
    from enclave.join.startup import check_peer_urls

    assert check_peer_urls(["https://10.0.0.2:8443"]) == ["https://10.0.0.2:8443"]
    for bad in ("http://10.0.0.2:8443", "10.0.0.2:8443", "https://"):
        with pytest.raises(JoinError):
            check_peer_urls([bad])


def test_a_busy_peer_is_tried_again(tmp_path: Path):
    server, _ = _serve(tmp_path, rate=2.0, burst=2)
    try:
        with server.client() as c:   # someone else used up the bucket
            assert [c.post(CHALLENGE_PATH).status_code for _ in range(3)][-1] == 429
        secrets = obtain_from_peers([server.url], sim_provider(), _policy(), timeout=20)
        assert secrets.root == load_server_secret(server.settings)
        limited = server.ctx.metrics.join_requests.labels(outcome="refused", reason="rate_limited")._value.get()
        assert limited >= 2.0                                     # ours, and at least one of the joiner's
    finally:
        server.stop()


def _raw(server: EnclaveServer, request: bytes) -> bytes:
    """One raw request over the server's TLS (no client normalisation of the path), the whole answer."""
    import socket
    import ssl

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock, \
            server.client_ssl().wrap_socket(sock, server_hostname="localhost") as tls:
        tls.sendall(request)
        answer = b""
        try:
            while chunk := tls.recv(65536):
                answer += chunk
        except (ssl.SSLError, ConnectionResetError):
            pass
        return answer


@pytest.mark.parametrize("path", [
    "//internal/join/v1/secrets", "/internal//join/v1/secrets", "/internal/join/v1/secrets/../../../users/me/pats",
    "/internal/join/v1/./secrets", "/INTERNAL/join/v1/secrets", "/internal/join/v1/secrets%2f",
    "/internal/join/v1/secrets%2F..%2F..%2F..%2Fusers%2Fme%2Fpats", "/internal/join/v1/challenge/../../../admin/users",
])
def test_paths_near_the_join_routes_still_need_a_pat_before_their_body(joinable, path: str):
    """A path that is not exactly a join route gets the PAT gate (401 on the headers, body unread), whatever
    the router would make of it: no spelling reaches another route with the join routes' exemption."""
    server, _ = joinable
    body = b'{"name": "x"}'
    answer = _raw(server, f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]


def test_a_percent_encoded_join_path_is_the_join_route_with_its_own_gate(joinable):
    """uvicorn decodes the path once; the gate and the router see the same decoded path (both the join route)."""
    server, _ = joinable
    body = b'{"v": 1}'
    answer = _raw(server, b"POST /internal/join/v1/%73ecrets HTTP/1.1\r\nHost: localhost\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 8\r\n\r\n" + body)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"invalid_join_request" in answer, answer[:300]


def test_a_join_body_larger_than_a_join_message_is_refused_before_it_is_read(joinable):
    """A PAT-less body may be at most a join message (MAX_REQUEST_BYTES), not the service's max_body_bytes
    (sized for prompts): refused on its Content-Length, left unread, the connection closed."""
    from enclave.join.protocol import MAX_REQUEST_BYTES

    server, _ = joinable
    assert server.settings.limits.max_body_bytes > MAX_REQUEST_BYTES + 1
    with server.client() as c:
        big = c.post(SECRETS_PATH, content=b"x" * (MAX_REQUEST_BYTES + 1))
        assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
        assert big.headers.get("connection") == "close"
    counted = server.ctx.metrics.join_requests.labels(outcome="refused", reason="too_large")._value.get()
    assert counted == 1.0


def test_a_host_run_peer_with_a_publicly_trusted_certificate_gets_nothing(tmp_path: Path, monkeypatch):
    """``--join`` is the host's choice: pointed at the host's own TLS server with a certificate the joiner's
    machine trusts (WebPKI), the joiner refuses it on the handshake's certificate (no evidence), writes not
    one byte on the connection, and never makes the evidence a join request would carry."""
    from tests.atls.webpki import TrustedMitm

    mitm = TrustedMitm(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(mitm.ca_file))
    asked: list[bytes] = []

    class Counting:
        platform = "sim"

        def get_evidence(self, report_data: bytes):
            asked.append(report_data)
            return sim_provider().get_evidence(report_data)

    try:
        with pytest.raises(JoinError, match="nothing was sent"):
            join_peer(mitm.url, Counting(), _policy(), io_timeout=5)
    finally:
        mitm.close()   # joins the server's threads: what they read is recorded by now
    assert mitm.connections >= 1 and bytes(mitm.recorded) == b"" and asked == []


def test_a_join_request_with_a_body_costs_one_token(tmp_path: Path):
    """The body gate's token is the request's: a challenge sent with a body is not charged twice (which let
    every such request spend two of the replica's shared tokens)."""
    server, _ = _serve(tmp_path, rate=0.001, burst=2)
    try:
        with server.client() as c:
            assert c.post(CHALLENGE_PATH, content=b"{}").status_code == 200
            assert c.post(CHALLENGE_PATH).status_code == 200          # the second token was still there
            assert c.post(CHALLENGE_PATH).status_code == 429
    finally:
        server.stop()


class _Stream:
    def __init__(self, spki: bytes) -> None:
        self.spki = spki

    def get_extra_info(self, info: str):
        return self.spki.hex() if info == "cube_ai_spki_sha256" else None


class _RelayedClient:
    """An attested client whose connection of the challenge closed: the secrets request is carried on a new
    connection that the host's relay sent to another replica (another TLS key), which refuses the nonce."""

    keys = [b"\x01" * 32, b"\x02" * 32]
    made = 0

    def __init__(self, *_args, **_kw) -> None:
        type(self).made += 1
        self._second = type(self).made > 1   # the second attempt stays on one replica

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        pass

    def post(self, path: str, **_kw):
        import httpx

        from enclave.join.protocol import Challenge

        first = self.keys[0]
        if path == CHALLENGE_PATH:
            return httpx.Response(200, content=json.dumps(Challenge(b"\x09" * 32, first).to_json()).encode(),
                                  extensions={"network_stream": _Stream(first)})
        other = first if self._second else self.keys[1]
        refusal = {"error": {"message": "Join refused: the nonce was not issued by this replica"}}
        return httpx.Response(403, json=refusal, extensions={"network_stream": _Stream(other)})


def test_a_request_relayed_to_another_replica_is_tried_again_not_given_up(monkeypatch):
    """Behind a relay the connection of the challenge may close and the secrets request reach another replica,
    which refuses our nonce: that is worth a new challenge (retryable), not a final refusal of the peer."""
    from enclave.join import client as join_client

    _RelayedClient.made = 0
    monkeypatch.setattr(join_client, "_RETRY_PAUSE", 0.01)
    with pytest.raises(join_client._PeerUnreachable, match="another replica"):
        join_peer("https://127.0.0.1:1", sim_provider(), _policy(), client_factory=_RelayedClient)
    _RelayedClient.made = 0   # obtain_from_peers: relayed elsewhere first (tried again), then one replica's refusal
    with pytest.raises(JoinError, match="refused this replica") as final:   # same replica: its refusal is final
        obtain_from_peers(["https://127.0.0.1:1"], sim_provider(), _policy(), timeout=5,
                          client_factory=_RelayedClient)
    assert "nonce was not issued" in str(final.value) and _RelayedClient.made == 2
