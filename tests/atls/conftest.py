"""Fixtures for attested-TLS tests: the simulated platform, policies, and real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse

from attestation.policy import Policy, policy_from_yaml, sim_policy_yaml
from attestation.providers import SimProvider
from enclave.attestation_api import attestation_router
from enclave.tls import STATE_KEY, TlsManager, uvicorn_config

PAT = "cube_pat_test_0123456789abcdef"


@pytest.fixture(scope="session")
def sim_provider(tmp_path_factory: pytest.TempPathFactory) -> SimProvider:
    return SimProvider(tmp_path_factory.mktemp("sim"))


@pytest.fixture(scope="session")
def sim_policy(sim_provider: SimProvider) -> Policy:
    return policy_from_yaml(sim_policy_yaml(sim_provider.fingerprint))


def bind_loopback(port: int = 0) -> socket.socket:
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP; without it
    # Nagle and delayed ACKs add ~40 ms to every keep-alive answer (uvicorn's own sockets get it).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


class Server:
    """uvicorn in a thread on a loopback socket, served with a TlsManager's context."""

    def __init__(self, app: Any, tls: TlsManager, *, port: int = 0, **config: Any) -> None:
        self.tls = tls
        self.app = app
        self.sock = bind_loopback(port)
        self.port = self.sock.getsockname()[1]
        options: dict[str, Any] = {"log_level": "warning", "lifespan": "off", "timeout_keep_alive": 30, **config}
        self.server = uvicorn.Server(uvicorn_config(tls, app, host="127.0.0.1", port=self.port, **options))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        # force_exit: do not wait for idle keep-alive TLS connections to finish their close_notify
        # exchange (asyncio waits up to 30 s for the peer's reply, which an idle client never reads)
        self.server.should_exit = True
        self.server.force_exit = True
        self.thread.join(timeout=10)
        if self.thread.is_alive():
            raise RuntimeError("uvicorn did not stop")
        self.sock.close()


def enclave_like_app(tls: TlsManager, *, rate: float = 1000.0, burst: int = 1000,
             attestation: Any = None) -> FastAPI:
    """An enclave-like app: the attestation router and a PAT-protected endpoint that records what it saw."""
    app = FastAPI()
    app.state.seen_authorization = []
    app.include_router(attestation if attestation is not None else attestation_router(tls, per_connection_rate=rate,
                                                                                        burst=burst))

    @app.get("/v1/secret")
    async def secret(request: Request) -> JSONResponse:
        auth = request.headers.get("authorization", "")
        app.state.seen_authorization.append(auth)
        if auth != f"Bearer {PAT}":
            return JSONResponse({"error": {"message": "bad token", "type": "invalid_request_error",
                                           "param": None, "code": "invalid_api_key"}}, status_code=401)
        return JSONResponse({"secret": "ok"})

    @app.get("/v1/connection-key")
    async def connection_key(request: Request) -> JSONResponse:
        material = request.scope["state"].get(STATE_KEY)
        return JSONResponse({"spki_sha256": material.spki_sha256 if material else None})

    @app.get("/v1/redirect")
    async def redirect() -> RedirectResponse:
        return RedirectResponse("https://example.invalid/steal", status_code=302)

    return app


@pytest.fixture
def make_server(sim_provider: SimProvider) -> Iterator[Callable[..., Server]]:
    started: list[tuple[Server, TlsManager]] = []

    def make(app_factory: Callable[[TlsManager], Any] = enclave_like_app, *, port: int = 0,
             rotate_every: float | None = None, tls: TlsManager | None = None, **config: Any) -> Server:
        manager = tls or TlsManager(sim_provider, hostnames=["localhost", "127.0.0.1"], rotate_every=rotate_every)
        manager.start()
        server = Server(app_factory(manager), manager, port=port, **config).start()
        started.append((server, manager))
        return server

    yield make
    for server, manager in started:
        server.stop()
        manager.stop()


@pytest.fixture
def webpki_mitm(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A TLS server whose CA the process trusts (``SSL_CERT_FILE``), as a WebPKI-certified MITM would be."""
    from .webpki import TrustedMitm  # webpki imports this module

    server = TrustedMitm(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(server.ca_file))
    yield server
    server.close()
