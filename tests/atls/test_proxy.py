"""cube-attest proxy (attestation.proxy): forwarding, refusals that send nothing, streaming, cancellation, rotation."""

from __future__ import annotations

import hashlib
import json
import socket
import time

import httpx
import pytest

from attestation.proxy.access import AccessRules
from attestation.proxy.server import Limits
from enclave.tls import TlsManager

from .conftest import PAT, Server
from .mitm import Mitm
from .proxyrun import make_proxy, relay_test_app  # noqa: F401 - make_proxy is a fixture
from .test_adversaries import PRODUCTION_POLICY


# These tests relay to the test app's own routes (/echo, /sse, /v1/secret...), outside the model APIs the proxy
# relays by default; test_proxy_attacks.py tests that default.
ALL_PATHS = AccessRules(allow_all_paths=True)


@pytest.fixture
def upstream(make_server):
    return make_server(relay_test_app)


def local_client() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=10)


def error_of(response: httpx.Response) -> dict:
    doc = response.json()
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}
    assert doc["error"]["param"] is None
    return doc["error"]


def test_forwards_request_and_response_and_replaces_the_clients_authorization(upstream, make_proxy, sim_policy):
    proxy = make_proxy(upstream.url, sim_policy, pat=PAT, access=ALL_PATHS)
    body = b'{"model": "m", "messages": []}' * 100
    headers = {"Authorization": "Bearer someone-elses", "X-Custom": "kept", "Proxy-Authorization": "Basic x",
               "Connection": "keep-alive, X-Hop", "X-Hop": "dropped", "Content-Type": "application/json"}
    with local_client() as client:
        response = client.post(f"{proxy.url}/echo/a%2Fb/c?x=1&y=%20", content=body, headers=headers)
        chunked = client.put(f"{proxy.url}/echo/chunked", content=iter([b"part one, ", b"part two"]),
                             headers={"Authorization": "Bearer"})  # Continue's empty Bearer: replaced too
    assert response.status_code == 201 and response.headers["x-upstream-echo"] == "yes"
    seen = response.json()
    assert seen["method"] == "POST" and seen["raw_path"] == "/echo/a%2Fb/c" and seen["query"] == "x=1&y=%20"
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    sent = dict(seen["headers"])
    assert len([k for k, _ in seen["headers"] if k == "authorization"]) == 1
    assert sent["authorization"] == f"Bearer {PAT}"
    assert sent["host"] == f"127.0.0.1:{upstream.port}" and sent["x-custom"] == "kept"
    assert sent["content-type"] == "application/json" and sent["content-length"] == str(len(body))
    assert not {"proxy-authorization", "x-hop", "keep-alive"} & set(sent)
    assert chunked.status_code == 201
    assert chunked.json()["body_sha256"] == hashlib.sha256(b"part one, part two").hexdigest()
    assert upstream.app.state.seen_authorization == [f"Bearer {PAT}"] * 2
    assert proxy.attestor.verifications == 1  # one verified, pinned, kept-alive upstream connection


def test_without_a_pat_file_the_clients_authorization_passes_through(upstream, make_proxy, sim_policy):
    proxy = make_proxy(upstream.url, sim_policy, access=ALL_PATHS)
    with local_client() as client:
        assert client.get(f"{proxy.url}/v1/secret", headers={"Authorization": f"Bearer {PAT}"}).json() == \
            {"secret": "ok"}
        refused = client.get(f"{proxy.url}/v1/secret")
    assert refused.status_code == 401 and error_of(refused)["code"] == "invalid_api_key"  # the enclave's answer
    assert upstream.app.state.seen_authorization == [f"Bearer {PAT}", ""]


def test_a_mitm_gets_502_attestation_failed_and_not_one_byte(upstream, make_proxy, sim_policy, tmp_path):
    mitm = Mitm(upstream.tls.current.certificate, upstream.port, tmp_path)
    try:
        proxy = make_proxy(mitm.url, sim_policy, pat=PAT, access=ALL_PATHS)
        with local_client() as client:
            response = client.post(f"{proxy.url}/echo/x", content=b"prompt", headers={"Authorization": "Bearer c"})
            again = client.get(f"{proxy.url}/v1/secret")  # the same connection still answers: kept alive
    finally:
        mitm.close()
    assert response.status_code == 502 and again.status_code == 502
    error = error_of(response)
    assert error["code"] == "attestation_failed" and error["type"] == "api_error"
    assert "certificate_appraisal" in error["message"] and "report_data" in error["message"]
    assert mitm.handshakes >= 1 and bytes(mitm.recorded) == b""  # no request line, no header, no PAT
    assert upstream.app.state.seen_authorization == []


def test_a_policy_the_enclave_does_not_meet_gets_502_naming_the_check(upstream, make_proxy):
    proxy = make_proxy(upstream.url, PRODUCTION_POLICY, pat=PAT, access=ALL_PATHS)
    with local_client() as client:
        response = client.get(f"{proxy.url}/v1/secret")
    error = error_of(response)
    assert response.status_code == 502 and error["code"] == "attestation_failed"
    assert "certificate_appraisal" in error["message"] and "sim" in error["message"]
    assert upstream.app.state.seen_authorization == []


def test_an_unreachable_enclave_is_502_attestation_failed(make_proxy, sim_policy):
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proxy = make_proxy(f"https://127.0.0.1:{port}", sim_policy, pat=PAT, access=ALL_PATHS)
    with local_client() as client:
        response = client.get(f"{proxy.url}/v1/secret")
    assert response.status_code == 502
    error = error_of(response)
    assert error["code"] == "attestation_failed" and error["message"].startswith("connect:")


