"""Two service replicas on one PostgreSQL hold shared limits within the bound docs/limits.md states: requests
per minute and concurrency never pass the limit; tokens pass it by at most the tokens of the requests in flight
when the budget ran out; a limit set through one replica binds the other within a sync interval."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from enclave.store import Store

from tests.enclave.conftest import PAT_KEY, ROW_KEY, EnclaveServer, FakeClock, World, make_settings, seed_world
from tests.enclave.limits_support import CHAT, Tenant, new_tenant
from tests.fakes.vllm import BASE_MODEL, FakeVllm

SYNC = 0.2


@dataclass
class Pair:
    """Just enough of inference_support.Service for limits_support's helpers, over replica 0."""
    server: EnclaveServer
    world: World
    replicas: list[EnclaveServer]
    fake: FakeVllm


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[Pair]:
    import uuid

    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    schema = f"t_{uuid.uuid4().hex[:12]}"
    clock = FakeClock()     # one clock: both replicas count in the same windows

    async def seed() -> World:
        store = await Store.open(postgres_url, schema=schema, row_key=ROW_KEY)
        try:
            return await seed_world(store, PAT_KEY, clock())
        finally:
            await store.close()

    async def drop() -> None:
        engine = create_async_engine(postgres_url)
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()

    world = asyncio.run(seed())
    tmp = tmp_path_factory.mktemp("limits-replicas")
    with FakeVllm() as fake:
        replicas = [EnclaveServer(make_settings(tmp / name, database_url=postgres_url, database_schema=schema,
                                                backends=[{"name": "vllm", "kind": "vllm", "base_url": fake.base_url,
                                                           "max_in_flight": 64}],
                                                quotas={"sync_seconds": SYNC}), clock=clock).start()
                    for name in ("r1", "r2")]
        try:
            yield Pair(replicas[0], world, replicas, fake)
        finally:
            for r in replicas:
                r.stop()
            asyncio.run(drop())


def client(server: EnclaveServer, token: str, **kw) -> httpx.Client:
    return httpx.Client(base_url=server.url, verify=server.client_ssl(), timeout=30,
                        headers={"Authorization": f"Bearer {token}"}, **kw)


def ask(server: EnclaveServer, t: Tenant, *, stream: bool = False) -> httpx.Response:
    with client(server, t.token) as c:
        return c.post(f"/proxy/{t.domain_id}/v1/{CHAT}", json={"model": BASE_MODEL, "stream": stream,
                                                               "messages": [{"role": "user", "content": "hi"}]})


def limit_everywhere(pair: Pair, t: Tenant, **values: object) -> None:
    """Set the key's limits through replica 0 and wait until replica 1 has read them."""
    with client(pair.replicas[0], pair.world.tokens["superadmin"]) as c:
        r = c.put(f"/admin/pats/{t.pat_id}/limits", json=values)
    assert r.status_code == 200, r.text
    other = pair.replicas[1].ctx.quotas
    deadline = time.monotonic() + 5
    while True:
        own = other.own.get(next(s for s in other.subjects(t.pat_id, t.user_id, t.domain_id)))
        if own is not None and all(own.values.get(k) == v for k, v in values.items()):
            return
        assert time.monotonic() < deadline, "replica 1 did not read the new limits within a few sync intervals"
        time.sleep(0.02)


def posts(pair: Pair) -> int:
    return len([r for r in pair.fake.requests if r.method == "POST"])


def test_requests_per_minute_never_pass_the_limit_across_replicas(pair: Pair) -> None:
    t = new_tenant(pair)
    limit_everywhere(pair, t, rpm=20)
    before = posts(pair)
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: ask(pair.replicas[i % 2], t).status_code, range(60)))
    assert answers.count(200) == 20 and answers.count(429) == 40        # the bound for requests: 0
    assert posts(pair) - before == 20


def test_tokens_pass_the_limit_by_at_most_what_was_in_flight(pair: Pair) -> None:
    t = new_tenant(pair)
    per_request = ask(pair.replicas[0], t).json()["usage"]["total_tokens"]
    limit = 10 * per_request
    limit_everywhere(pair, t, tpm=limit)
    served: list[int] = []
    lock = threading.Lock()
    workers = 8

    def work(i: int) -> None:
        while True:
            r = ask(pair.replicas[i % 2], t)
            if r.status_code != 200:
                assert r.status_code == 429 and r.json()["error"]["type"] == "tokens"
                return
            with lock:
                served.append(r.json()["usage"]["total_tokens"])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    # every admission found budget left, so at least the limit was served; and at most one request per
    # worker (the ones in flight) beyond it
    assert limit <= sum(served) <= limit + workers * per_request


def test_concurrency_is_shared_and_a_slot_freed_on_one_replica_serves_the_other(pair: Pair) -> None:
    t = new_tenant(pair)
    limit_everywhere(pair, t, concurrent=2)
    pair.fake.stall_after = 1
    body = {"model": BASE_MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    try:
        with client(pair.replicas[0], t.token) as c0, client(pair.replicas[1], t.token) as c1:
            with c0.stream("POST", f"/proxy/{t.domain_id}/v1/{CHAT}", json=body) as s0:
                lines0 = s0.iter_lines()
                assert next(lines0).startswith("data: ")
                with c1.stream("POST", f"/proxy/{t.domain_id}/v1/{CHAT}", json=body) as s1:
                    lines1 = s1.iter_lines()
                    assert next(lines1).startswith("data: ")
                    for server in pair.replicas:
                        r = ask(server, t)
                        assert r.status_code == 429 and r.headers["retry-after"] == "1"
                # replica 1's slot is free: replica 0 gets it (after replica 1 gives its lease back)
                pair.fake.stall_after = None
                deadline = time.monotonic() + 10 * SYNC + 5
                while (r := ask(pair.replicas[0], t)).status_code == 429:
                    assert time.monotonic() < deadline, "the freed slot never reached the other replica"
                    time.sleep(0.05)
                assert r.status_code == 200
    finally:
        pair.fake.stall_after = None
