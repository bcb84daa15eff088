"""Direct database edits of every kind are found by ``cube-attest verify-audit`` (or by the enclave's head in
memory while it runs), and an intact export verifies (issue 11 item 5). The host here edits the SQLite file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from attestation.audit import entry_hash
from attestation.signing import canonical_json
from enclave.signer import AttestedSigner
from tests.enclave.audit_support import (admin_calls, database, entries, export, foreign_policy_file, policy_file,
                                         rewrite, rows, seeded, serve, set_head, verify)
from tests.enclave.conftest import EnclaveServer, World, sim_provider


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[EnclaveServer, World, Path]]:
    settings, world = seeded(tmp_path / "enclave")
    server = serve(settings)
    try:
        admin_calls(server, world)
        export(server, world, tmp_path / "first.jsonl")   # leaves a stored checkpoint
        admin_calls(server, world)
        yield server, world, tmp_path
    finally:
        server.stop()


def _refused(status: int, report: dict, *, at: int | None = None, says: str = "") -> None:
    assert status == 1 and not report["ok"], report
    if at is not None:
        assert at in [p["seq"] for p in report["problems"]], report["problems"]
    if says:
        assert any(says in p["message"] for p in report["problems"]), report["problems"]


def _export_refused(running, *, at: int | None = None, says: str = "") -> dict:
    """Export after the host's edit; verify-audit must refuse it (``at``: a problem at that seq)."""
    server, world, tmp = running
    status, report = verify(export(server, world, tmp / "edited.jsonl"), policy_file(tmp))
    _refused(status, report, at=at, says=says)
    return report


def _host_runs(running, *statements: tuple) -> None:
    """The host's SQL on the enclave's database (each statement: SQL text, then its parameters)."""
    with database(running[0].settings) as db:
        for sql, *params in statements:
            db.execute(sql, params)


def test_an_intact_export_verifies_and_extends_the_previous_one(running) -> None:
    server, world, tmp = running
    policy = policy_file(tmp)
    status, report = verify(tmp / "first.jsonl", policy)
    assert status == 0 and report["ok"] and report["first_seq"] == 1 and report["problems"] == [], report
    second = export(server, world, tmp / "second.jsonl")
    status, report = verify(second, policy, previous=tmp / "first.jsonl")
    assert status == 0, report
    assert report["covered_seq"] == report["last_seq"] == len(entries(server))
    kinds = {json.loads(line)["type"] for line in second.read_text().splitlines()}
    assert kinds == {"export", "entry", "signing_key", "checkpoint"}
    last_entry = [json.loads(line) for line in second.read_text().splitlines()
                  if json.loads(line)["type"] == "entry"][-1]["entry"]
    assert last_entry["action"] == "GET /admin/audit/export" and last_entry["outcome"] == 200


def test_an_edited_field_is_found(running) -> None:
    server, world, tmp = running
    with database(server.settings) as db:
        rewrite(db, 3, {"outcome": 204}, rehash=False)
    _export_refused(running, at=3, says="edited")


def test_an_edited_field_with_its_hash_recomputed_is_found(running) -> None:
    server, world, tmp = running
    with database(server.settings) as db:
        rewrite(db, 3, {"actor": {"user_id": world.users["member_a"], "pat_id": world.pat_ids["member_a"]}},
                rehash=True)
    _export_refused(running, at=4, says="link")


def test_a_whole_rewritten_tail_is_found(running) -> None:
    """A forger who re-hashes every entry after its edit keeps the chain linked; it cannot MAC the head, nor
    match the checkpoints signed before."""
    server, world, tmp = running
    with database(server.settings) as db:
        rewrite(db, 2, {"outcome": 500}, rehash=True)
        chain = rows(db)
        prev = next(h for s, _, h in chain if s == 2)
        for seq, text, _ in chain:
            if seq > 2:
                entry = json.loads(text)
                entry["prev"] = prev
                prev = entry_hash(entry)
                db.execute("UPDATE audit_entries SET entry = ?, hash = ? WHERE seq = ?",
                           (canonical_json(entry).decode(), prev, seq))
        set_head(db)
    report = _export_refused(running, says="recorded tampering")
    assert any("checkpoint names another hash" in p["message"] for p in report["problems"])
    assert server.ctx.audit.metrics.tampering._value.get() >= 1


