"""The host with write access to the database (SQLite file or PostgreSQL) edits, inserts and swaps rows: every
such row is refused (401/403 or left out of lists), logged with its table and key, and counted."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from enclave.access import ALL_SCOPES
from enclave.auth import Authenticator, LastUsedTracker
from enclave.errors import ApiError
from enclave.row_mac import RowMac, encode
from enclave.store import Conflict, Store, StoreError
from enclave.tokens import generate_token, token_hash
from tests.enclave.conftest import PAT_KEY, ROW_KEY, EnclaveServer, FakeClock, make_settings, seed_world


class Refusals:
    def __init__(self) -> None:
        self.tables: list[str] = []

    def __call__(self, table: str) -> None:
        self.tables.append(table)


@pytest.fixture(params=["sqlite", "postgres"])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Store, Refusals]]:
    refusals = Refusals()
    if request.param == "sqlite":
        store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'e.db'}", row_key=ROW_KEY,
                                 on_integrity_failure=refusals)
    else:
        url, schema = request.getfixturevalue("pg_schema_url")
        store = await Store.open(url, schema=schema, row_key=ROW_KEY, on_integrity_failure=refusals)
    try:
        yield store, refusals
    finally:
        await store.close()


async def host_sql(store: Store, sql: str, **params: Any) -> None:
    """What the host does with the database: plain SQL, no key."""
    async with store.engine.begin() as conn:
        await conn.execute(sa.text(sql), params)


async def world(store: Store) -> dict[str, Any]:
    root = await store.create_user("root", is_superadmin=True)
    alice = await store.create_user("alice")
    bob = await store.create_user("bob")
    dom = await store.create_domain("d", model_allowlist=["llama3.2:*"])
    await store.set_membership(dom.id, alice.id, "member")
    await store.set_membership(dom.id, bob.id, "admin")
    tokens = {}
    pats = {}
    for user, scopes in ((root, ALL_SCOPES), (alice, ("models:read",)), (bob, ("models:read", "models:infer"))):
        tok = generate_token()
        pat = await store.create_pat(user_id=user.id, name="k", token_hash=token_hash(PAT_KEY, tok), last4=tok[-4:],
                                     scopes=scopes, expires_at=datetime.now(UTC) + timedelta(days=1))
        tokens[user.name], pats[user.name] = tok, pat
    return {"root": root, "alice": alice, "bob": bob, "domain": dom, "tokens": tokens, "pats": pats}


async def auth_of(store: Store, token: str):
    return await store.find_auth(token_hash(PAT_KEY, token))


async def test_untouched_rows_pass(env) -> None:
    store, refusals = env
    w = await world(store)
    record = await auth_of(store, w["tokens"]["alice"])
    assert record is not None and record.roles == {w["domain"].id: "member"}
    assert [u.name for u in await store.list_users()] == ["alice", "bob", "root"]
    assert len(await store.list_pats()) == 3 and await store.get_domain(w["domain"].id) is not None
    assert len(await store.list_members(w["domain"].id)) == 2 and refusals.tables == []


async def test_an_inserted_pat_is_refused_even_with_the_right_token_hash(env, caplog) -> None:
    """The host inserts a superadmin key with a token hash of its choice (here even the right one, as if the
    PAT key had leaked): without the row-MAC key it cannot give the row a MAC, so the key is unknown (401)."""
    store, refusals = env
    w = await world(store)
    tok = generate_token()
    with caplog.at_level(logging.ERROR, logger="enclave.store"):
        for mac in (None, "0" * 64, w["pats"]["root"].id, "\u00e9" * 64):   # non-ASCII: no compare_digest error
            await host_sql(store, "DELETE FROM pats WHERE name = 'forged'")
            await host_sql(store, "INSERT INTO pats (id, user_id, name, token_hash, last4, scopes, created_at, "
                                  "expires_at, issued_by, mac) VALUES ('f0f0f0f0-0000-4000-8000-000000000001', :u, "
                                  "'forged', :h, 'abcd', :s, :now, :exp, :u, :mac)",
                           u=w["root"].id, h=token_hash(PAT_KEY, tok), s='["models:read","models:infer","manage"]',
                           now=datetime.now(UTC), exp=datetime.now(UTC) + timedelta(days=9), mac=mac)
            assert await auth_of(store, tok) is None
    assert "pats row" in caplog.text and "f0f0f0f0-0000-4000-8000-000000000001" in caplog.text
    assert refusals.tables == ["pats"] * 4
    assert "forged" not in [p.name for p in await store.list_pats(user_id=w["root"].id)]


async def test_an_edited_scope_list_is_refused(env) -> None:
    store, refusals = env
    w = await world(store)
    await host_sql(store, "UPDATE pats SET scopes = :s WHERE id = :id", s='["models:read","manage"]',
                   id=w["pats"]["alice"].id)
    assert await auth_of(store, w["tokens"]["alice"]) is None
    assert await store.get_pat(w["pats"]["alice"].id) is None
    assert w["pats"]["alice"].id not in [p.id for p in await store.list_pats()]
    assert set(refusals.tables) == {"pats"}


async def test_a_pat_copied_to_another_user_is_refused(env) -> None:
    """alice's key row moved to root (user_id edited): the key would act as root."""
    store, _ = env
    w = await world(store)
    await host_sql(store, "UPDATE pats SET user_id = :root WHERE id = :id", root=w["root"].id,
                   id=w["pats"]["alice"].id)
    assert await auth_of(store, w["tokens"]["alice"]) is None
    assert await store.list_pats(user_id=w["root"].id) == [w["pats"]["root"]]


