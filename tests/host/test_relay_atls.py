"""The relay between the attested-TLS client and a simulated enclave (TlsManager + attestation endpoint):
the client attests and talks through it unchanged; a hop that flips one byte is caught by TLS."""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from attestation.atls.client import AttestedClient
from attestation.errors import AttestationError
from attestation.policy import policy_from_yaml, sim_policy_yaml
from attestation.providers import SimProvider
from enclave.attestation_api import ATTESTATION_PATH, attestation_router
from enclave.tls import TlsManager, uvicorn_config
from host.relay import Relay, RelayLimits
from tests.host.servers import LOOPBACK, TamperingProxy

PAT = "cube_pat_relay_test_0123456789"
BIG = os.urandom(300_000)


class Enclave:
    """A stand-in enclave: uvicorn with the TlsManager's attested TLS, on 127.0.0.1 in a thread."""

    def __init__(self, provider: SimProvider, *, rate: float = 1000.0, burst: int = 1000) -> None:
        self.tls = TlsManager(provider, hostnames=["localhost", "127.0.0.1"], rotate_every=None)
        self.tls.start()
        app = FastAPI()
        app.include_router(attestation_router(self.tls, per_connection_rate=rate, burst=burst))
        self.seen_authorization: list[str] = []

        @app.get("/v1/secret")
        async def secret(request: Request) -> JSONResponse:
            self.seen_authorization.append(request.headers.get("authorization", ""))
            return JSONResponse({"secret": "ok"})

        @app.get("/v1/big")
        async def big() -> Response:
            return Response(BIG, media_type="application/octet-stream")

        config = uvicorn_config(self.tls, app, host=LOOPBACK, port=0, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        import socket

        self.sock = socket.create_server((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "enclave stand-in did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.server.force_exit = True
        self.thread.join(10)
        self.sock.close()
        self.tls.stop()


@pytest.fixture(scope="module")
def provider(tmp_path_factory) -> SimProvider:
    return SimProvider(tmp_path_factory.mktemp("sim"))


@pytest.fixture
def enclave(provider):
    e = Enclave(provider)
    yield e
    e.stop()


async def test_attested_client_through_the_relay(enclave, provider) -> None:
    policy = policy_from_yaml(sim_policy_yaml(provider.fingerprint))
    relay = Relay((LOOPBACK, 0), ("tcp", LOOPBACK, enclave.port), RelayLimits())
    host, port = await relay.start()

    def client() -> tuple[dict, bytes, bool]:
        with AttestedClient(f"https://{host}:{port}", policy=policy) as c:
            secret = c.get("/v1/secret", headers={"authorization": f"Bearer {PAT}"}).json()
            big = c.get("/v1/big").content
            return secret, big, c.verification_report is not None

    try:
        secret, big, verified = await asyncio.to_thread(client)
        assert secret == {"secret": "ok"} and big == BIG and verified
        assert enclave.seen_authorization == [f"Bearer {PAT}"]
        assert relay.stats.bytes_down > len(BIG)  # only ciphertext passed the relay
    finally:
        await relay.stop(1)


@pytest.mark.parametrize("offset", [1500, 200_000], ids=["during-handshake", "in-response-body"])
async def test_one_flipped_byte_in_transit_fails_the_client(enclave, provider, offset) -> None:
    """client -> relay -> lying hop (flips one bit) -> enclave: an error, never altered data."""
    policy = policy_from_yaml(sim_policy_yaml(provider.fingerprint))
    liar = TamperingProxy(enclave.port, offset=offset)
    relay = Relay((LOOPBACK, 0), ("tcp", LOOPBACK, liar.port), RelayLimits())
    host, port = await relay.start()

    def client() -> bytes:
        with AttestedClient(f"https://{host}:{port}", policy=policy) as c:
            c.get("/v1/secret")
            return c.get("/v1/big").content

    try:
        with pytest.raises((httpx.TransportError, AttestationError)):
            got = await asyncio.to_thread(client)
            assert got != BIG  # unreachable: reaching here with data means tampering went unnoticed
        assert liar.flipped.is_set()
    finally:
        await relay.stop(1)
        liar.close()


async def test_attackers_behind_the_relay_cannot_fail_a_victims_attestation(provider) -> None:
    """Behind the relay the enclave sees one peer address for everyone: two attackers hammering the attestation
    endpoint on their own connections get 429 there, and every victim's attestation still succeeds."""
    enclave = Enclave(provider, rate=0.01, burst=3)
    policy = policy_from_yaml(sim_policy_yaml(provider.fingerprint))
    relay = Relay((LOOPBACK, 0), ("tcp", LOOPBACK, enclave.port), RelayLimits())
    host, port = await relay.start()
    url = f"https://{host}:{port}"
    stop = threading.Event()
    attacker_codes: list[int] = []

    def attack() -> None:
        with AttestedClient(url, policy=policy) as c:
            deadline = time.monotonic() + 20
            while not stop.is_set() and time.monotonic() < deadline:
                attacker_codes.append(c.get(ATTESTATION_PATH, params={"nonce": secrets.token_hex(32)}).status_code)

    def victims() -> list[int]:
        while len(attacker_codes) < 10:
            time.sleep(0.01)
        codes = []
        for _ in range(6):
            with AttestedClient(url, policy=policy) as c:
                codes.append(c.get("/v1/secret", headers={"authorization": f"Bearer {PAT}"}).status_code)
        return codes

    attackers = [threading.Thread(target=attack, daemon=True) for _ in range(2)]
    for thread in attackers:
        thread.start()
    try:
        assert await asyncio.to_thread(victims) == [200] * 6
        assert 429 in attacker_codes
    finally:
        stop.set()
        for thread in attackers:
            await asyncio.to_thread(thread.join, 10)
        await relay.stop(1)
        enclave.stop()