def test_a_deleted_row_is_found(running) -> None:
    _host_runs(running, ("DELETE FROM audit_entries WHERE seq = 4",))
    _export_refused(running, at=5, says="missing")


def test_two_rows_with_swapped_seq_are_found(running) -> None:
    _host_runs(running, ("UPDATE audit_entries SET seq = -1 WHERE seq = 3",),
               ("UPDATE audit_entries SET seq = 3 WHERE seq = 4",), ("UPDATE audit_entries SET seq = 4 WHERE seq = -1",))
    _export_refused(running, says="out of order")


def test_a_forged_row_inserted_at_the_end_is_found(running) -> None:
    server, world, tmp = running
    with database(server.settings) as db:
        seq, text, digest = rows(db)[-1]
        forged = {**json.loads(text), "seq": seq + 1, "prev": digest, "action": "DELETE /admin/users/{user_id}"}
        db.execute("INSERT INTO audit_entries (seq, time, kind, entry, hash, mac) VALUES (?, ?, ?, ?, ?, ?)",
                   (seq + 1, "2026-12-01 00:00:00", "admin", canonical_json(forged).decode(), entry_hash(forged),
                    "0" * 64))
        set_head(db)
    report = _export_refused(running, says="not written by an enclave")


def test_an_edited_checkpoint_is_found(running) -> None:
    server, world, tmp = running
    with database(server.settings) as db:
        cp_id, text = db.execute("SELECT id, statement FROM audit_checkpoints ORDER BY id LIMIT 1").fetchone()
        statement = json.loads(text)
        statement["seq"] += 1   # vouch for one entry more
        db.execute("UPDATE audit_checkpoints SET statement = ? WHERE id = ?", (canonical_json(statement).decode(),
                                                                                cp_id))
    _export_refused(running, says="checkpoint does not verify")


def test_a_checkpoint_key_with_replaced_evidence_is_found(running) -> None:
    """Evidence of another key (valid evidence, same platform) does not bind the checkpoints' key."""
    other = AttestedSigner(sim_provider())
    _host_runs(running, ("UPDATE audit_signing_keys SET evidence = ?", other.identity.evidence_cbor))
    _export_refused(running, says="evidence")


def test_a_key_whose_evidence_fails_the_policy_fails(running) -> None:
    _, _, tmp = running
    _refused(*verify(tmp / "first.jsonl", foreign_policy_file(tmp)), says="evidence")


def test_truncation_is_found_by_the_head_in_memory(running) -> None:
    server, world, tmp = running
    with database(server.settings) as db:
        last = rows(db)[-1][0]
        db.execute("DELETE FROM audit_entries WHERE seq > ?", (last - 3,))
        set_head(db)
    report = _export_refused(running, says="behind")
    assert server.ctx.audit.metrics.tampering._value.get() >= 1


def test_an_unrecorded_gap_at_the_start_is_found(running) -> None:
    _host_runs(running, ("DELETE FROM audit_entries WHERE seq <= 2",))
    _export_refused(running, at=3, says="no recorded prune")


def test_truncation_across_a_restart_is_found_with_the_previous_export(tmp_path: Path) -> None:
    settings, world = seeded(tmp_path / "enclave")
    policy = policy_file(tmp_path)
    server = serve(settings)
    try:
        admin_calls(server, world)
        old = export(server, world, tmp_path / "old.jsonl")
        admin_calls(server, world)
    finally:
        server.stop()   # a last checkpoint at shutdown
    old_last = max(json.loads(line)["entry"]["seq"] for line in old.read_text().splitlines()
                   if json.loads(line)["type"] == "entry")
    with database(settings) as db:   # the host rolls back to before the auditor's export ended
        keep = old_last - 2
        db.execute("DELETE FROM audit_entries WHERE seq > ?", (keep,))
        db.execute("DELETE FROM audit_checkpoints WHERE seq > ?", (keep,))
        set_head(db)
    server = serve(settings)
    try:
        admin_calls(server, world, n=1)
        new = export(server, world, tmp_path / "new.jsonl")
    finally:
        server.stop()
    status, report = verify(new, policy)
    assert status == 0, report   # alone, a rollback across a restart looks like a consistent chain (docs/audit.md)
    _refused(*verify(new, policy, previous=old), at=keep + 1, says="previous export")