async def test_a_flipped_superadmin_flag_is_refused(env) -> None:
    store, refusals = env
    w = await world(store)
    await host_sql(store, "UPDATE users SET is_superadmin = :t WHERE id = :id", t=True, id=w["alice"].id)
    assert await auth_of(store, w["tokens"]["alice"]) is None
    assert await store.get_user(w["alice"].id) is None
    assert [u.name for u in await store.list_users()] == ["bob", "root"]
    assert await store.count_superadmins() == 1
    assert [m.user.name for m in await store.list_members(w["domain"].id)] == ["bob"]
    assert await store.update_user(w["alice"].id, name="alice2") is None        # not laundered by an update
    assert "users" in refusals.tables


async def test_a_changed_membership_role_is_refused(env) -> None:
    store, refusals = env
    w = await world(store)
    await host_sql(store, "UPDATE memberships SET role = 'admin' WHERE user_id = :u", u=w["alice"].id)
    record = await auth_of(store, w["tokens"]["alice"])
    assert record is not None and record.roles == {}                 # the key works, the forged role does not
    assert await store.roles_of(w["alice"].id) == {}
    assert [m.user.name for m in await store.list_members(w["domain"].id)] == ["bob"]
    assert set(refusals.tables) == {"memberships"}
    # A membership row inserted for a domain the user is not in counts for nothing either.
    other = await store.create_domain("other")
    await host_sql(store, "INSERT INTO memberships (domain_id, user_id, role, created_at, mac) "
                          "SELECT :d, user_id, 'admin', created_at, mac FROM memberships WHERE user_id = :u",
                   d=other.id, u=w["bob"].id)
    assert await store.roles_of(w["bob"].id) == {w["domain"].id: "admin"}


async def test_swapped_macs_are_refused(env) -> None:
    store, _ = env
    w = await world(store)
    a, b = w["pats"]["alice"].id, w["pats"]["bob"].id
    await host_sql(store, "UPDATE pats SET mac = (SELECT mac FROM pats WHERE id = :b) WHERE id = :a", a=a, b=b)
    assert await auth_of(store, w["tokens"]["alice"]) is None
    assert await auth_of(store, w["tokens"]["bob"]) is not None
    # Whole rows swapped between users: alice's row gets bob's fields and MAC but keeps its own id.
    await host_sql(store, "UPDATE users SET mac = (SELECT mac FROM users WHERE id = :b) WHERE id = :a",
                   a=w["alice"].id, b=w["bob"].id)
    assert await store.get_user(w["alice"].id) is None


async def test_a_deleted_revocation_is_refused(env) -> None:
    store, _ = env
    w = await world(store)
    await store.revoke_pat(w["pats"]["bob"].id)
    record = await auth_of(store, w["tokens"]["bob"])
    assert record is not None and record.pat.revoked_at is not None
    await host_sql(store, "UPDATE pats SET revoked_at = NULL WHERE id = :id", id=w["pats"]["bob"].id)
    assert await auth_of(store, w["tokens"]["bob"]) is None
    await host_sql(store, "UPDATE pats SET expires_at = :later WHERE id = :id",
                   later=datetime.now(UTC) + timedelta(days=999), id=w["pats"]["alice"].id)
    assert await auth_of(store, w["tokens"]["alice"]) is None            # nor an extended expiry


