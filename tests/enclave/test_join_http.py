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
