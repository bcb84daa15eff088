"""Shared pieces of the audit tests: a served app with an attested signer, exports, verification, host edits."""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from attestation.audit import entry_hash
from attestation.cli import main as cube_attest
from attestation.policy import sim_policy_yaml
from attestation.providers import SimProvider
from attestation.signing import canonical_json
from enclave.signer import AttestedSigner
from enclave.store import Store
from tests.enclave.conftest import PAT_KEY, ROW_KEY, EnclaveServer, World, make_settings, seed_world, sim_provider

_SIGNERS: list[AttestedSigner] = []
_NAMES = itertools.count()


def signer() -> AttestedSigner:
    """One attested signer on the session's simulated platform (evidence takes a moment)."""
    if not _SIGNERS:
        _SIGNERS.append(AttestedSigner(sim_provider()))
    return _SIGNERS[0]


def policy_file(directory: Path) -> Path:
    path = directory / "sim-policy.yaml"
    path.write_text(sim_policy_yaml(sim_provider().fingerprint))
    return path


def foreign_policy_file(directory: Path) -> Path:
    """A policy for another simulated platform: evidence from ours fails it."""
    other = SimProvider(Path(tempfile.mkdtemp(prefix="cube-audit-other-sim-")))
    path = directory / "other-policy.yaml"
    path.write_text(sim_policy_yaml(other.fingerprint))
    return path


def seeded(directory: Path, **settings: Any) -> tuple[Any, World]:
    s = make_settings(directory, **settings)

    async def run() -> World:
        store = await Store.open(s.effective_database_url(), row_key=ROW_KEY, schema=s.database_schema)
        try:
            from enclave.store import utcnow
            return await seed_world(store, PAT_KEY, utcnow())
        finally:
            await store.close()

    return s, asyncio.run(run())


def serve(settings: Any, **kwargs: Any) -> EnclaveServer:
    return EnclaveServer(settings, signer=signer(), **kwargs).start()


def admin_calls(server: EnclaveServer, world: World, n: int = 3) -> None:
    """A few admin actions of several kinds, allowed and refused."""
    with server.client(world.tokens["superadmin"]) as su, server.client(world.tokens["admin_a"]) as admin:
        for i in range(n):
            for r, expected in ((su.post("/admin/users", json={"name": f"audited-{next(_NAMES)}"}), 201),
                                (admin.get(f"/domains/{world.domains['A']}/members"), 200),
                                (admin.get("/admin/users"), 403)):
                assert r.status_code == expected, (r.request.method, r.request.url.path, r.status_code, r.text)


def entries(server: EnclaveServer) -> list[dict]:
    async def read() -> list[dict]:
        return [e.entry async for e in server.ctx.audit.chain.entries()]
    return server.run_async(read())


def export(server: EnclaveServer, world: World, path: Path, **params: int) -> Path:
    with server.client(world.tokens["superadmin"]) as client:
        r = client.get("/admin/audit/export", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    path.write_bytes(r.content)
    return path


def verify(export_path: Path, policy: Path, previous: Path | None = None) -> tuple[int, dict]:
    """``cube-attest verify-audit --json``: (exit status, its report)."""
    import contextlib
    import io

    out = io.StringIO()
    argv = ["verify-audit", str(export_path), "--policy", str(policy), "--json"]
    if previous is not None:
        argv += ["--previous", str(previous)]
    with contextlib.redirect_stdout(out):
        status = cube_attest(argv)
    return status, json.loads(out.getvalue())


# ---- what a host with the database can do --------------------------------------------------------------------
@contextmanager
def database(settings: Any) -> Iterator[sqlite3.Connection]:
    path = settings.effective_database_url().split(":///", 1)[1]
    with closing(sqlite3.connect(path, timeout=30)) as conn:
        with conn:
            yield conn


def rows(conn: sqlite3.Connection) -> list[tuple[int, str, str]]:
    return conn.execute("SELECT seq, entry, hash FROM audit_entries ORDER BY seq").fetchall()


def rewrite(conn: sqlite3.Connection, seq: int, change: dict, *, rehash: bool) -> None:
    """Edit an entry's content; ``rehash``: also store the hash of the new content (a careful forger)."""
    entry = json.loads(conn.execute("SELECT entry FROM audit_entries WHERE seq = ?", (seq,)).fetchone()[0])
    entry.update(change)
    text = canonical_json(entry).decode()
    if rehash:
        conn.execute("UPDATE audit_entries SET entry = ?, hash = ? WHERE seq = ?", (text, entry_hash(entry), seq))
    else:
        conn.execute("UPDATE audit_entries SET entry = ? WHERE seq = ?", (text, seq))


def set_head(conn: sqlite3.Connection) -> None:
    """Point the head row at the last entry left, as a host covering a truncation would."""
    seq, _, digest = rows(conn)[-1]
    conn.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (seq, digest))