async def test_an_older_copy_of_a_revoked_key_is_refused_while_the_process_runs(env) -> None:
    """The host saves bob's key row, lets the enclave revoke it, then puts the old row back: its MAC is valid
    (the enclave wrote it), but this process saw the revocation. (A restarted process would not: see
    docs/sealed-state.md.)"""
    store, refusals = env
    w = await world(store)
    pat_id = w["pats"]["bob"].id
    async with store.engine.connect() as conn:
        old = (await conn.execute(sa.text("SELECT revoked_at, mac FROM pats WHERE id = :id"), {"id": pat_id})).one()
    await store.revoke_pat(pat_id)
    await host_sql(store, "UPDATE pats SET revoked_at = :r, mac = :m WHERE id = :id", r=old.revoked_at, m=old.mac,
                   id=pat_id)
    assert await auth_of(store, w["tokens"]["bob"]) is None and refusals.tables == ["pats"]


async def test_an_edited_domain_allowlist_is_refused(env) -> None:
    store, refusals = env
    w = await world(store)
    await host_sql(store, "UPDATE domains SET model_allowlist = NULL WHERE id = :id", id=w["domain"].id)
    assert await store.get_domain(w["domain"].id) is None and await store.list_domains() == []
    assert refusals.tables == ["domains", "domains"]


async def test_a_row_cannot_move_between_tables(env) -> None:
    """A domain row's id, name and MAC put into users: the table name is in the MAC."""
    store, _ = env
    w = await world(store)
    d = w["domain"]
    await host_sql(store, "INSERT INTO users (id, name, is_superadmin, created_at, mac) "
                          "SELECT id, name, :f, created_at, mac FROM domains WHERE id = :id", f=False, id=d.id)
    assert await store.get_user(d.id) is None


async def test_rows_written_before_row_macs_are_refused(env) -> None:
    store, _ = env
    w = await world(store)
    await host_sql(store, "UPDATE pats SET mac = NULL")
    assert await auth_of(store, w["tokens"]["root"]) is None and await store.list_pats() == []
    assert await store.count_users() == 3                                      # users keep theirs


async def test_legitimate_writes_keep_rows_valid(env) -> None:
    """Every write path re-MACs: updates, revocation, role changes, and the issuer of a key being deleted
    (the database's SET NULL would break the MAC; the store does it itself)."""
    store, refusals = env
    w = await world(store)
    await store.update_user(w["alice"].id, name="alice2", is_superadmin=True)
    await store.update_domain(w["domain"].id, name="d2", clear_allowlist=True)
    await store.set_membership(w["domain"].id, w["alice"].id, "admin")
    tok = generate_token()
    issued = await store.create_pat(user_id=w["alice"].id, name="by-bob", token_hash=token_hash(PAT_KEY, tok),
                                    last4=tok[-4:], scopes=["models:read"], expires_at=datetime.now(UTC)
                                    + timedelta(days=1), issued_by=w["bob"].id)
    await store.record_last_used({issued.id: datetime.now(UTC)})               # bookkeeping, not in the MAC
    assert await store.delete_user(w["bob"].id)
    record = await auth_of(store, tok)
    assert record is not None and record.pat.issued_by is None and record.user.is_superadmin
    assert record.roles == {w["domain"].id: "admin"}
    assert (await store.get_domain(w["domain"].id)).model_allowlist is None
    assert refusals.tables == []


@pytest.mark.parametrize("table, column, value", [
    ("pats", "scopes", "[1]"), ("pats", "scopes", "5"), ("pats", "model_allowlist", "[null]"),
    ("pats", "model_allowlist", "{\"a\": 1}"), ("domains", "model_allowlist", "[[\"x\"]]"),
    ("domains", "model_allowlist", "7")])
async def test_a_json_column_of_another_type_is_refused_not_a_crash(env, table: str, column: str,
                                                                    value: str) -> None:
    """The host writes JSON of a shape the store never writes (numbers, nested lists, a bare scalar): the row
    is refused like any other forgery (401, left out of lists), never an exception that fails every request
    reading that table."""
    store, refusals = env
    w = await world(store)
    target = w["pats"]["alice"].id if table == "pats" else w["domain"].id
    await host_sql(store, f"UPDATE {table} SET {column} = :v WHERE id = :id", v=value, id=target)
    if table == "pats":
        assert await auth_of(store, w["tokens"]["alice"]) is None
        assert await store.get_pat(target) is None
        assert target not in [p.id for p in await store.list_pats()]
        assert await auth_of(store, w["tokens"]["bob"]) is not None
    else:
        assert await store.get_domain(target) is None and await store.list_domains() == []
    assert refusals.tables and set(refusals.tables) == {table}


