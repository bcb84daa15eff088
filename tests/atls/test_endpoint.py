"""The attestation endpoint: formats, binding to the connection's key, bad input, rate limit."""

from __future__ import annotations

import secrets
import threading
import time

import pytest
from fastapi.testclient import TestClient

from attestation.atls.binding import report_data_for
from attestation.atls.client import AttestedClient
from attestation.evidence import decode_cmw, evidence_from_json
from attestation.verifier import verify_evidence
from attestation.ratelimit import TokenBucket, client_key
from enclave.attestation_api import ATTESTATION_PATH

from .conftest import enclave_like_app


def test_cbor_by_default_and_json_when_asked(make_server, sim_policy):
    server = make_server()
    key = server.tls.current
    with AttestedClient(server.url, policy=sim_policy) as client:
        nonce = secrets.token_bytes(32)
        cbor = client.get(ATTESTATION_PATH, params={"nonce": nonce.hex()})
        assert cbor.status_code == 200 and cbor.headers["content-type"] == "application/cmw+cbor"
        assert cbor.headers["cache-control"] == "no-store"
        evidence = decode_cmw(cbor.content)
        assert evidence.platform == "sim" and evidence.binding["nonce"] == nonce
        assert verify_evidence(evidence, policy=sim_policy,
                               expected_report_data=report_data_for(key.spki_der, nonce)).ok
        upper = secrets.token_bytes(32)
        as_json = client.get(ATTESTATION_PATH, params={"nonce": upper.hex().upper()},
                             headers={"Accept": "application/json"})
        assert as_json.status_code == 200 and as_json.headers["content-type"] == "application/json"
        evidence = evidence_from_json(as_json.json())
        assert verify_evidence(evidence, policy=sim_policy,
                               expected_report_data=report_data_for(key.spki_der, upper)).ok


BAD_NONCES = {
    "missing": "",
    "too short": "nonce=" + "ab" * 31,
    "too long": "nonce=" + "ab" * 33,
    "odd length": "nonce=" + "a" * 63,
    "not hex": "nonce=" + "zz" * 32,
    "repeated": "nonce=" + "ab" * 32 + "&nonce=" + "cd" * 32,
    "empty": "nonce=",
    "spaces": "nonce=" + "ab" * 31 + "%20%20",
    "unicode digits": "nonce=" + "\u0661" * 64,
}


@pytest.mark.parametrize("query", list(BAD_NONCES.values()), ids=list(BAD_NONCES))
def test_bad_nonces_get_400_in_the_openai_envelope(make_server, sim_policy, query):
    server = make_server()
    with AttestedClient(server.url, policy=sim_policy) as client:
        response = client.get(f"{ATTESTATION_PATH}?{query}")
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == "nonce"
    assert error["code"] in ("missing_nonce", "invalid_nonce")


def test_rate_limit_gives_429_with_retry_after(make_server, sim_policy):
    server = make_server(lambda tls: enclave_like_app(tls, rate=0.01, burst=3))
    with AttestedClient(server.url, policy=sim_policy) as client:
        # the client's own verification took one token
        for _ in range(2):
            assert client.get(ATTESTATION_PATH, params={"nonce": secrets.token_hex(32)}).status_code == 200
        limited = client.get(ATTESTATION_PATH, params={"nonce": secrets.token_hex(32)})
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert limited.json()["error"]["type"] == "rate_limit_error"


def test_token_bucket_refills_and_is_per_client():
    bucket = TokenBucket(rate=1000.0, burst=1)
    assert bucket.take("a") == 0.0
    assert bucket.take("b") == 0.0
    wait = bucket.take("a")
    assert 0 < wait <= 0.001 + 1e-9
    small = TokenBucket(rate=1.0, burst=1, max_clients=2)
    for name in ("a", "b", "c"):
        small.take(name)
    assert small.take("a") == 0.0  # "a" was evicted (least recently seen) and starts full


