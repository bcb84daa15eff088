"""Fixtures for the enclave tests: a store over SQLite and PostgreSQL, and the service over real HTTPS."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from enclave.access import ALL_SCOPES
from enclave.app import create_app
from enclave.config import Settings, load_settings
from attestation.providers import SimProvider
from enclave.attestation_api import attestation_router
from enclave.limits import http_protocol_for
from enclave.tls import TlsManager, attested_protocol_class
from enclave.platform_secrets import PlatformSecrets
from enclave.store import Store
from enclave.tokens import generate_token, token_hash

SERVER_SECRET = "s" * 48
# The keys the tests' settings (server_secret, simulation) give the app: PAT lookup hashes and row MACs.
TEST_SECRETS = PlatformSecrets(SERVER_SECRET.encode())
PAT_KEY = TEST_SECRETS.pat_hmac_key()
ROW_KEY = TEST_SECRETS.row_mac_key()
HASH_KEY = TEST_SECRETS.ledger_hash_key()


class FakeClock:
    """A settable UTC clock handed to create_app(clock=...) for expiry tests (no sleeping)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def make_settings(tmp: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {"data_dir": str(tmp), "server_secret": SERVER_SECRET, "simulate": True, "log_json": True,
                            "registry_refresh_seconds": 3600}
    base.update(overrides)
    tmp.mkdir(parents=True, exist_ok=True)
    empty = tmp / "enclave-test.yaml"
    empty.write_text("{}\n")
    return load_settings(empty, environ={}, overrides=base)


_SIM: list[SimProvider] = []


def sim_provider() -> SimProvider:
    """One simulated platform for the whole session (its RSA-4096 root takes a moment to make)."""
    if not _SIM:
        import tempfile

        _SIM.append(SimProvider(Path(tempfile.mkdtemp(prefix="cube-enclave-sim-"))))
    return _SIM[0]


class EnclaveServer:
    """The service as `cube-enclave serve --simulate` runs it (attested TLS, sim evidence) on a loopback port,
    in a thread; clients here trust the certificate directly (the attested client is tested in tests/atls)."""

    def __init__(self, settings: Settings, **app_kwargs: Any) -> None:
        self.settings = settings
        self.tls = TlsManager(sim_provider(), hostnames=settings.tls.hostnames, rotate_every=None)
        self.tls.start()
        extra = [attestation_router(self.tls, per_connection_rate=settings.attestation.rate_limit),
                 *app_kwargs.pop("extra_routers", ())]
        self.app = create_app(settings, extra_routers=extra, **app_kwargs)
        self.ssl_context = self.tls.server_context()
        self.cert_path = settings.data_dir / "server-cert.pem"
        self.cert_path.write_bytes(self.tls.current_certificate_pem())
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP; without it
        # Nagle and delayed ACKs add ~40 ms to every keep-alive answer (uvicorn's own sockets get it).
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=True, loop="asyncio",
                                http=attested_protocol_class(http_protocol_for(settings.limits)),
                                ssl_context_factory=lambda _c, _d: self.ssl_context,
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"enclave-{self.port}")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.server.serve(sockets=[self._sock]))
        finally:
            self._loop.close()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def client_ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert_path))

    def client(self, token: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, verify=self.client_ssl(), headers=headers, timeout=10, **kw)

    @property
    def ctx(self):
        return self.app.state.ctx

    def run_async(self, coro: Any) -> Any:
        """Run a coroutine on the server's event loop (e.g. a tracker flush) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def start(self) -> "EnclaveServer":
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("enclave server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()
        self.tls.stop()


@dataclass
class World:
    """Seeded identities: two domains and one user per role, with tokens."""
    domains: dict[str, str] = field(default_factory=dict)      # label -> id
    users: dict[str, str] = field(default_factory=dict)        # label -> id
    tokens: dict[str, str] = field(default_factory=dict)       # label -> token
    pat_ids: dict[str, str] = field(default_factory=dict)


async def seed_world(store: Store, secret: bytes, now: datetime) -> World:
    w = World()
    for label in ("A", "B"):
        w.domains[label] = (await store.create_domain(f"domain-{label.lower()}")).id

    async def user(label: str, *, superadmin: bool = False, roles: dict[str, str] | None = None,
                   scopes=ALL_SCOPES, expires: datetime | None = None, revoked: bool = False,
                   domain_bound: str | None = None, allow: list[str] | None = None) -> None:
        u = await store.create_user(f"user-{label}", is_superadmin=superadmin)
        w.users[label] = u.id
        for dom, role in (roles or {}).items():
            await store.set_membership(w.domains[dom], u.id, role)
        tok = generate_token()
        pat = await store.create_pat(user_id=u.id, name=label, token_hash=token_hash(secret, tok), last4=tok[-4:],
                                     scopes=scopes, expires_at=expires or now + timedelta(days=30),
                                     domain_id=w.domains[domain_bound] if domain_bound else None,
                                     model_allowlist=allow)
        if revoked:
            await store.revoke_pat(pat.id, at=now)   # the service's (fake) clock, as a revocation through the API
        w.tokens[label] = tok
        w.pat_ids[label] = pat.id

    await user("superadmin", superadmin=True)
    await user("admin_a", roles={"A": "admin"})
    await user("member_a", roles={"A": "member"}, scopes=("models:read", "models:infer"))
    await user("noscope_a", roles={"A": "member"}, scopes=("models:infer",))
    await user("nonmember")
    await user("member_b", roles={"B": "member"}, scopes=("models:read", "models:infer"))
    await user("revoked_a", roles={"A": "member"}, revoked=True)
    await user("expired_a", roles={"A": "member"}, expires=now - timedelta(seconds=1))
    await user("bound_b", roles={"A": "member", "B": "member"}, domain_bound="B")
    await user("allow_a", roles={"A": "member"}, allow=["llama3.2:*"])
    return w


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pg_schema_url(postgres_url: str) -> Iterator[tuple[str, str]]:
    """(url, fresh schema name) on the test PostgreSQL; the schema is dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield postgres_url, schema

    async def drop() -> None:
        from sqlalchemy.ext.asyncio import create_async_engine
        from sqlalchemy import text
        engine = create_async_engine(postgres_url)
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()

    asyncio.run(drop())
