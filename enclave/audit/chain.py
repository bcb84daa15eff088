"""The audit chain in the database: serialized appends, the head this process wrote, tamper checks.

Appends take the head row with ``SELECT ... FOR UPDATE`` in the transaction that inserts the entries, so several
replicas on one PostgreSQL append to one chain in one order (SQLite: one process, serialized by a lock here).
Each entry row carries a MAC (``enclave.row_mac``, over its seq and hash) under the key every replica shares:
the hash chain alone anyone can recompute, the MAC only an enclave can.

Before each append (and before a checkpoint is signed) the head is checked: the last entry's MAC and hash, the
head row against it, and against the head this process last wrote, which it keeps in memory. A database head
behind or different from that one means entries were deleted or replaced (truncation, rollback). Every problem
found is appended as a ``tamper`` entry (so ``verify-audit`` refuses the chain), logged at ERROR and counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from attestation.audit import GENESIS, entry_hash
from attestation.signing import canonical_json
from enclave.row_mac import RowMac
from enclave.schema import audit_entries, audit_head

log = logging.getLogger("enclave.audit")
MAC_TABLE = "audit_entries"
ENTRY_VERSION = 1


class AuditError(Exception):
    """The audit trail could not be written or read."""


def rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class StoredEntry:
    seq: int
    hash: str
    entry: dict[str, Any]
    genuine: bool        # MAC valid and the content hashes to ``hash``: an enclave wrote exactly this


class Transaction:
    """Appends within one locked transaction (``AuditChain.locked``)."""

    def __init__(self, chain: "AuditChain", conn: AsyncConnection, seq: int, hash: str) -> None:
        self.chain = chain
        self.conn = conn
        self.seq = seq
        self.hash = hash

    async def append(self, kind: str, fields: dict[str, Any]) -> tuple[int, str]:
        seq = self.seq + 1
        now = self.chain.clock()
        entry = {**fields, "v": ENTRY_VERSION, "seq": seq, "prev": self.hash, "time": rfc3339(now), "kind": kind}
        digest = entry_hash(entry)
        await self.conn.execute(audit_entries.insert().values(
            seq=seq, time=now, kind=kind, entry=canonical_json(entry).decode("utf-8"), hash=digest,
            mac=self.chain.mac.mac(MAC_TABLE, (seq, digest))))
        self.seq, self.hash = seq, digest
        self.chain.appended(kind)
        return seq, digest


class AuditChain:
    def __init__(self, engine: AsyncEngine, mac: RowMac, *, clock: Callable[[], datetime],
                 on_tamper: Callable[[str], None] = lambda detail: None,
                 on_append: Callable[[str], None] = lambda kind: None) -> None:
        self.engine = engine
        self.mac = mac
        self.clock = clock
        self._on_tamper = on_tamper
        self._on_append = on_append
        self._lock = asyncio.Lock()
        self.known: tuple[int, str] | None = None   # (seq, hash) of the last entry this process wrote

    def appended(self, kind: str) -> None:
        self._on_append(kind)

    def stored(self, row: Any) -> StoredEntry:
        try:
            entry = json.loads(row.entry)
            canonical_json(entry)   # NaN, a lone surrogate: no byte form to hash (unreadable, as not JSON)
        except (ValueError, TypeError, RecursionError):
            entry = {}
        genuine = (isinstance(entry, dict) and entry.get("seq") == row.seq and entry_hash(entry) == row.hash
                   and self.mac.valid(MAC_TABLE, (row.seq, row.hash), row.mac))
        return StoredEntry(seq=row.seq, hash=row.hash, entry=entry if isinstance(entry, dict) else {},
                           genuine=genuine)

    async def _problems(self, conn: AsyncConnection, head: Any) -> tuple[list[str], int, str]:
        """What is wrong at the head, and the (seq, hash) the next entry continues from."""
        problems: list[str] = []
        row = (await conn.execute(audit_entries.select().order_by(audit_entries.c.seq.desc()).limit(1))).first()
        if row is None:
            seq, digest = head.seq, head.hash
            if head.seq != 0:
                problems.append(f"no entry in the database, yet its head row is at seq {head.seq}: every entry "
                                "was deleted")
        else:
            last = self.stored(row)
            seq, digest = last.seq, last.hash
            if not last.genuine:
                problems.append(f"the last entry (seq {last.seq}) was not written by an enclave (its MAC or hash "
                                "fails): inserted or edited")
            if (head.seq, head.hash) != (last.seq, last.hash):
                problems.append(f"the head row (seq {head.seq}) does not match the last entry (seq {last.seq})")
        if self.known is not None:
            known_seq, known_hash = self.known
            if seq < known_seq:
                problems.append(f"the database's last entry is seq {seq}, behind seq {known_seq} which this enclave "
                                "wrote: entries were deleted or the database was rolled back")
            elif seq == known_seq and digest != known_hash:
                problems.append(f"entry {seq} differs from the one this enclave wrote: replaced")
            elif seq > known_seq:
                mine = (await conn.execute(audit_entries.select().where(audit_entries.c.seq == known_seq))).first()
                if mine is not None and mine.hash != known_hash:
                    problems.append(f"entry {known_seq} differs from the one this enclave wrote: replaced")
        return problems, seq, digest

    @asynccontextmanager
    async def locked(self) -> AsyncIterator[Transaction]:
        """One transaction holding the chain's head; problems at the head are recorded first, as entries."""
        found: list[str] = []
        async with self._lock:
            async with self.engine.begin() as conn:
                head = (await conn.execute(sa.select(audit_head.c.seq, audit_head.c.hash)
                                           .where(audit_head.c.id == 1).with_for_update())).first()
                if head is None:   # the host deleted the head row: recreate it, and say so
                    await conn.execute(audit_head.insert().values(id=1, seq=0, hash=GENESIS))
                    head = (await conn.execute(sa.select(audit_head.c.seq, audit_head.c.hash)
                                               .where(audit_head.c.id == 1).with_for_update())).one()
                    found.append("the head row was missing")
                problems, seq, digest = await self._problems(conn, head)
                found += problems
                tx = Transaction(self, conn, seq, digest)
                for detail in found:
                    await tx.append("tamper", {"detail": detail})
                yield tx
                await conn.execute(audit_head.update().where(audit_head.c.id == 1).values(seq=tx.seq, hash=tx.hash))
            self.known = (tx.seq, tx.hash)
        for detail in found:
            log.error("audit trail tampering detected: %s", detail)
            self._on_tamper(detail)

    async def append(self, kind: str, fields: dict[str, Any]) -> tuple[int, str]:
        async with self.locked() as tx:
            return await tx.append(kind, fields)

    async def append_many(self, items: Sequence[tuple[str, dict[str, Any]]]) -> None:
        if not items:
            return
        async with self.locked() as tx:
            for kind, fields in items:
                await tx.append(kind, fields)

    async def report_tamper(self, detail: str) -> None:
        """Record a problem found outside an append (e.g. an entry an export was to end on is not genuine)."""
        await self.append("tamper", {"detail": detail})
        log.error("audit trail tampering detected: %s", detail)
        self._on_tamper(detail)

    async def verified_head(self) -> tuple[int, str]:
        """The head after the checks (tampering found is recorded first): what a checkpoint may sign."""
        async with self.locked() as tx:
            return tx.seq, tx.hash

    async def entry(self, seq: int) -> StoredEntry | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(audit_entries.select().where(audit_entries.c.seq == seq))).first()
        return self.stored(row) if row is not None else None

    async def entries(self, since: int | None = None, until: int | None = None,
                      batch: int = 500) -> AsyncIterator[StoredEntry]:
        """Stored entries in seq order, read in batches (as stored: the verifier judges them)."""
        after = (since or 1) - 1
        while True:
            query = audit_entries.select().where(audit_entries.c.seq > after)
            if until is not None:
                query = query.where(audit_entries.c.seq <= until)
            async with self.engine.connect() as conn:
                rows = (await conn.execute(query.order_by(audit_entries.c.seq).limit(batch))).all()
            for row in rows:
                yield self.stored(row)
            if len(rows) < batch:
                return
            after = rows[-1].seq
