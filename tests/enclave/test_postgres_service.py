"""Two service replicas on one PostgreSQL: a revocation through one is refused by the other at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from enclave.store import Store

from tests.enclave.conftest import SERVER_SECRET, EnclaveServer, FakeClock, make_settings, seed_world, PAT_KEY, ROW_KEY


def test_revocation_visible_across_replicas(tmp_path: Path, pg_schema_url: tuple[str, str]) -> None:
    url, schema = pg_schema_url
    clock = FakeClock()

    async def seed():
        store = await Store.open(url, schema=schema, row_key=ROW_KEY)
        try:
            return await seed_world(store, PAT_KEY, clock())
        finally:
            await store.close()

    world = asyncio.run(seed())
    replicas = [EnclaveServer(make_settings(tmp_path / name, database_url=url, database_schema=schema),
                              clock=clock).start() for name in ("r1", "r2")]
    try:
        assert not replicas[0].settings.auth_cache_enabled()
        a = world.domains["A"]
        with replicas[0].client(world.tokens["superadmin"]) as root:
            token = root.post(f"/admin/users/{world.users['member_a']}/pats", json={"name": "x"}).json()["token"]
        with replicas[1].client(token) as other:
            assert other.get(f"/proxy/{a}/v1/models").json() == {"object": "list", "data": []}
            with replicas[0].client(world.tokens["superadmin"]) as root:
                pats = root.get(f"/admin/users/{world.users['member_a']}/pats").json()
                pat_id = next(p["id"] for p in pats if p["name"] == "x")
                assert root.delete(f"/admin/users/{world.users['member_a']}/pats/{pat_id}").status_code == 204
            assert other.get(f"/proxy/{a}/v1/models").status_code == 401
        with replicas[1].client(world.tokens["superadmin"]) as c:
            ready = c.get("/ready").json()
            assert ready["status"] == "ready" and ready["store"]["ok"] is True and ready["backends"] == []
    finally:
        for r in replicas:
            r.stop()
