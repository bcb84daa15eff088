"""One attested client, several replicas behind one relay: a verdict per SPKI.

Real uvicorn servers (each with its own TLS key, made by its own TlsManager) behind a real ``host.relay.Relay``
that spreads new connections over them. Keep-alive is off in the clients here, so every request is a new
connection and the relay's choice is visible.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from attestation.atls.client import AttestedClient, AttestedTLSError, Attestor, _CertificateFacts
from attestation.providers import SimProvider
from enclave.tls import TlsManager
from host.relay import Relay, RelayLimits
from tests.atls.conftest import PAT, Server, enclave_like_app
from tests.atls.proxyrun import make_proxy, relay_test_app  # noqa: F401 - make_proxy is a fixture

AUTH = {"Authorization": f"Bearer {PAT}"}
NO_KEEPALIVE = httpx.Limits(max_connections=10, max_keepalive_connections=0)


class RelayThread:
    """A relay on its own event loop in a thread, for synchronous tests."""

    def __init__(self, ports: list[int]) -> None:
        self.loop = asyncio.new_event_loop()
        self.relay = Relay(("127.0.0.1", 0), [("tcp", "127.0.0.1", p) for p in ports], RelayLimits())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        address = asyncio.run_coroutine_threadsafe(self.relay.start(), self.loop).result(10)
        self.url = f"https://127.0.0.1:{address[1]}"

    def call(self, fn, *args):
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.relay.stop(1), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def replicas(make_server):
    servers = [make_server(), make_server()]
    relay = RelayThread([s.port for s in servers])
    yield servers, relay
    relay.stop()


def test_the_client_verifies_each_replica_it_reaches_once(replicas, sim_policy) -> None:
    servers, relay = replicas
    spkis = {s.tls.current.spki_sha256 for s in servers}
    assert len(spkis) == 2                                          # each replica has its own key
    with AttestedClient(relay.url, policy=sim_policy, limits=NO_KEEPALIVE) as client:
        for _ in range(6):
            assert client.get("/v1/secret", headers=AUTH).json() == {"secret": "ok"}
        assert set(client.attestor.trusted_spkis()) == spkis
        assert client.attestor.verifications == 2                   # once per replica, then from the cache
    assert all(s.app.state.seen_authorization == [f"Bearer {PAT}"] * 3 for s in servers)


def test_a_replica_that_fails_is_refused_on_its_connections_only(make_server, sim_policy, tmp_path) -> None:
    genuine = make_server()
    other_platform = TlsManager(SimProvider(tmp_path / "another-sim"), hostnames=["127.0.0.1"], rotate_every=None)
    other_platform.start()
    impostor = Server(enclave_like_app(other_platform), other_platform).start()
    relay = RelayThread([genuine.port, impostor.port])
    try:
        with AttestedClient(relay.url, policy=sim_policy, limits=NO_KEEPALIVE) as client:
            outcomes = []
            for _ in range(4):
                try:
                    outcomes.append(client.get("/v1/secret", headers=AUTH).status_code)
                except AttestedTLSError as exc:
                    assert exc.report.spki_sha256 == other_platform.current.spki_sha256
                    outcomes.append("refused")
            assert outcomes.count(200) == 2 and outcomes.count("refused") == 2
            assert client.attestor.trusted_spkis() == [genuine.tls.current.spki_sha256]  # its verdict stands
        assert impostor.app.state.seen_authorization == []          # the PAT never reached it
        assert genuine.app.state.seen_authorization == [f"Bearer {PAT}"] * 2
    finally:
        relay.stop()
        impostor.stop()
        other_platform.stop()


def test_the_verdict_cache_is_bounded(replicas, sim_policy) -> None:
    servers, relay = replicas
    with AttestedClient(relay.url, policy=sim_policy, limits=NO_KEEPALIVE, max_verdicts=1) as client:
        for _ in range(4):   # the replicas alternate: with room for one verdict, each connection is verified
            assert client.get("/v1/secret", headers=AUTH).status_code == 200
        assert client.attestor.verifications == 4
        assert len(client.attestor.trusted_spkis()) == 1
    with pytest.raises(ValueError, match="max_verdicts"):
        AttestedClient(relay.url, policy=sim_policy, max_verdicts=0)


def test_a_drained_replica_gets_no_new_connection_and_verdicts_stay(replicas, sim_policy) -> None:
    servers, relay = replicas
    with AttestedClient(relay.url, policy=sim_policy, limits=NO_KEEPALIVE) as client:
        for _ in range(2):
            client.get("/v1/secret", headers=AUTH)
        first = relay.relay.pool.targets[0]
        relay.call(relay.relay.drain, first.name)
        for _ in range(4):
            assert client.get("/v1/secret", headers=AUTH).status_code == 200
        assert len(servers[0].app.state.seen_authorization) == 1 and len(servers[1].app.state.seen_authorization) == 5
        assert client.attestor.verifications == 2


def test_a_verdict_ends_with_its_certificate(sim_policy) -> None:
    attestor = Attestor("https://127.0.0.1:1", sim_policy, verdict_ttl=300)
    soon = datetime.now(timezone.utc) + timedelta(seconds=30)
    report = attestor.new_report()
    attestor.pin(report, _CertificateFacts(b"", "ab" * 32, None, b"", soon))  # type: ignore[arg-type]
    assert attestor.trusted("ab" * 32)
    lifetime = float(report.steps[-1].detail.split(" for ")[1].split(" s")[0])
    assert 25 < lifetime <= 30                                       # the certificate's end, not the 300 s TTL


def test_the_verifying_proxy_verifies_each_replica_it_reaches(make_server, make_proxy, sim_policy) -> None:
    from attestation.proxy.access import AccessRules

    servers = [make_server(relay_test_app), make_server(relay_test_app)]
    relay = RelayThread([s.port for s in servers])
    try:
        proxy = make_proxy(relay.url, sim_policy, pat=PAT, access=AccessRules(allow_all_paths=True))
        with httpx.Client(trust_env=False, timeout=10) as client:
            assert client.get(f"{proxy.url}/v1/secret").status_code == 200      # one kept-alive connection...
            with client.stream("GET", f"{proxy.url}/sse?n=2&pause=0.3") as held:  # ...kept busy, so the next
                other = client.get(f"{proxy.url}/v1/connection-key")           # opens a second one, which the
                assert held.status_code == 200                                  # relay gives the other replica
                held.read()
        spkis = {s.tls.current.spki_sha256 for s in servers}
        assert other.json()["spki_sha256"] in spkis
        assert set(proxy.attestor.trusted_spkis()) == spkis and proxy.attestor.verifications == 2
    finally:
        relay.stop()