async def test_a_second_row_with_a_real_token_hash_lends_no_roles(pg_schema_url) -> None:
    """PostgreSQL (SQLite cannot drop a unique constraint): the host drops the one on token_hash and adds a row
    with alice's token hash whose owner is bob (admin of the domain), with bob's key's MAC. The join then brings
    bob's membership rows into alice's authentication: they must not give her bob's role (each is checked
    against her user id)."""
    url, schema = pg_schema_url
    store = await Store.open(url, schema=schema, row_key=ROW_KEY)
    try:
        await _second_row_attack(store)
    finally:
        await store.close()


async def _second_row_attack(store: Store) -> None:
    w = await world(store)
    await host_sql(store, "ALTER TABLE pats DROP CONSTRAINT uq_pats_token_hash")
    await host_sql(store, "INSERT INTO pats (id, user_id, name, token_hash, last4, scopes, created_at, expires_at, "
                          "issued_by, mac) SELECT :nid, user_id, name, :h, last4, scopes, created_at, expires_at, "
                          "issued_by, mac FROM pats WHERE id = :bob",
                   nid="f0f0f0f0-0000-4000-8000-000000000003", h=w["pats"]["alice"].token_hash,
                   bob=w["pats"]["bob"].id)
    for _ in range(5):
        record = await auth_of(store, w["tokens"]["alice"])
        assert record is None or (record.user.id == w["alice"].id and record.roles == {w["domain"].id: "member"})


async def swallow(store: Store, op: str, table: str) -> None:
    """The host makes the database drop every ``op`` (UPDATE/DELETE) on ``table`` silently: a PostgreSQL rule,
    a SQLite trigger. The statement 'succeeds' and changes nothing."""
    name = f"swallow_{op.lower()}_{table}"
    if store.engine.dialect.name == "postgresql":
        await host_sql(store, f"CREATE RULE {name} AS ON {op} TO {table} DO INSTEAD NOTHING")
    else:
        await host_sql(store, f"CREATE TRIGGER {name} BEFORE {op} ON {table} BEGIN SELECT RAISE(IGNORE); END")


async def test_a_swallowed_revocation_is_an_error_and_the_key_stays_refused(env) -> None:
    """The admin API answers 204 to a revocation unless the store raises: a database that drops the update
    must not leave the key working while the admin is told it is revoked."""
    store, _ = env
    w = await world(store)
    await swallow(store, "UPDATE", "pats")
    with pytest.raises(StoreError, match="did not keep its revocation"):
        await store.revoke_pat(w["pats"]["bob"].id)
    assert await auth_of(store, w["tokens"]["bob"]) is None          # refused by this process all the same
    assert await auth_of(store, w["tokens"]["alice"]) is not None


async def test_swallowed_demotions_and_removals_are_errors(env) -> None:
    """Taking a right away (superadmin flag, a role, a membership, a user, a domain) against a database that
    drops the statement: a StoreError (500), never a reply that says it was done."""
    store, _ = env
    w = await world(store)
    await store.update_user(w["alice"].id, is_superadmin=True)
    await swallow(store, "UPDATE", "users")
    with pytest.raises(StoreError, match="did not keep the update"):
        await store.update_user(w["alice"].id, is_superadmin=False)
    await swallow(store, "UPDATE", "memberships")
    with pytest.raises((StoreError, Conflict)):                      # the update dropped, the insert collides
        await store.set_membership(w["domain"].id, w["bob"].id, "member")
    assert (await store.get_member(w["domain"].id, w["bob"].id)).role == "admin"
    await swallow(store, "UPDATE", "domains")
    with pytest.raises(StoreError, match="did not keep the update"):
        await store.update_domain(w["domain"].id, model_allowlist=["only-this"])
    await swallow(store, "DELETE", "memberships")
    with pytest.raises(StoreError, match="did not carry out the delete"):
        await store.remove_membership(w["domain"].id, w["bob"].id)
    await swallow(store, "DELETE", "users")
    with pytest.raises(StoreError, match="did not carry out the delete"):
        await store.delete_user(w["alice"].id)
    await swallow(store, "DELETE", "domains")
    with pytest.raises(StoreError, match="did not carry out the delete"):
        await store.delete_domain(w["domain"].id)
    assert await store.remove_membership(w["domain"].id, w["root"].id) is False   # truly absent: no error


