"""The usage ledger's writer: records arrive on the request path, are written in batches off it.

``Ledger.record`` is the sink on ``Gateway.recorder``: it appends the finished InferenceRecord (nothing changes
it any more) to a buffer (O(1), under a microsecond; never blocks, never raises); the writer turns it into a
row. A background task writes the buffer, up to
``batch_size`` records per statement (one executemany), every ``flush_seconds`` or as soon as a batch is full.
Every row carries a MAC (enclave.row_mac, table ``usage_records``, every column), so reads serve only rows this
enclave wrote: an edited, inserted or swapped row is left out, logged and counted like the identity tables'.
The two body hashes (what receipts sign) are stored encrypted (``enclave.usage.hash_seal``): in clear they
would let the host confirm a guessed prompt or answer.

What can be lost:

* clean shutdown (the app's lifespan ends): nothing; ``stop()`` writes everything after the streams have ended;
* a crash (``kill -9``, power loss): at most the records of the last ``flush_seconds`` plus the batch being
  written at that moment (what a retry was holding, while the database is down: up to ``max_pending``);
* the database down: nothing while it comes back before ``max_pending`` records wait; the writer retries with
  a growing pause (up to 30 s); beyond ``max_pending`` the oldest records are dropped, each counted in
  ``cube_usage_records_dropped_total`` and logged at ERROR (memory stays bounded).

A write that committed but whose answer was lost is retried; the primary key (the request id) keeps it from
being stored twice: a batch meeting an existing id is written row by row, skipping ids already stored.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from enclave.config import UsageSettings
from enclave.inference.record import InferenceRecord
from enclave.row_mac import RowMac
from enclave.schema import usage_records
from enclave.usage.entry import FIELDS, TABLE, UsageEntry, check_storable, checked_values, record_values
from enclave.usage.hash_seal import HashSeal
from enclave.usage.report import UsageFilter

log = logging.getLogger("enclave.usage")

RETRY_MAX_SECONDS = 30.0
DROP_LOG_INTERVAL = 10.0   # seconds between the ERROR lines about dropped records (each drop is counted)
STOP_TIMEOUT = 10.0        # how long a shutdown keeps retrying a database that does not take the last records
SCAN_ROWS_PER_FETCH = 1000
#: The one text form SQLite holds the ledger's times in (SQLAlchemy's DATETIME storage format, UTC).
_SQLITE_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})\.(\d{6})", re.ASCII)


class _StoredTime(sa.types.TypeDecorator):
    """created_at as read back: PostgreSQL's typed timestamp as it comes; SQLite's text only in the form the
    ledger writes, anything else handed on as the text (which ``checked_values`` refuses). SQLite compares the
    text in the range filters: another spelling of the same instant (``10:30-14:00`` on the day before) would
    pass the MAC yet fall in another range, and one SQLAlchemy cannot parse would fail the whole read."""

    impl = sa.String
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        if not isinstance(value, str):
            return value
        m = _SQLITE_TIME.fullmatch(value)
        if m is None:
            return value
        try:
            return datetime(*map(int, m.groups()))
        except ValueError:   # 2026-02-30
            return value


SEALED_COLUMNS = ("request_sha256", "response_sha256")
_SEALED_INDEX = tuple((column, FIELDS.index(column)) for column in SEALED_COLUMNS)
#: What reads select: every field in FIELDS order, then the MAC.
_COLUMNS = sa.select(*(sa.type_coerce(usage_records.c[name], _StoredTime()).label(name) if name == "created_at"
                       else usage_records.c[name] for name in FIELDS), usage_records.c.mac)


class Ledger:
    def __init__(self, engine: AsyncEngine, row_key: bytes, settings: UsageSettings, *, hash_key: bytes,
                 registry: CollectorRegistry | None = None,
                 on_integrity_failure: Callable[[str], None] | None = None) -> None:
        self.engine = engine
        self._mac = RowMac(row_key)
        self._seal = HashSeal(hash_key)   # the body hashes are stored encrypted (enclave.usage.hash_seal)
        self.flush_seconds = settings.flush_seconds
        self.batch_size = settings.batch_size
        self.max_pending = settings.max_pending
        self.on_integrity_failure = on_integrity_failure
        registry = registry if registry is not None else CollectorRegistry()
        self._pending: deque[InferenceRecord] = deque()
        self._writing: list[InferenceRecord] = []
        self._by_id: dict[str, InferenceRecord] = {}   # pending and being written, for ``find``
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._drops_unlogged = 0
        self._drop_logged_at = float("-inf")
        self.dropped = Counter("cube_usage_records_dropped_total", "Usage records dropped because the database "
                               "could not be written and the buffer was full", registry=registry)
        self.written = Counter("cube_usage_records_written_total", "Usage records written to the database",
                               registry=registry)
        self.write_failures = Counter("cube_usage_write_failures_total", "Failed writes of a usage batch (retried)",
                                      registry=registry)
        pending = Gauge("cube_usage_records_pending", "Usage records not yet written", registry=registry)
        pending.set_function(self.pending_count)

    # ---- the request path ---------------------------------------------------------------------------------
    def record(self, record: InferenceRecord) -> None:
        """The Recorder sink: buffer the finished record; never blocks, never raises."""
        try:
            self._by_id[record.request_id] = record
        except Exception:
            log.exception("usage ledger: a record without a usable request id was not kept")
            return
        self._pending.append(record)
        if len(self._pending) > self.max_pending:
            self._drop_oldest()
        if len(self._pending) >= self.batch_size:
            self._wake.set()

    def pending_count(self) -> int:
        return len(self._pending) + len(self._writing)

    def _drop_oldest(self) -> None:
        while len(self._pending) > self.max_pending:
            old = self._pending.popleft()
            if self._by_id.get(old.request_id) is old:
                del self._by_id[old.request_id]
            self.dropped.inc()
            self._drops_unlogged += 1
        now = time.monotonic()
        if now - self._drop_logged_at >= DROP_LOG_INTERVAL:
            log.error("usage ledger: dropped %d usage record(s), the oldest, because the database could not be "
                      "written and %d are waiting (usage.max_pending)", self._drops_unlogged, self.max_pending)
            self._drops_unlogged = 0
            self._drop_logged_at = now

    # ---- the writer ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-ledger-writer")

    async def _run(self) -> None:
        retry_in: float | None = None   # while writes fail: the pause before the next try (no full batch cuts it)
        while True:
            if retry_in is None:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self.flush_seconds)
                except TimeoutError:
                    pass
            else:
                await asyncio.sleep(retry_in)
            self._wake.clear()
            try:
                await self.flush()
                retry_in = None
            except Exception as e:   # the database is down or refuses: keep the records, try again later
                retry_in = min(retry_in * 2, RETRY_MAX_SECONDS) if retry_in else self.flush_seconds
                log.warning("usage ledger: writing %d record(s) failed (%s); retrying in %.1f s",
                            self.pending_count(), type(e).__name__, retry_in)

    async def flush(self) -> None:
        """Write every record buffered so far (not those arriving meanwhile: a busy service cannot keep a flush
        going forever); raises the database's error (the records stay buffered)."""
        async with self._lock:
            left = len(self._pending)
            while left > 0 and self._pending:
                batch = [self._pending.popleft() for _ in range(min(self.batch_size, left, len(self._pending)))]
                left -= len(batch)
                self._writing = batch
                try:
                    await self._insert(batch)
                except BaseException:
                    self.write_failures.inc()
                    self._pending.extendleft(reversed(batch))   # back in front, in order: the oldest first
                    self._writing = []
                    if len(self._pending) > self.max_pending:
                        self._drop_oldest()
                    raise
                self._writing = []
                for record in batch:
                    if self._by_id.get(record.request_id) is record:
                        del self._by_id[record.request_id]
                self.written.inc(len(batch))
            if self._drops_unlogged:
                log.error("usage ledger: dropped %d more usage record(s) while the database could not be written",
                          self._drops_unlogged)
                self._drops_unlogged = 0

    def _row(self, record: InferenceRecord) -> dict | None:
        try:
            values = record_values(record)
            check_storable(values)
            row = dict(zip(FIELDS, values))
            row["mac"] = self._mac.mac(TABLE, values)   # over the hashes in clear
            for column in SEALED_COLUMNS:
                row[column] = self._seal.seal(row[column], record.request_id, column)
            return row
        except Exception:   # a record no row can hold: left out, so that it never blocks the ones after it
            log.exception("usage ledger: the record of request %s cannot be stored; left out",
                          getattr(record, "request_id", "?"))
            return None

    async def _insert(self, batch: list[InferenceRecord]) -> None:
        rows = [row for row in map(self._row, batch) if row is not None]
        if not rows:
            return
        try:
            async with self.engine.begin() as conn:
                await conn.execute(usage_records.insert(), rows)
        except IntegrityError:
            await self._insert_each(rows)

    async def _insert_each(self, rows: list[dict]) -> None:
        """A batch that met a stored request id: row by row, each id stored once (a retried batch whose first
        attempt committed; or a row someone else put there, which is then never counted: its MAC fails)."""
        for row in rows:
            try:
                async with self.engine.begin() as conn:
                    await conn.execute(usage_records.insert(), [row])
            except IntegrityError:
                exists, stored = await self._stored_mac(row["request_id"])
                if not exists:
                    raise
                if stored != row["mac"]:
                    log.error("usage ledger: a usage_records row with request id %s was already there and is not "
                              "this enclave's record (inserted outside the enclave?); the record is not stored",
                              row["request_id"])

    async def _stored_mac(self, request_id: str) -> tuple[bool, str | None]:
        """(whether a row with this request id is stored, its MAC)."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sa.select(usage_records.c.mac)
                                       .where(usage_records.c.request_id == request_id))).all()
        return (True, rows[0].mac) if rows else (False, None)

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the writer and write everything still buffered (retrying for up to ``timeout`` seconds)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        deadline = time.monotonic() + timeout
        pause = min(self.flush_seconds, 0.5)
        while True:
            try:
                await self.flush()
                if not self._pending:   # (records made while it wrote: the last requests' cancellations)
                    return
                continue
            except Exception as e:
                if time.monotonic() + pause > deadline:
                    log.error("usage ledger: %d usage record(s) could not be written before shutdown (%s): they "
                              "are lost", self.pending_count(), type(e).__name__)
                    return
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX_SECONDS)

    # ---- reads --------------------------------------------------------------------------------------------
    def _refused(self, key: str) -> None:
        log.error("store integrity: refused a %s row whose MAC does not match (primary key %s): edited, swapped "
                  "or inserted outside the enclave", TABLE, key)
        if self.on_integrity_failure is not None:
            self.on_integrity_failure(TABLE)

    def verified(self, row: Sequence[Any]) -> UsageEntry | None:
        """The entry of a row selected as ``_COLUMNS`` (FIELDS, then the MAC), or None (logged, counted) when
        its MAC fails or it holds values of types never written."""
        try:
            values = checked_values(row[:-1])
            for column, i in _SEALED_INDEX:
                values[i] = self._seal.open(values[i], values[0], column)
        except (ValueError, TypeError, AttributeError):
            self._refused(str(row[0]))
            return None
        if not self._mac.valid(TABLE, values, row[-1]):
            self._refused(str(values[0]))
            return None
        return UsageEntry(*values)

    async def find(self, request_id: str) -> UsageEntry | None:
        """The record of one request: from the buffer while not yet written, else from the database (None when
        there is none or its row fails its MAC)."""
        pending = self._by_id.get(request_id)
        if pending is not None:
            try:
                return UsageEntry.from_record(pending)
            except Exception:   # (logged when the writer meets it)
                return None
        async with self.engine.connect() as conn:
            rows = (await conn.execute(_COLUMNS.where(usage_records.c.request_id == request_id))).all()
        return self.verified(rows[0]) if rows else None

    async def scan(self, where: UsageFilter, *, newest_first: bool = True) -> AsyncIterator[UsageEntry | None]:
        """Every stored row ``where`` selects, verified, streamed from the database: its entry, or None for a row
        refused (MAC, or values outside ``where``: the database answered another query). Only written rows:
        ``flush()`` first to include this process's buffer.

        A request counts once: the host can drop the primary key and insert copies of a genuine row (its MAC
        holds), and every copy after the first is refused. Copies share (created_at, request_id), the order of
        the scan, so they arrive one after another and only the previous request id needs remembering."""
        order = sa.desc if newest_first else sa.asc
        stmt = (_COLUMNS.where(*where.clauses())
                .order_by(order(usage_records.c.created_at), order(usage_records.c.request_id))
                .execution_options(yield_per=SCAN_ROWS_PER_FETCH))
        previous: str | None = None
        async with self.engine.connect() as conn:
            result = await conn.stream(stmt)
            async for rows in result.partitions(SCAN_ROWS_PER_FETCH):   # one hop to the driver per partition
                for row in rows:
                    entry = self.verified(row)
                    if entry is not None and not where.matches(entry):   # the database answered another query
                        self._refused(entry.request_id)
                        entry = None
                    elif entry is not None and entry.request_id == previous:
                        self._refused_copy(previous)
                        entry = None
                    elif entry is not None:
                        previous = entry.request_id
                    yield entry

    def _refused_copy(self, request_id: str) -> None:
        log.error("store integrity: refused a second %s row for request %s: a copy of a genuine row, inserted "
                  "outside the enclave (its primary key removed?)", TABLE, request_id)
        if self.on_integrity_failure is not None:
            self.on_integrity_failure(TABLE)