def test_sse_events_reach_the_client_one_by_one(upstream, make_proxy, sim_policy):
    proxy = make_proxy(upstream.url, sim_policy, pat=PAT, access=ALL_PATHS)
    arrived: list[tuple[float, bytes]] = []
    buffer = b""
    with local_client() as client, client.stream("GET", f"{proxy.url}/sse?n=4&pause=0.3") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["transfer-encoding"] == "chunked"
        for chunk in response.iter_raw():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                arrived.append((time.monotonic(), event))
    assert [e for _, e in arrived] == [b'data: {"i": %d}' % i for i in range(4)] + [b"data: [DONE]"]
    produced = upstream.app.state.produced
    assert len(produced) == 4
    for i in range(3):  # event i was in the client's hands before the upstream produced event i + 1
        assert arrived[i][0] < produced[i + 1], f"event {i} was held back until a later one was produced"


def test_client_disconnect_mid_stream_reaches_the_upstream_within_a_second(upstream, make_proxy, sim_policy):
    proxy = make_proxy(upstream.url, sim_policy, pat=PAT, access=ALL_PATHS)
    conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    conn.sendall(b"GET /forever HTTP/1.1\r\nHost: " + proxy.host + b"\r\n\r\n")
    received = b""
    while b'{"line": 1}' not in received:
        received += conn.recv(65536)
    assert b"transfer-encoding: chunked" in received.lower()
    conn.close()
    closed_at = time.monotonic()
    assert upstream.app.state.gone.wait(timeout=1.0), "the upstream kept generating after the client left"
    assert upstream.app.state.gone_at - closed_at < 1.0


def test_key_rotation_and_enclave_restart_need_no_client_action(make_server, make_proxy, sim_provider, sim_policy):
    first = make_server(relay_test_app)
    proxy = make_proxy(first.url, sim_policy, pat=PAT, access=ALL_PATHS)
    with local_client() as client:
        assert client.get(f"{proxy.url}/v1/connection-key").json()["spki_sha256"] == first.tls.current.spki_sha256
        rotated = first.tls.rotate()
        with client.stream("GET", f"{proxy.url}/sse?n=2&pause=0.3") as held:  # keeps the pinned connection busy
            fresh = client.get(f"{proxy.url}/v1/connection-key")  # so this one opens a new connection
            assert held.status_code == 200
            held.read()
        assert fresh.json()["spki_sha256"] == rotated.spki_sha256
        assert proxy.attestor.verifications == 2 and proxy.attestor.pinned == rotated.spki_sha256

        port = first.port
        first.stop()  # the enclave restarts with a new key on the same address
        tls = TlsManager(sim_provider, hostnames=["127.0.0.1"], rotate_every=None)
        tls.start()
        second = Server(relay_test_app(tls), tls, port=port).start()
        try:
            response = client.get(f"{proxy.url}/v1/secret")
            assert response.status_code == 200 and response.json() == {"secret": "ok"}
            assert proxy.attestor.verifications == 3
            assert proxy.attestor.last_report.previous_pin == rotated.spki_sha256
            assert proxy.attestor.pinned == tls.current.spki_sha256
        finally:
            second.stop()
            tls.stop()


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(data)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    return received


def envelope_of(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


def test_bad_oversized_and_too_large_requests_are_refused_before_the_upstream(upstream, make_proxy, sim_policy):
    proxy = make_proxy(upstream.url, sim_policy, pat=PAT, limits=Limits(max_body_bytes=1000, max_header_bytes=4096),
                       access=ALL_PATHS)
    host = b"Host: " + proxy.host + b"\r\n"
    status, error = envelope_of(raw_exchange(proxy.port, b"POST /echo/x HTTP/1.1\r\n" + host +
                                                         b"Content-Length: 5000\r\n\r\n"))
    assert status == 413 and error["code"] == "request_too_large"
    status, error = envelope_of(raw_exchange(proxy.port, b"POST /echo/x HTTP/1.1\r\n" + host + b"Transfer-Encoding: "
                                                         b"chunked\r\n\r\n400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n"))
    assert status == 413 and error["code"] == "request_too_large"
    status, error = envelope_of(raw_exchange(proxy.port, b"GET /echo/x HTTP/1.1\r\n" + host + b"X-Big: "
                                                         + b"y" * 8000 + b"\r\n\r\n"))
    assert status == 431 and error["code"] == "request_header_fields_too_large"
    status, error = envelope_of(raw_exchange(proxy.port, b"NOT HTTP AT ALL\r\n\r\n"))
    assert status == 400 and error["type"] == "invalid_request_error"
    status, error = envelope_of(raw_exchange(proxy.port, b"GET http://elsewhere.example/x HTTP/1.1\r\n" + host + b"\r\n"))
    assert status == 400 and "origin-form" in error["message"]
    assert upstream.app.state.seen_authorization == []
    with local_client() as client:  # and a good request still goes through
        assert client.post(f"{proxy.url}/echo/x", content=b"z" * 1000).status_code == 201


def test_keep_alive_serves_several_requests_on_one_client_connection(upstream, make_proxy, sim_policy):
    proxy = make_proxy(upstream.url, sim_policy, pat=PAT, access=ALL_PATHS)
    host = b"Host: " + proxy.host + b"\r\n"
    request = b"GET /echo/k HTTP/1.1\r\n" + host + b"\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
        conn.sendall(request + request + b"GET /echo/k HTTP/1.1\r\n" + host + b"Connection: close\r\n\r\n")
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 201 ") == 3
    assert len(upstream.app.state.seen_authorization) == 3
