"""Counters shared by every replica on one database, kept off the hot path by leases.

Each counter (a subject, a kind, a window) has a shared row holding the units **granted** so far: consumed
units plus the unused leases replicas hold. A replica admits from its own lease in memory, with no round trip;
when the lease cannot cover a request it syncs **at once**, under a row lock (``SELECT ... FOR UPDATE``):
it gives back what it did not use, adds what it consumed beyond it, and takes a new lease of
``remaining / live replicas`` (at least what the request needs, never more than remains). So a refusal is
always made on fresh shared state, and the shared total never exceeds the limit. Every ``sync_seconds`` each
replica writes its heartbeat; with other replicas live it renews the leases of its active counters and gives
idle ones back (which is what lets a replica that starts later get its share), alone it only writes what it
used (admissions go on meanwhile). The next minute's leases are taken just before it starts.

Concurrency is a counter without window whose units are slots: a replica holds ``in flight + lease`` slots;
a request ending frees its slot into the lease. A replica whose heartbeat is older than ``dead_after`` is
presumed dead: the next replica to sync removes its rows and gives back what they held. Heartbeats are on the
database's clock; windows on each replica's own (a skew moves a window's boundary, never its bound).

**Overshoot bound** (docs/limits.md): requests per minute and concurrency never exceed the limit across
replicas: every admission is covered by units granted under the row lock, and grants never pass the limit.
Token kinds are counted when a request ends (a request that starts within budget finishes), so the tokens
counted can pass the limit by the tokens of the requests that were in flight when the last unit was granted,
on all replicas together; a replica that goes into debt writes it at once (in the background), and until that
write lands (milliseconds) another replica may be granted the units that debt used up. Two cases weaken this:
a replica presumed dead while it still runs (a partition longer than ``dead_after``) may go on admitting
from its lease (at most one lease more); a replica killed loses the counts it had not synced (at most one
sync interval's), which only ever under-counts.

Counters are not MAC'd: the host can reset them, as it can deny or allow service by other means.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from enclave.schema import quota_counters, quota_replicas

log = logging.getLogger("enclave.quotas")
SHARED = ""   # the replica column of a counter's shared row
MINUTE_KINDS = ("rpm", "tpm")

#: How long a window's rows are kept after it ends, per kind (seconds), before any replica deletes them.
_KEEP_AFTER = {"rpm": 120, "tpm": 120, "tokens_per_day": 2 * 86400, "tokens_per_month": 40 * 86400}


class CountersUnavailable(Exception):
    """The shared counters could not be reached when a decision needed them (the request is refused)."""


@dataclass(eq=False)
class Counter:
    subject: str
    kind: str
    window_start: int
    window_end: int
    limit: int
    grant: int = 0         # the lease taken at the last sync (window kinds)
    spent: int = 0         # window kinds: units used since the last sync (the lease left is grant - spent)
    held: int = 0          # concurrency: slots held (in flight + free)
    in_flight: int = 0     # concurrency
    used_elsewhere: int = 0   # as of the last sync: units consumed in all (window), in use elsewhere (slots)
    active: bool = False   # admitted or consumed since the last sync
    syncing: bool = False  # a sync is under way: admissions wait for it
    waiting: int = 0       # admissions waiting for the lock (the counter is not dropped meanwhile)
    relimited: bool = False   # the limit changed since the last sync: the lease was sized for the old one
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def is_slots(self) -> bool:
        return self.kind == "concurrent"

    @property
    def left(self) -> int:
        """Units this replica may still hand out without asking the database."""
        return self.held - self.in_flight if self.is_slots else self.grant - self.spent

    @property
    def used(self) -> int:
        """The best estimate of the units used in this window (or in use) across replicas."""
        return self.used_elsewhere + (self.in_flight if self.is_slots else self.spent)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.subject, self.kind, self.window_start)


class SharedCounters:
    def __init__(self, engine: AsyncEngine, *, sync_seconds: float, replica: str | None = None) -> None:
        self.engine = engine
        self.replica = replica or str(uuid.uuid4())
        self.sync_seconds = sync_seconds
        self.dead_after = 3 * sync_seconds + 2.0
        self.counters: dict[tuple[str, str, int], Counter] = {}
        self._sqlite = engine.dialect.name == "sqlite"
        # SQLite has one writer and no row locks: serialize this process's counter transactions instead.
        self._db_lock = asyncio.Lock()
        self._debts: set[asyncio.Task[None]] = set()
        self._last_gc = time.time()
        self._wrote = False   # counter rows written since the last collection (else there is nothing to collect)
        self.live = 1   # live replicas, as of the last heartbeat or sync
        self._beaten = False

    # ---- the hot path ------------------------------------------------------------------------------------
    def counter(self, subject: str, kind: str, window_start: int, window_end: int, limit: int) -> Counter:
        key = (subject, kind, window_start)
        c = self.counters.get(key)
        if c is None:
            c = self.counters[key] = Counter(subject, kind, window_start, window_end, limit)
        elif c.limit != limit:   # a lease sized for the old limit may exceed the new one: sync before admitting
            c.limit, c.relimited = limit, True
        return c

    def try_take(self, c: Counter, need: int) -> bool:
        """Admit from the lease in memory, when it covers ``need`` (tokens: 0 units taken, 1 must be left)."""
        if c.syncing or c.relimited or c.left < max(need, 1):
            return False
        self._take(c, need)
        return True

    def _take(self, c: Counter, need: int) -> None:
        c.active = True
        if c.is_slots:
            c.in_flight += 1
        else:
            c.spent += need

    async def take(self, c: Counter, need: int) -> bool:
        """Admit on one counter, syncing at once when its lease does not cover it; False: refused on fresh
        shared state."""
        return await self.take_all([(c, need)]) is None

    async def take_all(self, items: list[tuple[Counter, int]]) -> int | None:
        """Admit on every counter or on none: None, or the index of the first one (in ``items``' order) that
        refuses. Counters whose lease does not cover the request are synced together, in one transaction."""
        taken: list[tuple[Counter, int]] = []
        lacking: list[int] = []
        for i, (c, need) in enumerate(items):
            if self.try_take(c, need):
                taken.append((c, need))
            else:
                lacking.append(i)
        if not lacking:
            return None
        try:
            async with self._locked([items[i][0] for i in lacking]):
                stale = [(c, max(need, 1)) for c, need in (items[i] for i in lacking)
                         if c.relimited or c.left < max(need, 1)]
                if stale:
                    await self._sync_many(stale, renew=True)
                for i in lacking:
                    c, need = items[i]
                    if c.left < max(need, 1):
                        self._undo(taken)
                        return i
                    self._take(c, need)
                    taken.append((c, need))
        except BaseException:
            self._undo(taken)
            raise
        return None

    def _undo(self, taken: list[tuple[Counter, int]]) -> None:
        for c, need in taken:
            self.give_back(c, need)

    def give_back(self, c: Counter, need: int) -> None:
        """Undo a take (another counter refused the request, or it ended: a slot is freed)."""
        if c.is_slots:
            c.in_flight -= 1
        else:
            c.spent -= need

    def consume(self, c: Counter, units: int) -> None:
        """Count units after the fact (tokens at a request's end). Beyond the lease, the debt is written at once."""
        if units <= 0:
            return
        c.spent += units
        c.active = True
        if c.left < 0:
            task = asyncio.get_running_loop().create_task(self._settle_debt(c))
            self._debts.add(task)
            task.add_done_callback(self._debts.discard)

    async def _settle_debt(self, c: Counter) -> None:
        try:
            async with self._locked([c]):
                if c.left < 0:
                    await self._sync_many([(c, 0)], renew=True)
        except CountersUnavailable:
            pass   # logged; the periodic sync writes it

    async def sync_now(self, c: Counter) -> None:
        """A fresh view of ``c`` (for reading usage): its lease renewed when it is in use, else given back."""
        async with self._locked([c]):
            await self._sync_many([(c, 0)], renew=c.active)

    # ---- syncing -----------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _locked(self, counters: list[Counter]) -> AsyncIterator[None]:
        """Hold the counters' locks, taken in key order (so two syncs never wait on each other in a circle)."""
        ordered = sorted(counters, key=lambda c: c.key)
        for c in ordered:
            c.waiting += 1
        held: list[Counter] = []
        try:
            for c in ordered:
                await c.lock.acquire()
                held.append(c)
            yield
        finally:
            for c in reversed(held):
                c.lock.release()
            for c in ordered:
                c.waiting -= 1

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        try:
            if self._sqlite:
                async with self._db_lock, self.engine.begin() as conn:
                    yield conn
            else:
                async with self.engine.begin() as conn:
                    yield conn
        except (sa.exc.SQLAlchemyError, OSError) as e:
            log.warning("quota counters: a transaction failed: %s", type(e).__name__)
            raise CountersUnavailable(type(e).__name__) from None

    def _insert(self) -> Any:
        if self._sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(quota_counters)

    def _where(self, c: Counter, replica: str | None = None) -> Any:
        t = quota_counters.c
        where = (t.subject == c.subject) & (t.kind == c.kind) & (t.window_start == c.window_start)
        return where if replica is None else where & (t.replica == replica)

    async def _upsert_mine(self, conn: AsyncConnection, c: Counter, held: int, in_use: int) -> None:
        values = {"held": held, "in_use": in_use}
        await conn.execute(self._insert().values(subject=c.subject, kind=c.kind, window_start=c.window_start,
                                                 replica=self.replica, **values)
                           .on_conflict_do_update(index_elements=["subject", "kind", "window_start", "replica"],
                                                  set_=values))

    def _clock(self) -> Any:
        """Heartbeats' time, epoch seconds: the database's clock, which every replica shares (their own may be
        skewed: a replica running seconds behind looked dead to the others, which took its leases while it ran
        on them). SQLite serves one process: its own clock."""
        if self._sqlite:
            return sa.literal(time.time(), sa.Float)
        return sa.cast(sa.func.extract("epoch", sa.func.clock_timestamp()), sa.Float)

    async def _live_replicas(self, conn: AsyncConnection) -> int:
        since = self._clock() - self.dead_after
        stmt = sa.select(sa.func.count()).select_from(quota_replicas).where(quota_replicas.c.beat_at >= since)
        return max(1, int((await conn.execute(stmt)).scalar_one()))

    async def _sync_many(self, items: list[tuple[Counter, int]], *, renew: bool) -> None:
        """For each counter: give back the unused lease, add what was used beyond it, take a new one (``need``
        at least when that much remains; none when ``renew`` is False). One transaction, rows locked in key
        order; the counters' locks are held by the caller. Nothing changes here when it fails."""
        items = sorted(items, key=lambda item: item[0].key)
        for c, _ in items:
            c.syncing = True
        try:
            results = []
            async with self._transaction() as conn:
                t = quota_counters.c
                live = await self._live_replicas(conn)
                for c, need in items:
                    carried = c.in_flight if c.is_slots else c.spent
                    await conn.execute(self._insert().values(subject=c.subject, kind=c.kind,
                                                             window_start=c.window_start, replica=SHARED, held=0,
                                                             in_use=0).on_conflict_do_nothing())
                    shared = int((await conn.execute(sa.select(t.held).where(self._where(c, SHARED))
                                                     .with_for_update())).scalar_one())
                    mine = (await conn.execute(sa.select(t.held).where(self._where(c, self.replica))
                                               .with_for_update())).scalar_one_or_none()
                    others = (await conn.execute(sa.select(sa.func.coalesce(sa.func.sum(t.held), 0),
                                                           sa.func.coalesce(sa.func.sum(t.in_use), 0)).where(
                        self._where(c) & (t.replica != SHARED) & (t.replica != self.replica)))).one()
                    base = shared - int(mine or 0) + carried
                    limit = c.limit
                    avail = limit - base
                    grant = min(avail, max(need, avail // live)) if renew and avail >= max(need, 1) else 0
                    total = base + grant
                    await conn.execute(quota_counters.update().where(self._where(c, SHARED)).values(held=total))
                    await self._upsert_mine(conn, c, carried + grant if c.is_slots else grant,
                                            carried if c.is_slots else 0)
                    results.append((limit, carried, grant, total, int(others[0]), int(others[1])))
            self.live, self._wrote = live, True
            for (c, _), (limit, carried, grant, total, others_held, others_in_use) in zip(items, results):
                c.relimited = c.limit != limit   # changed again while this sync ran
                if c.is_slots:
                    c.held = carried + grant
                    c.used_elsewhere = others_in_use
                else:
                    c.grant = grant
                    c.spent -= carried
                    c.used_elsewhere = total - others_held - grant
        finally:
            for c, _ in items:
                c.syncing = False

    async def _flush(self, counters: list[Counter]) -> None:
        """Write what this replica used into its own rows, leases kept, without holding up admissions (a
        single replica: there is nobody to renew leases for)."""
        if not counters:
            return
        async with self._locked(counters):
            snaps = [(c, c.spent) for c in counters]
            rows = [{"subject": c.subject, "kind": c.kind, "window_start": c.window_start, "replica": self.replica,
                     "held": c.held if c.is_slots else c.grant - spent, "in_use": c.in_flight if c.is_slots else 0}
                    for c, spent in snaps]
            stmt = self._insert()
            stmt = stmt.on_conflict_do_update(index_elements=["subject", "kind", "window_start", "replica"],
                                              set_={"held": stmt.excluded.held, "in_use": stmt.excluded.in_use})
            async with self._transaction() as conn:
                await conn.execute(stmt, rows)   # one statement for them all
            for c, spent in snaps:
                if not c.is_slots:
                    c.grant -= spent
                    c.spent -= spent
                    c.used_elsewhere += spent   # now in the database: consumed as of this sync

    @property
    def single_process(self) -> bool:
        """SQLite serves one process: no other replica to beat for, or to learn limit changes from."""
        return self._sqlite

    async def heartbeat(self) -> int:
        """Write this replica's heartbeat and learn how many replicas are live; presume dead (and reclaim)
        replicas silent for ``dead_after``. (On SQLite the first beat, at start, also reclaims what a previous
        run of the process left; later ones are skipped: there is no other replica.)"""
        if self._sqlite and self._beaten:
            return 1
        self._beaten = True
        async with self._transaction() as conn:
            now = float((await conn.execute(sa.select(self._clock()))).scalar_one())
            updated = await conn.execute(quota_replicas.update().where(quota_replicas.c.replica == self.replica)
                                         .values(beat_at=now))
            if updated.rowcount == 0:
                await conn.execute(quota_replicas.insert().values(replica=self.replica, beat_at=now))
            # SQLite serves one process: any other replica is a previous run of it, however recent its beat.
            silent_since = now if self._sqlite else now - self.dead_after
            dead = [r.replica for r in (await conn.execute(sa.select(quota_replicas.c.replica).where(
                (quota_replicas.c.beat_at < silent_since) & (quota_replicas.c.replica != self.replica)
            ))).all()]
            self.live = 1 if self._sqlite else await self._live_replicas(conn)
        for replica in dead:
            await self._reclaim(replica, silent_since)
        return self.live

    async def _reclaim(self, replica: str, silent_since: float) -> None:
        """Give back everything a dead replica's rows held, and forget it (idempotent across replicas). The
        shared rows are locked in key order, as ``_sync_many`` locks them."""
        t = quota_counters.c
        async with self._transaction() as conn:
            gone = await conn.execute(quota_replicas.delete().where(
                (quota_replicas.c.replica == replica) & (quota_replicas.c.beat_at < silent_since)))
            if gone.rowcount == 0:
                return   # it came back, or another replica reclaimed it first
            rows = (await conn.execute(quota_counters.select().where(t.replica == replica)
                                       .order_by(t.subject, t.kind, t.window_start).with_for_update())).all()
            for row in rows:
                where = ((t.subject == row.subject) & (t.kind == row.kind) & (t.window_start == row.window_start))
                await conn.execute(quota_counters.update().where(where & (t.replica == SHARED))
                                   .values(held=t.held - row.held))
                await conn.execute(quota_counters.delete().where(where & (t.replica == replica)))
        log.warning("quota counters: replica %s stopped beating; reclaimed %d counter row(s)", replica, len(rows))

    async def sync_all(self, now: float, *, final: bool = False) -> None:
        """The periodic sync (after ``heartbeat``): with other replicas live, renew the leases of active
        counters (so each gets its share) and give idle ones' back; alone, only write what was used. Ended
        windows are dropped, the next minute's leases taken just before it starts. ``final``: give
        everything back."""
        for key, c in list(self.counters.items()):
            if not c.is_slots and c.window_end <= now:
                del self.counters[key]
        active, idle = [], []
        for c in self.counters.values():
            if c.active and not final:
                active.append(c)
            elif c.left != 0 or (not c.is_slots and c.spent):
                idle.append(c)
            c.active = False
        if active:
            if self.live > 1:
                async with self._locked(active):
                    await self._sync_many([(c, 0) for c in active], renew=True)
            else:
                await self._flush(active)
        if idle and (self.live > 1 or final):   # alone, an idle lease harms nobody: kept for the next request
            async with self._locked(idle):
                await self._sync_many([(c, 0) for c in idle], renew=False)
        # The next minute's leases, taken before it starts, so that its first request finds one ready.
        upcoming = []
        in_use = {id(c) for c in active}
        for c in list(self.counters.values()):   # in use this minute: active, or holding a lease
            soon = c.window_end - now <= 2 * self.sync_seconds
            if c.kind in MINUTE_KINDS and soon and (id(c) in in_use or c.grant > 0):
                nxt = self.counter(c.subject, c.kind, c.window_end, c.window_end + 60, c.limit)
                if nxt.left == 0 and not nxt.syncing and not nxt.waiting:
                    nxt.active = True
                    upcoming.append(nxt)
        if upcoming:
            async with self._locked(upcoming):
                await self._sync_many([(c, 0) for c in upcoming], renew=True)
        for key, c in list(self.counters.items()):
            if not c.active and not c.waiting and c.left == 0 and (c.in_flight == 0 if c.is_slots else c.spent == 0):
                del self.counters[key]
        if self._wrote and (final or now - self._last_gc > 60):
            self._last_gc, self._wrote = now, False
            await self._collect(now)

    async def _collect(self, now: float) -> None:
        """Delete the rows of windows that ended a while ago."""
        t = quota_counters.c
        async with self._transaction() as conn:
            for kind, keep in _KEEP_AFTER.items():
                await conn.execute(quota_counters.delete().where((t.kind == kind) & (t.window_start < now - keep)))

    async def leave(self) -> None:
        """Clean shutdown: give every lease back and remove this replica's heartbeat."""
        for task in list(self._debts):
            with contextlib.suppress(Exception):
                await task
        await self.sync_all(time.time(), final=True)
        async with self._transaction() as conn:
            await conn.execute(quota_replicas.delete().where(quota_replicas.c.replica == self.replica))