def test_a_malformed_export_is_an_input_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "entry"}\n')
    status, report = verify(bad, policy_file(tmp_path))
    assert status == 2 and report["ok"] is False


def test_unreadable_rows_are_reported_at_their_seq(running) -> None:
    """Garbage in an entry or a checkpoint row is a refused chain at that seq, not an unreadable export."""
    _host_runs(running, ("UPDATE audit_entries SET entry = 'not json' WHERE seq = 2",),
               ("UPDATE audit_entries SET hash = 'xyz' WHERE seq = 5",),
               ("UPDATE audit_checkpoints SET statement = '{}'",))
    report = _export_refused(running, at=2, says="edited")
    assert 5 in [p["seq"] for p in report["problems"]]
    assert any("checkpoint does not verify" in p["message"] for p in report["problems"])


# -- found in review (revaudit): each an attack that worked before its fix -------------------------------------

def test_a_database_holding_entries_back_from_the_export_is_found(running, monkeypatch) -> None:
    """The host's database server answers the export's range read short of the head it has just shown (a
    modified server, or a delete timed between the two queries). The export used to end on a fresh checkpoint
    over the last entry read, so a truncated export verified."""
    server, world, tmp = running
    chain = server.ctx.audit.chain
    read = chain.entries
    head = len(entries(server))

    async def held_back(since=None, until=None, batch=500):
        async for stored in read(since, until, batch):
            if stored.seq <= head - 3:
                yield stored

    monkeypatch.setattr(chain, "entries", held_back)
    report = _export_refused(running, at=head - 2, says="held entries back")
    assert report["covered_seq"] is None or report["covered_seq"] < head - 2
    monkeypatch.undo()
    assert server.ctx.audit.metrics.tampering._value.get() >= 1
    assert any(e["kind"] == "tamper" and "held entries back" in e["detail"] for e in entries(server))


def test_a_line_separator_in_a_path_leaves_the_export_verifiable(running) -> None:
    """A refused admin call whose path holds U+2028 (unescaped in the export's JSON) made every later export
    unreadable to verify-audit (exit 2): any key holder could deny the auditor a verifiable trail."""
    server, world, tmp = running
    with server.client(world.tokens["admin_a"]) as client:
        assert client.get("/admin/users/a%E2%80%A8b%C2%85c").status_code == 403
    status, report = verify(export(server, world, tmp / "separators.jsonl"), policy_file(tmp))
    assert status == 0, report
    assert any(e.get("target") == {"user_id": "a\u2028b\x85c"} for e in entries(server))


def test_rows_without_a_canonical_form_are_reported_at_their_seq(running) -> None:
    """NaN or a lone surrogate in a row's JSON (valid to Python's parser, with no byte form to hash) broke the
    export's stream midway, instead of being reported where it is like any other unreadable row."""
    server, world, tmp = running
    with database(server.settings) as db:
        text = db.execute("SELECT entry FROM audit_entries WHERE seq = 2").fetchone()[0]
        db.execute("UPDATE audit_entries SET entry = ? WHERE seq = 2", (text[:-1] + ',"x":NaN}',))
        db.execute("UPDATE audit_entries SET entry = ? WHERE seq = 3", (text[:-1] + ',"x":"\\ud800"}',))
        statement = db.execute("SELECT statement FROM audit_checkpoints LIMIT 1").fetchone()[0]
        db.execute("UPDATE audit_checkpoints SET statement = ?", (statement[:-1] + ',"x":Infinity}',))
    report = _export_refused(running, at=2, says="edited")
    assert 3 in [p["seq"] for p in report["problems"] if "edited" in p["message"]]
    assert any("checkpoint does not verify" in p["message"] for p in report["problems"])
    with database(server.settings) as db:   # the last entry so edited is found at the next append, too
        db.execute("UPDATE audit_entries SET entry = ? WHERE seq = (SELECT max(seq) FROM audit_entries)",
                   ('{"seq": NaN}',))
    admin_calls(server, world, n=1)
    assert any(e.get("kind") == "tamper" and "not written by an enclave" in e["detail"] for e in entries(server))