def test_without_an_attested_tls_connection_the_endpoint_refuses(sim_provider):
    from enclave.tls import TlsManager

    tls = TlsManager(sim_provider, hostnames=["localhost"], rotate_every=None)
    tls.start()
    with TestClient(enclave_like_app(tls)) as client:  # in-process, no TLS: no key to bind to
        response = client.get(ATTESTATION_PATH, params={"nonce": secrets.token_hex(32)})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "attestation_unavailable"


@pytest.mark.parametrize("first,second,shared", [
    ("2001:db8:1:2::1", "2001:db8:1:2:ffff::7", True),    # one IPv6 /64: one bucket (a host owns all of it)
    ("2001:db8:1:2::1", "2001:db8:1:3::1", False),        # another /64: another bucket
    ("::ffff:192.0.2.1", "192.0.2.1", True),              # IPv4-mapped IPv6 is the IPv4 address
    ("192.0.2.1", "192.0.2.2", False),
])
def test_client_key_cannot_be_dodged_by_hopping_addresses_inside_an_ipv6_prefix(first, second, shared):
    assert (client_key(first) == client_key(second)) is shared


def test_attackers_hammering_their_own_connections_cannot_fail_a_victims_first_attestation(make_server, sim_policy):
    """Behind the relay every client has the relay's address: two attackers on their own connections
    used to empty the one per-address bucket, and 4 of 6 victims' attestations failed with 429."""
    server = make_server(lambda tls: enclave_like_app(tls, rate=0.01, burst=3))
    stop = threading.Event()
    attacker_codes: list[int] = []

    def attack() -> None:
        with AttestedClient(server.url, policy=sim_policy) as client:
            deadline = time.monotonic() + 20  # bounded even if the main thread dies
            while not stop.is_set() and time.monotonic() < deadline:
                attacker_codes.append(client.get(ATTESTATION_PATH, params={"nonce": secrets.token_hex(32)}).status_code)

    attackers = [threading.Thread(target=attack, daemon=True) for _ in range(2)]
    for thread in attackers:
        thread.start()
    try:
        while len(attacker_codes) < 10:  # the attackers have emptied their buckets
            time.sleep(0.01)
        for _ in range(6):
            with AttestedClient(server.url, policy=sim_policy) as victim:  # its own verification: one request
                response = victim.get(ATTESTATION_PATH, params={"nonce": secrets.token_hex(32)})
                assert response.status_code == 200, response.text
    finally:
        stop.set()
        for thread in attackers:
            thread.join(timeout=10)
    assert 429 in attacker_codes and attacker_codes.count(200) <= 2 * 2  # burst 3, one spent on verification


def test_requests_of_clients_that_hung_up_do_not_stay_in_the_device_queue(make_server, sim_provider):
    """A request waiting for the attestation device used to wait on after its client had gone: connect, ask,
    hang up, again, and the queue grew without bound (no connection held, so no connection cap applied), each
    orphan costing a device call and delaying every victim behind it. A request whose client has gone leaves
    the queue."""
    import socket
    import ssl

    from enclave.tls import TlsManager

    tls = TlsManager(sim_provider, hostnames=["localhost", "127.0.0.1"], rotate_every=None)
    produce = tls.evidence_for_key
    calls: list[float] = []

    def slow_evidence(material, nonce):
        calls.append(time.monotonic())
        time.sleep(0.3)
        return produce(material, nonce)

    tls.evidence_for_key = slow_evidence  # type: ignore[method-assign]
    server = make_server(tls=tls)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the attacker's own socket: it never looks at the evidence
    request = (f"GET {ATTESTATION_PATH}?nonce={secrets.token_hex(32)} HTTP/1.1\r\nhost: x\r\n\r\n").encode()
    for _ in range(8):
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=10)) as sock:
            sock.sendall(request)
            time.sleep(0.02)  # the request reaches the handler; then the client hangs up
    time.sleep(3.0)  # eight orphans would take 2.4 s of device time
    assert len(calls) <= 2, f"{len(calls)} device calls for clients that had hung up"
