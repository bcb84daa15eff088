"""The audit trail's retention, its bounded refusal entries, the shutdown checkpoint, and one chain across two
replicas on PostgreSQL (issue 11 item 5)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from enclave.audit.refusals import RefusalCounter
from enclave.audit.chain import rfc3339
from enclave.signer import AttestedSigner
from tests.enclave.audit_support import (admin_calls, database, entries, export, policy_file, seeded, serve, signer,
                                         verify)
from tests.enclave.conftest import EnclaveServer, FakeClock, make_settings, sim_provider


@pytest.fixture
def retaining(tmp_path: Path) -> Iterator[tuple[EnclaveServer, Any, FakeClock, Path]]:
    """A served app keeping entries one day, on a fake clock, after a few admin calls; its policy file."""
    clock = FakeClock()
    settings, world = seeded(tmp_path / "enclave", audit={"retention_days": 1})
    server = serve(settings, clock=clock)
    try:
        admin_calls(server, world)
        yield server, world, clock, policy_file(tmp_path)
    finally:
        server.stop()


def test_retention_prunes_records_it_and_the_pruned_export_verifies(retaining, tmp_path: Path) -> None:
    server, world, clock, policy = retaining
    old = export(server, world, tmp_path / "old.jsonl")
    old_last = len(entries(server))
    clock.advance(days=2)
    admin_calls(server, world, n=1)
    assert server.run_async(server.ctx.audit.maintain()) is not None   # pruned, then the head signed
    left = entries(server)
    prune = next(e for e in left if e["kind"] == "prune")
    assert prune["from"] == 1 and prune["through"] == old_last and left[0]["seq"] == old_last + 1
    assert left[0]["prev"] == prune["anchor"]
    new = export(server, world, tmp_path / "new.jsonl")
    status, report = verify(new, policy)
    assert status == 0 and report["pruned_through"] == old_last, report
    assert verify(new, policy, previous=old)[0] == 0
    with database(server.settings) as db:   # an unrecorded gap after the recorded one is refused
        assert db.execute("SELECT count(*) FROM audit_checkpoints WHERE seq <= ?", (old_last,)).fetchone()[0] == 0
        db.execute("DELETE FROM audit_entries WHERE seq <= ?", (old_last + 1,))
    status, report = verify(export(server, world, tmp_path / "gap.jsonl"), policy)
    assert status == 1 and any("no recorded prune" in p["message"] for p in report["problems"]), report


def test_refusals_make_a_bounded_number_of_entries() -> None:
    counter = RefusalCounter(max_sources=3)
    now = datetime.now(UTC)
    for i in range(10_000):
        counter.count(("unknown", "missing")[i % 2], f"10.0.{i % 250}.{i % 7}", "GET /admin/users", now)
    drained = counter.drain(rfc3339)
    assert len(drained) <= 2 * (3 + 1)          # classes x (max_sources + the shared "*" bucket)
    assert sum(e["count"] for e in drained) == 10_000
    assert {e["source"] for e in drained} >= {"*"}
    assert counter.pending == 0 and counter.drain(rfc3339) == []


def test_refusals_are_written_every_interval(tmp_path: Path) -> None:
    settings, world = seeded(tmp_path / "enclave", audit={"refusal_interval_seconds": 0.2})
    server = serve(settings)
    try:
        with server.client("cube_pat_nope") as client:
            for _ in range(5):
                assert client.get("/admin/users").status_code == 401
        deadline = datetime.now(UTC) + timedelta(seconds=20)
        while not [e for e in entries(server) if e["kind"] == "auth_refused"]:
            assert datetime.now(UTC) < deadline, "no refusal entry was written"
            threading.Event().wait(0.05)
        (entry,) = [e for e in entries(server) if e["kind"] == "auth_refused"]
        assert entry["count"] == 5 and entry["actions"] == {"GET /admin/users": 5} and entry["source"] == "127.0.0.1"
    finally:
        server.stop()


def test_shutdown_writes_a_checkpoint_over_the_head(tmp_path: Path) -> None:
    settings, world = seeded(tmp_path / "enclave")
    server = serve(settings)
    admin_calls(server, world, n=1)
    head = len(entries(server))
    server.stop()
    with database(settings) as db:
        statement = json.loads(db.execute("SELECT statement FROM audit_checkpoints ORDER BY id DESC LIMIT 1"
                                          ).fetchone()[0])
    assert statement["seq"] == head and statement["key_id"] == signer().identity.key_id


def test_two_replicas_on_postgresql_keep_one_chain(tmp_path: Path, pg_schema_url: tuple[str, str]) -> None:
    url, schema = pg_schema_url
    settings, world = seeded(tmp_path / "enclave", database_url=url, database_schema=schema)
    policy = policy_file(tmp_path)
    second = make_settings(tmp_path / "replica-2", database_url=url, database_schema=schema)
    replicas = [EnclaveServer(s, signer=AttestedSigner(sim_provider())).start() for s in (settings, second)]
    try:
        errors: list[BaseException] = []

        def hammer(server: EnclaveServer) -> None:
            try:
                admin_calls(server, world, n=8)
            except BaseException as e:   # noqa: BLE001 - reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=hammer, args=(r,)) for r in replicas for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        for r in replicas:   # each signs the head it sees (the other's entries included)
            assert r.run_async(r.ctx.audit.checkpoints.checkpoint_head(force=True)) is not None
        status, report = verify(export(replicas[0], world, tmp_path / "a.jsonl"), policy)
        assert status == 0, report
        status, report = verify(export(replicas[1], world, tmp_path / "b.jsonl"), policy,
                                previous=tmp_path / "a.jsonl")
        assert status == 0, report
        chain = entries(replicas[1])
        assert [e["seq"] for e in chain] == list(range(1, len(chain) + 1))
        assert len([e for e in chain if e["kind"] == "admin"]) == 4 * 8 * 3 + 2
        assert not [e for e in chain if e["kind"] == "tamper"]
        assert all(r.ctx.audit.metrics.tampering._value.get() == 0 for r in replicas)
        keys = {json.loads(line)["key_id"] for line in (tmp_path / "b.jsonl").read_text().splitlines()
                if json.loads(line)["type"] == "signing_key"}
        assert keys == {r.ctx.signer.get().identity.key_id for r in replicas}
    finally:
        for r in replicas:
            r.stop()


# -- found in review (revaudit): each an attack that worked before its fix -------------------------------------

def test_a_gap_the_host_made_at_the_start_is_not_laundered_by_the_next_prune(retaining, tmp_path: Path) -> None:
    """The host deletes the oldest entries; the next prune used to record ``from`` as the first row left, so
    the pruned export verified as if nothing had been taken."""
    server, world, clock, policy = retaining
    clock.advance(days=2)
    admin_calls(server, world, n=1)
    with database(server.settings) as db:
        db.execute("DELETE FROM audit_entries WHERE seq <= 2")
    server.run_async(server.ctx.audit.maintain())
    left = entries(server)
    assert any(e["kind"] == "prune" and e["from"] == 3 for e in left)
    status, report = verify(export(server, world, tmp_path / "laundered.jsonl"), policy)
    assert status == 1 and any("before seq 3 were deleted without a recorded prune" in p["message"]
                               for p in report["problems"]), report
    # a second, genuine prune follows the first one's record: no tampering reported
    before = entries(server)[-1]["seq"]
    clock.advance(days=2)
    admin_calls(server, world, n=1)
    server.run_async(server.ctx.audit.maintain())
    assert not [e for e in entries(server) if e["kind"] == "tamper" and e["seq"] > before]
    assert [e["from"] for e in entries(server) if e["kind"] == "prune"][-1] == next(
        e["through"] for e in left if e["kind"] == "prune") + 1


def test_an_export_raced_by_a_prune_is_not_reported_as_tampering(retaining, tmp_path: Path, monkeypatch) -> None:
    """The export's check for a read cut short (test_audit_tamper) must not take a prune by another replica,
    made while an export with ``until`` read old entries, for the host's doing."""
    server, world, clock, policy = retaining
    trail = server.ctx.audit
    clock.advance(days=2)
    admin_calls(server, world, n=1)
    read = trail.chain.entries

    async def pruned_meanwhile(since=None, until=None, batch=500):
        async for stored in read(since, 2, batch):
            yield stored
        assert await trail.prune() is not None
        async for stored in read(3, until, batch):
            yield stored

    monkeypatch.setattr(trail.chain, "entries", pruned_meanwhile)
    status, report = verify(export(server, world, tmp_path / "raced.jsonl", until=5), policy)
    monkeypatch.undo()
    assert status == 1 and report["last_seq"] == 2, report   # not signed: the read ended short
    assert not [e for e in entries(server) if e["kind"] == "tamper"]
    assert trail.metrics.tampering._value.get() == 0