def test_the_encoding_is_unambiguous_and_keyed() -> None:
    mac = RowMac(b"k" * 32)
    assert encode("users", ["a", "b,c", True]) != encode("users", ["a,b", "c", True])
    assert encode("users", ["x", None]) != encode("users", ["x", "null"])
    assert encode("pats", [["a", "b"]]) != encode("pats", [["a,b"]])
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert encode("pats", [when]) == encode("pats", [when.replace(tzinfo=None)])   # SQLite returns naive UTC
    assert mac.mac("users", ["a"]) != mac.mac("domains", ["a"])
    assert mac.mac("users", ["a"]) != RowMac(b"j" * 32).mac("users", ["a"])
    assert mac.valid("users", ["a"], mac.mac("users", ["a"])) and not mac.valid("users", ["a"], None)
    assert "k" * 32 not in repr(mac)


async def test_authentication_answers_401_for_a_forged_row(tmp_path: Path) -> None:
    refusals = Refusals()
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", row_key=ROW_KEY,
                             on_integrity_failure=refusals)
    try:
        w = await world(store)
        auth = Authenticator(store, PAT_KEY, tracker=LastUsedTracker(store, interval=60), cache=False)
        assert (await auth.authenticate(f"Bearer {w['tokens']['alice']}")).user.name == "alice"
        await host_sql(store, "UPDATE users SET is_superadmin = :t WHERE id = :id", t=True, id=w["alice"].id)
        with pytest.raises(ApiError) as refused:
            await auth.authenticate(f"Bearer {w['tokens']['alice']}")
        assert refused.value.status == 401
    finally:
        await store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_through_the_running_service(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    """Over HTTPS: a member flipped to superadmin in the database is refused (401) instead of listing users,
    an inserted superadmin key is refused, and /metrics counts the refusals by table."""
    overrides: dict[str, Any] = {"auth_cache": False}   # every request reads the database (the in-process cache
    # holds only rows verified before, so it would hide the forgery rather than serve it: 403 instead of 401)
    if backend == "postgres":
        url, schema = request.getfixturevalue("pg_schema_url")
        overrides.update(database_url=url, database_schema=schema)
    settings = make_settings(tmp_path, **overrides)
    clock = FakeClock()

    async def seed():
        store = await Store.open(settings.effective_database_url(), schema=settings.database_schema, row_key=ROW_KEY)
        try:
            return await seed_world(store, PAT_KEY, clock()), store
        finally:
            await store.close()

    w, _ = asyncio.run(seed())
    forged = generate_token()

    async def attack() -> None:
        store = await Store.open(settings.effective_database_url(), schema=settings.database_schema, row_key=b"x" * 32)
        try:
            await host_sql(store, "UPDATE users SET is_superadmin = :t WHERE id = :id", t=True,
                           id=w.users["member_a"])
            await host_sql(store, "INSERT INTO pats (id, user_id, name, token_hash, last4, scopes, created_at, "
                                  "expires_at, issued_by, mac) SELECT 'f0f0f0f0-0000-4000-8000-000000000002', "
                                  "user_id, 'forged', :h, 'abcd', scopes, created_at, expires_at, issued_by, mac "
                                  "FROM pats WHERE id = :copy", h=token_hash(PAT_KEY, forged),
                           copy=w.pat_ids["superadmin"])
        finally:
            await store.close()

    server = EnclaveServer(settings, clock=clock).start()
    try:
        with server.client(w.tokens["member_a"]) as member:
            assert member.get("/users/me").status_code == 200
        asyncio.run(attack())
        with server.client(w.tokens["member_a"]) as member:
            assert member.get("/admin/users").status_code == 401
            assert member.get("/users/me").status_code == 401
        with server.client(forged) as c:
            assert c.get("/admin/users").status_code == 401
        with server.client(w.tokens["superadmin"]) as root:
            names = [u["name"] for u in root.get("/admin/users").json()]
            assert "user-member_a" not in names and "user-superadmin" in names
            metrics = root.get("/metrics").text
        assert 'cube_store_integrity_failures_total{table="users"}' in metrics
        assert 'cube_store_integrity_failures_total{table="pats"}' in metrics
    finally:
        server.stop()
