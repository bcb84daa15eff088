"""The usage ledger on SQLite and PostgreSQL: batches, find, row MACs, shutdown, a database that is down, the
buffer bound, records never stored twice."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from enclave.config import UsageSettings
from enclave.inference.usage import Usage
from enclave.store import Store
from enclave.usage import Ledger, UsageEntry, UsageFilter
from enclave.usage.entry import FIELDS

from tests.enclave.conftest import HASH_KEY, ROW_KEY
from tests.enclave.test_store import store  # noqa: F401  (SQLite and PostgreSQL, a fresh schema each)
from tests.enclave.usage_support import T0, made_record, rename_table, stored_rows


class Refusals(list):
    def __call__(self, table: str) -> None:
        self.append(table)


def ledger_of(store: Store, refusals: Refusals | None = None, **settings: float) -> Ledger:
    return Ledger(store.engine, ROW_KEY, UsageSettings(**settings), hash_key=HASH_KEY, on_integrity_failure=refusals)


async def until(condition, what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_table_holds_every_field_and_no_content(store: Store) -> None:
    async with store.engine.connect() as conn:
        columns = await conn.run_sync(lambda c: [col["name"] for col in sa.inspect(c).get_columns("usage_records")])
        fks = await conn.run_sync(lambda c: sa.inspect(c).get_foreign_keys("usage_records"))
    assert set(columns) == {*FIELDS, "mac"}
    assert not {"prompt", "messages", "content", "completion", "body"} & set(columns)
    assert fks == []   # a deleted user's or domain's usage stays


async def test_record_find_flush_and_exact_entry(store: Store) -> None:
    ledger = ledger_of(store)
    record = made_record(usage=Usage(11, 7, 18, estimated=True), stream=True, request_sha256="a" * 64,
                         response_sha256="b" * 64, status=200, outcome="completed")
    ledger.record(record)
    pending = await ledger.find(record.request_id)           # from the buffer, before any write
    assert pending is not None and await stored_rows(store) == []
    await ledger.flush()
    stored = await ledger.find(record.request_id)             # from the database, MAC checked
    assert stored == pending == UsageEntry(
        request_id=record.request_id, created_at=datetime(2026, 11, 30, 12, 0, tzinfo=UTC), domain_id="d" * 36,
        user_id="u" * 36, pat_id="p" * 36, model="m1", backend="b1", route="chat/completions", stream=True,
        status=200, outcome="completed", prompt_tokens=11, completion_tokens=7, total_tokens=18, estimated=True,
        ttft_ms=12, duration_ms=500, request_sha256="a" * 64, response_sha256="b" * 64)
    assert await ledger.find("0" * 32) is None


async def test_a_full_batch_is_written_without_waiting_for_the_interval(store: Store) -> None:
    ledger = ledger_of(store, flush_seconds=60, batch_size=10, max_pending=100)
    ledger.start()
    try:
        for i in range(10):
            ledger.record(made_record(started_at=T0 + i))

        async def written() -> bool:
            return len(await stored_rows(store)) == 10
        await until(written, "a full batch was not written before the 60 s interval")
    finally:
        await ledger.stop()


async def test_the_interval_writes_a_partial_batch(store: Store) -> None:
    ledger = ledger_of(store, flush_seconds=0.05, batch_size=500)
    ledger.start()
    try:
        ledger.record(made_record())

        async def written() -> bool:
            return len(await stored_rows(store)) == 1
        await until(written, "the flush interval did not write the record")
    finally:
        await ledger.stop()


async def test_stop_writes_everything_in_batches(store: Store) -> None:
    ledger = ledger_of(store, flush_seconds=60, batch_size=100, max_pending=5000)
    ledger.start()
    records = [made_record(started_at=T0 + i) for i in range(1234)]
    for r in records:
        ledger.record(r)
    await ledger.stop()
    rows = await stored_rows(store)
    assert sorted(r.request_id for r in rows) == sorted(r.request_id for r in records)
    assert ledger.pending_count() == 0 and ledger.written._value.get() == 1234


async def test_an_edited_row_is_refused_logged_and_counted(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    refusals = Refusals()
    ledger = ledger_of(store, refusals)
    honest, edited, typed = made_record(), made_record(), made_record()
    for r in (honest, edited, typed):
        ledger.record(r)
    await ledger.flush()
    async with store.engine.begin() as conn:
        await conn.execute(sa.text("UPDATE usage_records SET total_tokens = 1 WHERE request_id = :id"),
                           {"id": edited.request_id})
        await conn.execute(sa.text("UPDATE usage_records SET status = 'x' WHERE request_id = :id"),
                           {"id": typed.request_id}) if store.engine.dialect.name == "sqlite" else None
    with caplog.at_level(logging.ERROR, logger="enclave.usage"):
        assert await ledger.find(edited.request_id) is None
    assert refusals == ["usage_records"] and edited.request_id in caplog.text
    assert await ledger.find(honest.request_id) is not None
    seen = [e async for e in ledger.scan(UsageFilter())]
    assert sorted(e.request_id for e in seen if e is not None) == sorted(
        [honest.request_id] + ([] if store.engine.dialect.name == "sqlite" else [typed.request_id]))
    assert seen.count(None) == (2 if store.engine.dialect.name == "sqlite" else 1)


async def test_a_row_moved_to_another_request_id_or_inserted_is_refused(store: Store) -> None:
    refusals = Refusals()
    ledger = ledger_of(store, refusals)
    record = made_record()
    ledger.record(record)
    await ledger.flush()
    async with store.engine.begin() as conn:
        await conn.execute(sa.text("UPDATE usage_records SET request_id = :new"), {"new": "f" * 32})
    assert await ledger.find("f" * 32) is None and refusals == ["usage_records"]


async def test_a_genuine_row_copied_is_counted_once(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    """The host owns the database: it drops the primary key and inserts copies of a genuine row (same request id,
    same MAC). Every copy passed its MAC, so a report counted the request as often as the host liked (a bill
    inflated); now one request id counts once and each copy is refused."""
    from enclave.usage import report

    refusals = Refusals()
    ledger = ledger_of(store, refusals)
    victim, other = made_record(usage=Usage(10, 90, 100)), made_record(started_at=T0 + 60)
    for r in (victim, other):
        ledger.record(r)
    await ledger.flush()
    async with store.engine.begin() as conn:   # the table rebuilt without its key, the row put in twice more
        await conn.execute(sa.text("CREATE TABLE usage_copy AS SELECT * FROM usage_records"))
        await conn.execute(sa.text("DROP TABLE usage_records"))
        await conn.execute(sa.text("ALTER TABLE usage_copy RENAME TO usage_records"))
        for _ in range(2):
            await conn.execute(sa.text("INSERT INTO usage_records SELECT * FROM usage_records WHERE request_id = :id "
                                       "LIMIT 1"), {"id": victim.request_id})
    assert len(await stored_rows(store)) == 4
    with caplog.at_level(logging.ERROR, logger="enclave.usage"):
        result = await report(ledger, UsageFilter(), group_by=("pat",))
    assert result.totals.requests == 2 and result.totals.total_tokens == 108
    assert result.integrity_failures == 2 and refusals == ["usage_records"] * 2
    assert victim.request_id in caplog.text
    listing = await report(ledger, UsageFilter())
    assert sorted(e.request_id for e in listing.entries) == sorted([victim.request_id, other.request_id])


@pytest.mark.parametrize("text", [
    "2026-11-30 10:30:00.000000-14:00",   # the same instant (its MAC held), a November text
    "2026-11-30T10:30:00.000000-14:00",
    "2026-12-01T00:30:00",                # the same instant, another spelling
    "02026-12-01 00:30:00.000000",        # SQLAlchemy raised on these: every report over the row failed
    "2026-12-01 00:30:00.000000xyz",
])
async def test_a_time_rewritten_as_another_text_never_moves_or_breaks_a_report(tmp_path, text: str) -> None:
    """SQLite keeps times as text, compared as text by the range filters. The host rewrote a record's time as
    another spelling of the same instant (its MAC held): 00:30Z on 1 December written as 10:30-14:00 on 30
    November was counted in November's report; a spelling SQLAlchemy cannot read made every report (and the
    receipt) over that row fail. Now only the ledger's own form is read, and a row whose time is not in the
    range the database selected it for is refused."""
    # (SQLite only: PostgreSQL keeps typed timestamps, a time cannot be respelled there)
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}", row_key=ROW_KEY)
    try:
        await _respelled_time_is_refused(store, text)
    finally:
        await store.close()


async def _respelled_time_is_refused(store: Store, text: str) -> None:
    from enclave.usage import report

    refusals = Refusals()
    ledger = ledger_of(store, refusals)
    december = made_record(started_at=datetime(2026, 12, 1, 0, 30, tzinfo=UTC).timestamp())
    november = made_record(started_at=datetime(2026, 11, 15, tzinfo=UTC).timestamp())
    for r in (december, november):
        ledger.record(r)
    await ledger.flush()
    async with store.engine.begin() as conn:
        await conn.execute(sa.text("UPDATE usage_records SET created_at = :t WHERE request_id = :id"),
                           {"t": text, "id": december.request_id})
    nov = await report(ledger, UsageFilter(since=datetime(2026, 11, 1, tzinfo=UTC),
                                           until=datetime(2026, 12, 1, tzinfo=UTC)))
    assert [e.request_id for e in nov.entries] == [november.request_id]
    every = await report(ledger, UsageFilter())
    assert [e.request_id for e in every.entries] == [november.request_id] and every.integrity_failures == 1
    assert await ledger.find(december.request_id) is None
    assert refusals and set(refusals) == {"usage_records"}


async def test_a_row_the_filter_selects_but_does_not_match_is_refused(store: Store) -> None:
    """Whatever the database answers (a view, an operator of the host's), a verified row counts only when its
    own values match the report's filter."""
    refusals = Refusals()
    ledger = ledger_of(store, refusals)
    record = made_record(domain="a" * 36)
    ledger.record(record)
    await ledger.flush()

    class Lying(UsageFilter):   # what a database answering every query with every row amounts to
        def clauses(self) -> list:
            return []

    seen = [e async for e in ledger.scan(Lying(domain_id="b" * 36, since=datetime(2027, 1, 1, tzinfo=UTC)))]
    assert seen == [None] and refusals == ["usage_records"]
    assert [e.request_id for e in [e async for e in ledger.scan(Lying(domain_id="a" * 36))] if e] == [record.request_id]


async def test_the_database_down_then_back_loses_nothing(store: Store) -> None:
    ledger = ledger_of(store, flush_seconds=0.05, batch_size=7)
    ledger.start()
    try:
        await rename_table(store, "usage_records", "usage_records_away")
        records = [made_record(started_at=T0 + i) for i in range(20)]
        for r in records:
            ledger.record(r)

        async def failing() -> bool:
            return ledger.write_failures._value.get() >= 2
        await until(failing, "the writer did not try (and fail) while the table was away")
        assert ledger.pending_count() == 20
        assert await ledger.find(records[0].request_id) is not None   # still served from the buffer
        await rename_table(store, "usage_records_away", "usage_records")

        async def written() -> bool:
            return ledger.pending_count() == 0
        await until(written, "the records were not written once the database was back", within=40)
    finally:
        await ledger.stop()
    rows = await stored_rows(store)
    assert sorted(r.request_id for r in rows) == sorted(r.request_id for r in records)   # each once


async def test_a_full_buffer_drops_the_oldest_and_counts_them(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    ledger = ledger_of(store, flush_seconds=60, batch_size=5, max_pending=5)
    await rename_table(store, "usage_records", "usage_records_away")
    records = [made_record(started_at=T0 + i) for i in range(8)]
    with caplog.at_level(logging.ERROR, logger="enclave.usage"):
        for r in records:
            ledger.record(r)
        with pytest.raises(sa.exc.SQLAlchemyError):
            await ledger.flush()                                 # the batch goes back; the bound still holds
    assert ledger.dropped._value.get() == 3 and ledger.pending_count() == 5
    assert "dropped" in caplog.text
    assert [await ledger.find(r.request_id) is not None for r in records[3:]] == [True] * 5
    await rename_table(store, "usage_records_away", "usage_records")
    await ledger.flush()
    assert sorted(r.request_id for r in await stored_rows(store)) == sorted(r.request_id for r in records[3:])


async def test_a_record_written_twice_is_stored_once(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    """A retried batch whose first write committed (its answer lost) stores nothing twice; a row someone else
    put under a request id keeps the enclave's record out (and is never counted: its MAC fails)."""
    ledger = ledger_of(store)
    first, second = made_record(), made_record()
    ledger.record(first)
    await ledger.flush()
    ledger.record(first)       # the same record again, as a retry after a lost commit acknowledgement
    ledger.record(second)
    with caplog.at_level(logging.ERROR, logger="enclave.usage"):
        await ledger.flush()
    assert caplog.text == ""
    assert sorted(r.request_id for r in await stored_rows(store)) == sorted([first.request_id, second.request_id])
    forged = made_record()
    async with store.engine.begin() as conn:
        await conn.execute(sa.text("INSERT INTO usage_records (request_id, created_at, domain_id, user_id, pat_id, "
                                   "model, backend, route, stream, status, outcome, prompt_tokens, "
                                   "completion_tokens, total_tokens, estimated, duration_ms, mac) VALUES (:id, "
                                   ":t, 'd', 'u', 'p', 'm', 'b', 'r', false, 200, 'completed', 1, 1, 2, false, 1, "
                                   ":mac)"), {"id": forged.request_id, "t": datetime.now(UTC), "mac": "0" * 64})
    ledger.record(forged)
    with caplog.at_level(logging.ERROR, logger="enclave.usage"):
        await ledger.flush()
    assert "already there" in caplog.text and ledger.pending_count() == 0
    assert await ledger.find(forged.request_id) is None


async def test_a_record_without_usage_or_timings_is_kept(store: Store) -> None:
    ledger = ledger_of(store)
    record = made_record(usage=None, ttft_seconds=None)
    ledger.record(record)
    await ledger.flush()
    entry = await ledger.find(record.request_id)
    assert entry is not None and (entry.total_tokens, entry.ttft_ms, entry.estimated) == (0, None, False)


async def test_the_sink_never_raises_and_a_bad_record_never_blocks_the_others(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        request_id = "b" * 32

    class Worse:
        request_id = property(lambda self: 1 / 0)

    ledger = ledger_of(store)
    good = made_record()
    ledger.record(Worse())    # type: ignore[arg-type]
    ledger.record(Broken())   # type: ignore[arg-type]
    ledger.record(good)
    assert await ledger.find("b" * 32) is None
    with caplog.at_level(logging.ERROR, logger="enclave.usage"):
        await ledger.flush()
    assert "cannot be stored" in caplog.text and "without a usable request id" in caplog.text
    assert [r.request_id for r in await stored_rows(store)] == [good.request_id] and ledger.pending_count() == 0


async def test_a_value_beyond_its_column_is_left_out_and_never_stops_the_ledger(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    """A count too large for its BIGINT column failed the whole batch, at every retry: nothing was written any
    more, on SQLite and PostgreSQL alike. Now that record is left out (logged) and the others are written; a
    request longer than an INTEGER of milliseconds is recorded as that long."""
    ledger = ledger_of(store)
    poison = made_record(usage=Usage(2**70, 1, 2**70 + 1))
    endless = made_record(started_at=T0 + 1, duration_seconds=40 * 86400.0, ttft_seconds=30 * 86400.0)
    good = made_record(started_at=T0 + 2)
    for record in (poison, endless, good):
        ledger.record(record)
    with caplog.at_level(logging.ERROR, logger="enclave.usage"):
        await ledger.flush()
    assert f"request {poison.request_id} cannot be stored" in caplog.text
    assert [r.request_id for r in await stored_rows(store)] == [endless.request_id, good.request_id]
    stored = await ledger.find(endless.request_id)
    assert stored is not None and stored.duration_ms == stored.ttft_ms == 2**31 - 1
    assert ledger.pending_count() == 0


@pytest.mark.parametrize("bad", [{"flush_seconds": 0}, {"flush_seconds": 61}, {"batch_size": 0},
                                 {"max_pending": 0}, {"batch_size": 600, "max_pending": 500}])
def test_settings_ranges(bad: dict) -> None:
    from pydantic import ValidationError
    with pytest.raises(ValidationError):
        UsageSettings(**bad)
    assert UsageSettings() == UsageSettings(flush_seconds=1.0, batch_size=500, max_pending=100_000)


class Forwarder:
    """A loopback TCP relay to PostgreSQL that can be cut (every connection closed, new ones refused) and
    restored on the same port: the database going away under the ledger, and coming back."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_postgres_going_away_and_coming_back(pg_schema_url: tuple[str, str]) -> None:
    from sqlalchemy.engine import make_url

    url, schema = pg_schema_url
    target = make_url(url)
    relay = Forwarder(target.host or "127.0.0.1", target.port or 5432)
    await relay.start()
    store = await Store.open(target.set(port=relay.port).render_as_string(hide_password=False), schema=schema,
                             row_key=ROW_KEY)
    direct = await Store.open(url, schema=schema, row_key=ROW_KEY, migrate=False)
    ledger = ledger_of(store, flush_seconds=0.05, batch_size=4)
    ledger.start()
    try:
        first = [made_record(started_at=T0 + i) for i in range(5)]
        for r in first:
            ledger.record(r)

        def written(n: int):
            async def check() -> bool:
                return len(await stored_rows(direct)) == n and ledger.pending_count() == 0
            return check
        await until(written(5), "the first records were not written")
        await relay.cut()
        second = [made_record(started_at=T0 + 10 + i) for i in range(10)]
        for r in second:
            ledger.record(r)

        async def failing() -> bool:
            return ledger.write_failures._value.get() >= 1
        await until(failing, "no write failed while the database was unreachable")
        assert ledger.pending_count() == 10
        await relay.start()
        await until(written(15), "the buffered records were not written once the database was back",
                    within=60)
        await ledger.stop()
        assert sorted(r.request_id for r in await stored_rows(direct)) == sorted(
            r.request_id for r in first + second)                             # each once
    finally:
        await ledger.stop()
        await store.close()
        await direct.close()


async def test_the_body_hashes_are_stored_sealed_and_a_moved_one_is_refused(store: Store) -> None:  # noqa: F811
    """The host reads the database: a hash in clear would confirm a guessed prompt. Stored sealed, the value
    says nothing, and a sealed hash moved to another row (or column) does not open there."""
    ledger = ledger_of(store)
    first = made_record(request_sha256="a" * 64, response_sha256="b" * 64)
    second = made_record(request_sha256="c" * 64, response_sha256="d" * 64)
    ledger.record(first)
    ledger.record(second)
    await ledger.flush()
    async with store.engine.connect() as conn:
        stored = {r.request_id: r for r in (await conn.execute(sa.text(
            "SELECT request_id, request_sha256, response_sha256 FROM usage_records"))).all()}
    for row in stored.values():
        assert len(row.request_sha256) == 80 and "a" * 16 not in row.request_sha256
    assert (await ledger.find(first.request_id)).request_sha256 == "a" * 64
    async with store.engine.begin() as conn:   # the first row's sealed request hash put on the second row
        await conn.execute(sa.text("UPDATE usage_records SET request_sha256 = :v WHERE request_id = :id"),
                           {"v": stored[first.request_id].request_sha256, "id": second.request_id})
        await conn.execute(sa.text("UPDATE usage_records SET response_sha256 = :v WHERE request_id = :id"),
                           {"v": stored[first.request_id].request_sha256, "id": first.request_id})
    assert await ledger.find(second.request_id) is None
    assert await ledger.find(first.request_id) is None   # its request hash in its response column
