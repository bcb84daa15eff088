"""openai-python, unchanged, through the attested client against the real enclave app (enclave.app.create_app)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from attestation.atls.client import async_openai_client, openai_client
from enclave.app import create_app
from enclave.attestation_api import attestation_router
from enclave.store import Store
from enclave.tls import TlsManager

from tests.enclave.conftest import SERVER_SECRET, FakeClock, make_settings, seed_world, PAT_KEY, ROW_KEY
from tests.fakes.ollama import FakeOllama

from .conftest import Server


@pytest.fixture(scope="module")
def enclave(tmp_path_factory, sim_provider) -> Iterator[tuple[Server, str, str]]:
    with FakeOllama() as ollama:
        settings = make_settings(tmp_path_factory.mktemp("enclave"),
                                 backends=[{"name": "ollama", "kind": "ollama", "base_url": ollama.base_url}])

        async def seed():
            store = await Store.open(settings.effective_database_url(), row_key=ROW_KEY)
            try:
                return await seed_world(store, PAT_KEY, FakeClock()())
            finally:
                await store.close()

        world = asyncio.run(seed())
        tls = TlsManager(sim_provider, hostnames=["localhost", "127.0.0.1"], rotate_every=None)
        tls.start()
        app = create_app(settings, extra_routers=[attestation_router(tls)])
        server = Server(app, tls, log_config=None, lifespan="on").start()
        try:
            yield server, world.domains["A"], world.tokens["member_a"]
        finally:
            server.stop()
            tls.stop()


def test_openai_lists_models_through_the_attested_client(enclave, sim_policy):
    server, domain, token = enclave
    client = openai_client(f"{server.url}/proxy/{domain}/v1", token, sim_policy)
    ids = sorted(m.id for m in client.models.list())
    assert ids and all(isinstance(i, str) for i in ids)
    report = client._client.verification_report
    assert report.ok and report.spki_sha256 == server.tls.current.spki_sha256
    assert client.models.retrieve(ids[0]).id == ids[0]
    assert client._client.attestor.verifications == 1


async def test_async_openai_lists_models_through_the_attested_client(enclave, sim_policy):
    server, domain, token = enclave
    client = async_openai_client(f"{server.url}/proxy/{domain}/v1", token, sim_policy)
    page = await client.models.list()
    assert [m.id async for m in page]
    assert client._client.verification_report.ok
    await client.close()