def test_two_replicas_append_checkpoint_and_export_concurrently(tmp_path: Path, pg_schema_url: tuple[str, str]
                                                                 ) -> None:
    """Appends, periodic checkpoints and exports at once on both replicas: one chain, no false tampering."""
    url, schema = pg_schema_url
    settings, world = seeded(tmp_path / "enclave", database_url=url, database_schema=schema)
    second = make_settings(tmp_path / "replica-2", database_url=url, database_schema=schema)
    replicas = [EnclaveServer(s, signer=AttestedSigner(sim_provider())).start() for s in (settings, second)]
    try:
        errors: list[BaseException] = []

        def run(work) -> None:
            try:
                work()
            except BaseException as e:   # noqa: BLE001 - reported by the main thread
                errors.append(e)

        def checkpoints(server: EnclaveServer) -> None:
            for _ in range(10):
                server.run_async(server.ctx.audit.maintain())

        def exports(server: EnclaveServer, name: str) -> None:
            for i in range(3):
                export(server, world, tmp_path / f"{name}-{i}.jsonl")

        work = [lambda r=r: admin_calls(r, world, n=5) for r in replicas]
        work += [lambda r=r: checkpoints(r) for r in replicas]
        work += [lambda r=r, i=i: exports(r, f"replica{i}") for i, r in enumerate(replicas)]
        threads = [threading.Thread(target=run, args=(w,)) for w in work]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        policy = policy_file(tmp_path)
        for path in sorted(tmp_path.glob("replica*.jsonl")):
            status, report = verify(path, policy)
            assert status == 0, (path.name, report)
        status, report = verify(export(replicas[1], world, tmp_path / "last.jsonl"), policy,
                                previous=tmp_path / "replica0-2.jsonl")
        assert status == 0, report
        assert not [e for e in entries(replicas[0]) if e["kind"] == "tamper"]
    finally:
        for r in replicas:
            r.stop()
