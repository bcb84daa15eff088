"""The identity store on SQLite and on PostgreSQL (fresh schema per test): migrations, CRUD, cascades, auth."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from enclave.store import Conflict, Store
from tests.enclave.conftest import ROW_KEY


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}", row_key=ROW_KEY)
    else:
        url, schema = request.getfixturevalue("pg_schema_url")
        s = await Store.open(url, schema=schema, row_key=ROW_KEY)
    try:
        yield s
    finally:
        await s.close()


def later(**kw: float) -> datetime:
    return datetime.now(UTC) + timedelta(**kw)


async def test_migrations_are_idempotent_and_versioned(store: Store) -> None:
    async with store.engine.connect() as conn:
        version = (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar_one()
        tables = await conn.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
    assert version == "0006_audit"
    assert {"users", "domains", "memberships", "pats"} <= tables


async def test_users_domains_memberships(store: Store) -> None:
    alice = await store.create_user("alice", is_superadmin=True)
    bob = await store.create_user("bob")
    with pytest.raises(Conflict):
        await store.create_user("bob")
    d = await store.create_domain("lab", model_allowlist=["llama*"])
    assert (await store.get_domain(d.id)).model_allowlist == ("llama*",)
    with pytest.raises(Conflict):
        await store.create_domain("lab")
    await store.set_membership(d.id, bob.id, "member")
    await store.set_membership(d.id, bob.id, "admin")              # role change, not a duplicate
    assert [(m.user.name, m.role) for m in await store.list_members(d.id)] == [("bob", "admin")]
    assert await store.roles_of(bob.id) == {d.id: "admin"}
    with pytest.raises(ValueError):
        await store.set_membership(d.id, bob.id, "owner")
    with pytest.raises(Conflict):
        await store.set_membership(d.id, "00000000-0000-0000-0000-000000000000", "member")
    assert await store.count_superadmins() == 1
    assert (await store.update_user(bob.id, is_superadmin=True)).is_superadmin
    updated = await store.update_domain(d.id, clear_allowlist=True)
    assert updated.model_allowlist is None
    assert [u.name for u in await store.list_users()] == ["alice", "bob"]
    assert await store.remove_membership(d.id, bob.id) and not await store.remove_membership(d.id, bob.id)
    assert alice.created_at.tzinfo is not None


async def test_pats_auth_record_revocation_and_cascade(store: Store) -> None:
    bob = await store.create_user("bob")
    d1, d2 = await store.create_domain("one"), await store.create_domain("two")
    await store.set_membership(d1.id, bob.id, "member")
    await store.set_membership(d2.id, bob.id, "admin")
    expires = later(days=30)
    pat = await store.create_pat(user_id=bob.id, name="t", token_hash="a" * 64, last4="WXYZ",
                                 scopes=["models:read"], expires_at=expires, model_allowlist=["x"])
    bound = await store.create_pat(user_id=bob.id, name="b", token_hash="b" * 64, last4="ABCD",
                                   scopes=["manage"], expires_at=expires, domain_id=d2.id)
    with pytest.raises(Conflict):
        await store.create_pat(user_id=bob.id, name="dup", token_hash="a" * 64, last4="WXYZ", scopes=[],
                               expires_at=expires)
    rec = await store.find_auth("a" * 64)
    assert rec is not None and rec.user.name == "bob" and dict(rec.roles) == {d1.id: "member", d2.id: "admin"}
    assert rec.pat.scopes == ("models:read",) and rec.pat.model_allowlist == ("x",)
    assert abs((rec.pat.expires_at - expires).total_seconds()) < 1e-3
    assert await store.find_auth("c" * 64) is None
    generation = store.generation
    revoked = await store.revoke_pat(pat.id)
    assert revoked.revoked_at is not None and store.generation > generation
    assert (await store.find_auth("a" * 64)).pat.revoked_at is not None
    assert [p.id for p in await store.list_pats(domain_id=d2.id)] == [bound.id]
    await store.delete_domain(d2.id)                                   # cascades to bound PATs and memberships
    assert await store.get_pat(bound.id) is None
    assert await store.roles_of(bob.id) == {d1.id: "member"}
    await store.delete_user(bob.id)
    assert await store.get_pat(pat.id) is None and await store.list_members(d1.id) == []


async def test_last_used_batch_never_goes_backwards(store: Store) -> None:
    u = await store.create_user("u")
    p = await store.create_pat(user_id=u.id, name="t", token_hash="d" * 64, last4="abcd", scopes=[],
                               expires_at=later(days=1))
    t1 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    generation = store.generation
    await store.record_last_used({p.id: t1})
    await store.record_last_used({p.id: t1 - timedelta(hours=1)})
    assert (await store.get_pat(p.id)).last_used_at == t1
    await store.record_last_used({p.id: t1 + timedelta(minutes=1), "unknown-id": t1})
    assert (await store.get_pat(p.id)).last_used_at == t1 + timedelta(minutes=1)
    assert store.generation == generation        # usage bookkeeping does not invalidate auth caches


async def test_reopen_keeps_data_and_sqlite_file_is_private(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'sub' / 'e.db'}"
    s = await Store.open(url, row_key=ROW_KEY)
    await s.create_user("keep")
    await s.close()
    s = await Store.open(url, row_key=ROW_KEY)
    try:
        assert [u.name for u in await s.list_users()] == ["keep"]
    finally:
        await s.close()
    assert stat.S_IMODE(os.stat(tmp_path / "sub" / "e.db").st_mode) == 0o600


async def test_issued_by_is_recorded_and_survives_the_issuer(store: Store) -> None:
    admin = await store.create_user("issuer")
    owner = await store.create_user("owner")
    own = await store.create_pat(user_id=owner.id, name="own", token_hash="1" * 64, last4="aaaa",
                                 scopes=["models:read"], expires_at=later(days=1))
    issued = await store.create_pat(user_id=owner.id, name="issued", token_hash="2" * 64, last4="bbbb",
                                    scopes=["models:read"], expires_at=later(days=1), issued_by=admin.id)
    assert own.issued_by == owner.id and (await store.get_pat(issued.id)).issued_by == admin.id
    await store.delete_user(admin.id)
    assert (await store.get_pat(issued.id)).issued_by is None      # the key stays, its issuer is gone
    assert (await store.get_user_by_name("owner")).id == owner.id and await store.get_user_by_name("x") is None
