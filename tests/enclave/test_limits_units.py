"""The parts of enclave.quotas on their own: windows and durations, limit resolution, the ceiling rule, and the
shared counters on SQLite and PostgreSQL (one replica refuses at exactly the limit; two replicas on one
database never admit past a request limit; a dead replica's leases come back; token debts are written)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
import sqlalchemy as sa

from enclave.access import Principal, limits_within_ceiling
from enclave.config import QuotaSettings
from enclave.errors import ApiError
from enclave.inference.record import InferenceRecord
from enclave.inference.usage import Usage
from enclave.quotas import open_quotas
from enclave.quotas.counters import SharedCounters
from enclave.quotas.kinds import UNLIMITED, LimitSet, go_duration, pat_subject, retry_after, window
from enclave.quotas.enforcer import resolve
from enclave.quotas.rows import StoredLimits
from enclave.schema import quota_replicas
from enclave.store import Pat, Store, User

from tests.enclave.conftest import ROW_KEY, FakeClock
from tests.enclave.test_store import store  # noqa: F401  (the store on SQLite and on PostgreSQL)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_fixed_utc_windows() -> None:
    assert window("rpm", at("2026-12-31T23:59:59.5")) == (int(at("2026-12-31T23:59:00").timestamp()),
                                                            int(at("2027-01-01T00:00:00").timestamp()))
    assert window("tokens_per_day", at("2026-03-01T12:00:00")) == (int(at("2026-03-01").timestamp()),
                                                                   int(at("2026-03-02").timestamp()))
    assert window("tokens_per_month", at("2026-12-15T08:00:00")) == (int(at("2026-12-01").timestamp()),
                                                                     int(at("2027-01-01").timestamp()))
    assert window("tokens_per_month", at("2028-02-29T23:00:00"))[1] == int(at("2028-03-01").timestamp())
    other_zone = datetime(2026, 12, 1, 0, 30, tzinfo=UTC).astimezone(__import__("zoneinfo").ZoneInfo("Asia/Tokyo"))
    assert window("tokens_per_day", other_zone)[0] == int(at("2026-12-01").timestamp())   # UTC, whatever the zone
    assert window("concurrent", at("2026-12-01T00:00:00")) == (0, 0)


def test_openai_durations_and_retry_after() -> None:
    assert [go_duration(s) for s in (0.02, 0.9999, 1, 59.2, 60, 360, 3723)] == \
        ["20ms", "1000ms", "1s", "1m0s", "1m0s", "6m0s", "1h2m3s"]
    assert [retry_after(s) for s in (0, 0.2, 1, 59.1)] == ["1", "1", "1", "60"]


def test_own_values_override_defaults_and_minus_one_is_unlimited() -> None:
    default = LimitSet(rpm=10, tpm=1000)
    own = StoredLimits(pat_subject("p"), {"rpm": UNLIMITED, "concurrent": 2}, at("2026-12-01"))
    assert resolve(None, default) == default
    assert resolve(own, default) == LimitSet(rpm=None, tpm=1000, concurrent=2)


def _principal(superadmin: bool, bound: str | None = None) -> Principal:
    now = at("2026-12-01")
    user = User("u", "u", superadmin, now)
    pat = Pat("p", "u", bound, "k", "h", "abcd", ("manage",), None, now, now + timedelta(days=1), None, None)
    return Principal(user, pat, {"d": "admin"})


def test_the_ceiling_binds_domain_admins_not_the_platform() -> None:
    ceiling = {"rpm": 10, "tpm": None, "concurrent": 2, "tokens_per_day": None, "tokens_per_month": None}
    admin = _principal(False)
    assert limits_within_ceiling(admin, {"rpm": 10, "tpm": 10**9}, ceiling)
    assert limits_within_ceiling(admin, {"rpm": None}, ceiling)            # the default: not the admin's choice
    assert limits_within_ceiling(admin, {"rpm": 11}, ceiling).code == "above_domain_ceiling"
    assert limits_within_ceiling(admin, {"concurrent": UNLIMITED}, ceiling).param == "concurrent"
    assert limits_within_ceiling(_principal(True), {"rpm": UNLIMITED}, ceiling)
    assert not limits_within_ceiling(_principal(True, bound="d"), {"rpm": 11}, ceiling)   # a bound key is no platform


# ---- the shared counters on a real database ---------------------------------------------------------------
@pytest_asyncio.fixture
async def pg_store(pg_schema_url: tuple[str, str]) -> AsyncIterator[Store]:
    """Replicas running at once share a PostgreSQL (SQLite serves one process)."""
    url, schema = pg_schema_url
    s = await Store.open(url, schema=schema, row_key=ROW_KEY)
    try:
        yield s
    finally:
        await s.close()


def replica(store: Store, name: str) -> SharedCounters:
    return SharedCounters(store.engine, sync_seconds=0.2, replica=name)


def minute() -> tuple[int, int]:
    """The current minute (a leaving replica collects the rows of windows long over: never use a stale one)."""
    return window("rpm", datetime.now(UTC))


def day() -> tuple[int, int]:
    return window("tokens_per_day", datetime.now(UTC))


async def test_one_replica_refuses_at_exactly_the_limit(store: Store) -> None:
    win = minute()                                 # one window for the whole test
    one = replica(store, "r1")
    await one.heartbeat()
    rpm = one.counter("pat:x", "rpm", *win, 5)
    assert [await one.take(rpm, 1) for _ in range(6)] == [True] * 5 + [False]
    slots = one.counter("pat:x", "concurrent", 0, 0, 2)
    assert [await one.take(slots, 1) for _ in range(3)] == [True, True, False]
    one.give_back(slots, 1)
    assert await one.take(slots, 1)
    tokens = one.counter("pat:x", "tpm", *win, 100)
    assert await one.take(tokens, 0)
    one.consume(tokens, 99)
    assert await one.take(tokens, 0)                   # one token left: admitted
    one.consume(tokens, 50)                             # it finishes: 149 counted
    await asyncio.gather(*one._debts)
    assert not await one.take(tokens, 0)
    assert tokens.used == 149


async def test_two_replicas_never_admit_past_a_request_limit(pg_store: Store) -> None:
    win = minute()                                 # one window for the whole test
    store = pg_store
    r1, r2 = replica(store, "r1"), replica(store, "r2")
    await r1.heartbeat()
    await r2.heartbeat()
    c1, c2 = r1.counter("domain:d", "rpm", *win, 25), r2.counter("domain:d", "rpm", *win, 25)

    async def hammer(r: SharedCounters, c, n: int) -> int:
        admitted = 0
        for i in range(n):
            await asyncio.sleep(0)             # the replicas' requests interleave
            admitted += await r.take(c, 1)
            if i % 7 == 0:
                await r.sync_all(30.0)         # the periodic renewals interleave with the admissions
        return admitted

    counts = await asyncio.gather(hammer(r1, c1, 40), hammer(r2, c2, 40), hammer(r1, c1, 40), hammer(r2, c2, 40))
    assert sum(counts) == 25
    async with store.engine.connect() as conn:
        shared = (await conn.execute(sa.text("SELECT held FROM quota_counters WHERE replica = '' AND kind = 'rpm'"))
                  ).scalar_one()
    assert shared <= 25


async def test_a_dead_replica_s_leases_come_back_and_a_leaving_one_gives_them_back(pg_store: Store) -> None:
    win = minute()                                 # one window for the whole test
    store = pg_store
    r1, r2 = replica(store, "r1"), replica(store, "r2")
    await r1.heartbeat()
    c1 = r1.counter("pat:y", "concurrent", 0, 0, 4)
    assert await r1.take(c1, 1)                    # alone: r1's lease is every slot
    await r2.heartbeat()
    c2 = r2.counter("pat:y", "concurrent", 0, 0, 4)
    assert not await r2.take(c2, 1)
    async with store.engine.begin() as conn:       # r1 stops beating (killed)
        await conn.execute(quota_replicas.update().where(quota_replicas.c.replica == "r1")
                           .values(beat_at=time.time() - 60))
    await r2.heartbeat()                           # presumed dead: its rows are reclaimed
    assert [await r2.take(c2, 1) for _ in range(5)] == [True] * 4 + [False]

    r3 = replica(store, "r3")
    await r3.heartbeat()                           # live now: r2, r3
    c3 = r3.counter("pat:z", "rpm", *win, 10)
    assert await r3.take(c3, 1)                    # r3's lease: half of the minute
    r4 = replica(store, "r4")
    await r4.heartbeat()
    c4 = r4.counter("pat:z", "rpm", *win, 10)
    assert [await r4.take(c4, 1) for _ in range(6)] == [True] * 5 + [False]    # the other half
    await r3.leave()                               # r3 gives back the 4 it did not use
    assert [await r4.take(c4, 1) for _ in range(5)] == [True] * 4 + [False]


async def test_a_token_debt_reaches_the_other_replica(pg_store: Store) -> None:
    win_day = day()
    store = pg_store
    r1, r2 = replica(store, "r1"), replica(store, "r2")
    await r1.heartbeat()
    await r2.heartbeat()
    c1, c2 = (r1.counter("user:d:u", "tokens_per_day", *win_day, 100),
              r2.counter("user:d:u", "tokens_per_day", *win_day, 100))
    assert await r1.take(c1, 0) and await r2.take(c2, 0)     # both within budget: both finish
    r1.consume(c1, 120)                            # a long answer: beyond r1's lease, written at once
    await asyncio.gather(*r1._debts)
    assert not await r1.take(c1, 0)
    r2.consume(c2, 30)                             # beyond what r2 still held: its debt too
    await asyncio.gather(*r2._debts)
    assert not await r2.take(c2, 0)
    # the overshoot is the tokens of the requests admitted within budget (docs/limits.md), never more
    assert c2.used == 150


async def test_the_next_minute_s_lease_is_taken_before_it_starts(store: Store) -> None:
    win = minute()                                 # one window for the whole test
    one = replica(store, "r1")
    await one.heartbeat()
    start, end = win
    c = one.counter("pat:n", "rpm", start, end, 5)
    assert await one.take(c, 1)
    await one.sync_all(end - 0.3)                  # the last sync of the minute (within 2 sync intervals)
    nxt = one.counters[("pat:n", "rpm", end)]
    assert nxt.left == 5 and one.try_take(nxt, 1)  # no round trip for the next minute's first request
    await one.sync_all(end + 0.5)
    assert ("pat:n", "rpm", start) not in one.counters     # the ended minute is dropped


async def test_a_restart_on_sqlite_gets_back_what_the_previous_run_held(tmp_path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'q.db'}"
    store = await Store.open(url, row_key=ROW_KEY)
    try:
        before = replica(store, "before")
        await before.heartbeat()
        c = before.counter("pat:q", "concurrent", 0, 0, 3)
        assert await before.take(c, 1)                 # holds every slot, then the process is killed
        after = replica(store, "after")                # a restart quicker than the dead interval
        await after.heartbeat()                        # the first beat of the new run reclaims
        c2 = after.counter("pat:q", "concurrent", 0, 0, 3)
        assert [await after.take(c2, 1) for _ in range(4)] == [True] * 3 + [False]
        assert await after.heartbeat() == 1 and after.single_process
    finally:
        await store.close()


# ---- the enforcer on a fake clock ---------------------------------------------------------------------------
def _record(request_id: str) -> InferenceRecord:
    return InferenceRecord(domain_id="d", user_id="u", pat_id="p", model="m", backend="b", route="chat/completions",
                           stream=False, request_id=request_id)


async def test_windows_reset_on_the_clock_and_a_ticket_releases_once(store: Store) -> None:
    clock = FakeClock()
    clock.now = at("2026-12-31T23:59:30")
    quotas = open_quotas(QuotaSettings(sync_seconds=0.2), store.engine, ROW_KEY, clock, replica="solo")
    await quotas.start()
    try:
        await quotas.rows.put(pat_subject("p"), {"tokens_per_month": 10, "concurrent": 1, "rpm": 2}, clock())
        await quotas.refresh()
        ticket = await quotas.admit(_record("a"))
        with pytest.raises(ApiError) as busy:
            await quotas.admit(_record("b"))
        assert busy.value.status == 429 and busy.value.type == "requests"
        record = _record("a")
        record.usage = Usage(4, 6, 10)
        quotas.sink(record)                        # the request ended: slot back, 10 tokens counted
        ticket.release(None)                       # a second release changes nothing
        ticket.settle()
        slots = quotas.counters.counters[("pat:p", "concurrent", 0)]
        assert slots.in_flight == 0 and quotas.open_tickets == 0
        with pytest.raises(ApiError) as spent:
            await quotas.admit(_record("c"))
        assert spent.value.code == "insufficient_quota" and spent.value.headers["x-should-retry"] == "false"
        assert "2027-01-01T00:00:00Z" in spent.value.message
        clock.advance(seconds=31)                  # a new minute, day and month
        t2 = await quotas.admit(_record("d"))
        assert t2.headers["x-ratelimit-remaining-requests"] == "1"
        t2.release(None)
        t3 = await quotas.admit(_record("e"))
        t3.release(None)
        with pytest.raises(ApiError) as limited:
            await quotas.admit(_record("f"))
        assert limited.value.code == "rate_limit_exceeded" and limited.value.headers["Retry-After"] == "59"
        assert limited.value.headers["x-ratelimit-reset-requests"] == "59s"
    finally:
        await quotas.stop()


async def test_unreachable_counters_refuse_rather_than_admit() -> None:
    """Fail closed: a decision that needs the shared counters and cannot reach them is a 503, never a pass."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine("postgresql+asyncpg://nobody@127.0.0.1:9/none")   # nothing listens there
    quotas = open_quotas(QuotaSettings(), engine, ROW_KEY, FakeClock())
    subject = pat_subject("p")
    quotas.own = {subject: StoredLimits(subject, {"rpm": 10}, at("2026-12-01"))}
    quotas._idle = False
    try:
        with pytest.raises(ApiError) as refused:
            await quotas.admit(_record("a"))
        assert refused.value.status == 503 and refused.value.code == "limits_unavailable"
        assert refused.value.headers["Retry-After"] == "1"
        assert quotas.open_tickets == 0
    finally:
        await engine.dispose()
