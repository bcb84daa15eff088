"""The OpenAPI document tells the truth: Schemathesis drives every operation of the running service (real
TLS, seeded identities, fake backends) with generated valid and invalid input and runs all of its checks.

Bounded for CI: a fixed number of examples per operation. Every case gets a freshly minted superadmin key, so
the self-revoking operations (``DELETE /users/me/pats/{pat_id}`` on the calling key, revoking or deleting the
calling user) cannot starve the cases after them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from enclave.access import ALL_SCOPES
from enclave.store import Store
from enclave.tokens import generate_token, token_hash

from tests.enclave.conftest import SERVER_SECRET, EnclaveServer, FakeClock, World, make_settings, PAT_KEY
from tests.enclave.test_service import backends, start_service
from tests.fakes.ollama import FakeOllama
from tests.fakes.vllm import FakeVllm

EXAMPLES = int(os.environ.get("CUBE_SCHEMATHESIS_EXAMPLES", "15"))   # per operation; CI-bounded


class Service:
    def __init__(self, server: EnclaveServer, world: World, clock: FakeClock) -> None:
        self.server = server
        self.world = world
        self.clock = clock
        self.max_days = server.settings.pat_max_ttl_days
        self.session = requests.Session()
        self.session.trust_env = False   # else REQUESTS_CA_BUNDLE from the environment overrides `verify`
        self.session.verify = str(server.cert_path)

    def fresh_superadmin_token(self) -> str:
        """A new superadmin user and key for one case (a case may have revoked or deleted the previous one)."""
        store: Store = self.server.ctx.store

        async def mint() -> str:
            user = await store.create_user(f"st-{generate_token()[-12:]}", is_superadmin=True)
            token = generate_token()
            await store.create_pat(user_id=user.id, name="schemathesis",
                                   token_hash=token_hash(PAT_KEY, token), last4=token[-4:],
                                   scopes=ALL_SCOPES,
                                   # outlives any key a case may ask for (a new key may not outlive its creator)
                                   expires_at=self.clock() + timedelta(days=self.max_days + 1))
            return token

        return self.server.run_async(mint())


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    clock = FakeClock()
    with FakeOllama() as ollama, FakeVllm() as vllm:
        settings_ = make_settings(tmp_path_factory.mktemp("schemathesis"), backends=backends(ollama, vllm))
        server, world = start_service(settings_, clock)
        try:
            yield Service(server, world, clock)
        finally:
            server.stop()


def _openapi_document() -> dict:
    """The document exactly as the service serves it, built from an app that is not started (collection time)."""
    import tempfile
    from pathlib import Path

    from enclave.app import create_app
    from enclave.attestation_api import attestation_router

    settings_ = make_settings(Path(tempfile.mkdtemp(prefix="cube-schemathesis-")))
    return create_app(settings_, extra_routers=[attestation_router(None)]).openapi()  # type: ignore[arg-type]


schema = schemathesis.openapi.from_dict(_openapi_document())


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_operation_conforms(case: schemathesis.Case, service: Service) -> None:
    token = service.fresh_superadmin_token()
    case.call_and_validate(base_url=service.server.url, session=service.session,
                           headers={"Authorization": f"Bearer {token}"}, verify=str(service.server.cert_path),
                           checks=_all_checks())


def _all_checks() -> list:
    from schemathesis.checks import CHECKS, load_all_checks

    load_all_checks()
    return [c for c in CHECKS.get_all() if getattr(c, "__name__", "") != "max_response_time"]


def test_405_allow_lists_every_method_of_the_path(service: Service) -> None:
    """Starlette's own 405 names only the first route's methods; a path served by several routes lists all."""
    token = service.fresh_superadmin_token()
    r = service.session.request("OPTIONS", f"{service.server.url}/admin/users",
                                headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "POST"}
