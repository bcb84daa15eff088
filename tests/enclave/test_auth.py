"""Authenticator: any Authorization header gives a Principal or a typed 401; cache invalidation; last-used flush."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave.access import Principal
from enclave.auth import Authenticator, LastUsedTracker
from enclave.errors import ApiError
from enclave.store import Store
from enclave.tokens import generate_token, token_hash
from tests.enclave.conftest import ROW_KEY

SECRET = b"k" * 32


class Env:
    def __init__(self, path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.store: Store = self.run(Store.open(f"sqlite+aiosqlite:///{path / 'a.db'}", row_key=ROW_KEY))
        self.tracker = LastUsedTracker(self.store, interval=60)
        self.failures: list[str] = []
        self.auth = Authenticator(self.store, SECRET, tracker=self.tracker, cache=True,
                                  on_failure=self.failures.append)
        self.user = self.run(self.store.create_user("u"))
        self.token = generate_token()
        self.pat = self.run(self.store.create_pat(user_id=self.user.id, name="t",
                                                  token_hash=token_hash(SECRET, self.token), last4="abcd",
                                                  scopes=["models:read"],
                                                  expires_at=datetime.now(UTC) + timedelta(days=1)))

    def run(self, coro):
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("auth"))
    yield e
    e.run(e.store.close())
    e.loop.close()


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=120),
                 st.text(max_size=60).map(lambda s: "Bearer " + s),
                 st.just("Bearer cube_pat_").map(lambda p: p + "0" * 42)))
def test_any_header_is_a_typed_401(env: Env, header: str | None) -> None:
    with pytest.raises(ApiError) as err:
        env.run(env.auth.authenticate(header))
    assert err.value.status == 401 and err.value.code == "invalid_api_key"
    assert err.value.headers["x-should-retry"] == "false"


def test_valid_token_and_cache_invalidated_by_revocation(env: Env) -> None:
    principal = env.run(env.auth.authenticate(f"Bearer {env.token}"))
    assert isinstance(principal, Principal) and principal.user.id == env.user.id
    assert env.run(env.auth.authenticate(f"bearer   {env.token}")).pat.id == env.pat.id   # scheme is case-insensitive
    env.run(env.store.revoke_pat(env.pat.id))
    with pytest.raises(ApiError) as err:
        env.run(env.auth.authenticate(f"Bearer {env.token}"))
    assert "revoked" in err.value.message and env.failures[-1] == "revoked"


def test_unknown_token_never_touches_the_db_when_checksum_is_bad(env: Env, monkeypatch) -> None:
    async def boom(_h: str):
        raise AssertionError("database consulted for a checksum-invalid token")
    monkeypatch.setattr(env.store, "find_auth", boom)
    bad = env.token[:-1] + ("0" if env.token[-1] != "0" else "1")
    with pytest.raises(ApiError):
        env.run(env.auth.authenticate(f"Bearer {bad}"))
    assert env.failures[-1] == "bad_checksum"


def test_last_used_written_on_stop(env: Env) -> None:
    u = env.run(env.store.create_user("v"))
    tok = generate_token()
    pat = env.run(env.store.create_pat(user_id=u.id, name="t", token_hash=token_hash(SECRET, tok), last4="abcd",
                                       scopes=[], expires_at=datetime.now(UTC) + timedelta(days=1)))
    env.run(env.auth.authenticate(f"Bearer {tok}"))
    assert env.run(env.store.get_pat(pat.id)).last_used_at is None

    async def start_stop() -> None:
        env.tracker.start()
        await env.tracker.stop()

    env.run(start_stop())
    assert env.run(env.store.get_pat(pat.id)).last_used_at is not None
    assert env.tracker.pending == 0


def test_revocation_racing_a_lookup_is_not_hidden_by_the_cache(tmp_path: Path) -> None:
    """A lookup that read the PAT just before a concurrent revocation must not cache the stale row."""
    env = Env(tmp_path)
    try:
        real_find = env.store.find_auth

        async def lookup_overtaken_by_revocation(digest: str):
            record = await real_find(digest)          # the row as it was before the revocation committed
            await env.store.revoke_pat(env.pat.id)    # the revocation lands while this lookup is in flight
            return record

        env.store.find_auth = lookup_overtaken_by_revocation  # type: ignore[method-assign]
        env.run(env.auth.authenticate(f"Bearer {env.token}"))  # in flight before the revocation: admitted
        env.store.find_auth = real_find  # type: ignore[method-assign]
        with pytest.raises(ApiError) as err:
            env.run(env.auth.authenticate(f"Bearer {env.token}"))
        assert env.failures[-1] == "revoked", err.value.message
    finally:
        env.run(env.store.close())
        env.loop.close()


def test_domain_change_racing_a_lookup_is_not_hidden_by_the_cache(tmp_path: Path) -> None:
    env = Env(tmp_path)
    try:
        domain = env.run(env.store.create_domain("d"))
        real_get = env.store.get_domain

        async def lookup_overtaken_by_update(domain_id: str):
            found = await real_get(domain_id)
            env.store.get_domain = real_get  # type: ignore[method-assign]  (update_domain reads it back)
            await env.store.update_domain(domain_id, model_allowlist=["only-this"])
            return found

        env.store.get_domain = lookup_overtaken_by_update  # type: ignore[method-assign]
        assert env.run(env.auth.domain(domain.id)).model_allowlist is None
        assert tuple(env.run(env.auth.domain(domain.id)).model_allowlist or ()) == ("only-this",)
    finally:
        env.run(env.store.close())
        env.loop.close()
