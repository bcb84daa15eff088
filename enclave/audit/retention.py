"""Retention: entries older than ``audit.retention_days`` are deleted, and the deletion is itself an entry.

The ``prune`` entry (appended in the same transaction as the delete) states the pruned range (``from``,
``through``) and ``anchor``, the hash of entry ``through``, which the first remaining entry's ``prev`` must
equal: ``verify-audit`` then accepts a chain starting at ``through + 1`` and refuses any other gap. Checkpoints
wholly before the cut (seq <= through) go with it, and keys no checkpoint names any more.

Which entries are old is read from the entries themselves (their MAC'd content), not from the ``time`` column
alone, which the host could edit to make the enclave delete recent entries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from enclave.audit.chain import AuditChain, rfc3339
from enclave.schema import audit_checkpoints, audit_entries, audit_signing_keys

log = logging.getLogger("enclave.audit")


@dataclass(frozen=True)
class Pruned:
    first: int
    through: int
    anchor: str
    seq: int          # the prune entry's own seq


async def pruned_through(chain: AuditChain, conn: AsyncConnection) -> int | None:
    """``through`` of the latest prune entry (never pruned by itself) if an enclave wrote it; else None."""
    row = (await conn.execute(audit_entries.select().where(audit_entries.c.kind == "prune")
                              .order_by(audit_entries.c.seq.desc()).limit(1))).first()
    if row is None:
        return None
    last = chain.stored(row)
    through = last.entry.get("through")
    return through if last.genuine and last.entry.get("kind") == "prune" and type(through) is int else None


async def _recorded_start(chain: AuditChain, conn: AsyncConnection, first: int) -> bool:
    """Whether the chain's first stored entry follows the latest prune."""
    return await pruned_through(chain, conn) == first - 1


async def prune_before(chain: AuditChain, cutoff: datetime) -> Pruned | None:
    """Delete the entries written before ``cutoff`` (never the head); None when there were none."""
    async with chain.locked() as tx:
        conn = tx.conn
        newest_old = (await conn.execute(
            sa.select(audit_entries).where(audit_entries.c.time < cutoff, audit_entries.c.seq < tx.seq)
            .order_by(audit_entries.c.seq.desc()).limit(1))).first()
        if newest_old is None:
            return None
        stored = chain.stored(newest_old)
        if not stored.genuine or stored.entry.get("time", "") >= rfc3339(cutoff):
            log.error("audit: not pruning: entry %d's time column does not match its genuine content",
                      newest_old.seq)
            await tx.append("tamper", {"detail": f"entry {newest_old.seq}: its time column was changed (prune "
                                                 "refused)"})
            return None
        first = int((await conn.execute(sa.select(sa.func.min(audit_entries.c.seq)))).scalar())
        if first != 1 and not await _recorded_start(chain, conn, first):
            # Without this the prune entry's ``from`` would launder a gap the host made at the start.
            await tx.append("tamper", {"detail": f"the entries before seq {first} were deleted without a recorded "
                                                 "prune"})
        through, anchor = stored.seq, stored.hash
        seq, _ = await tx.append("prune", {"from": first, "through": through, "anchor": anchor,
                                           "before": rfc3339(cutoff)})
        await conn.execute(audit_entries.delete().where(audit_entries.c.seq <= through))
        await conn.execute(audit_checkpoints.delete().where(audit_checkpoints.c.seq <= through))
        await conn.execute(audit_signing_keys.delete().where(
            audit_signing_keys.c.key_id.not_in(sa.select(audit_checkpoints.c.key_id))))
    log.info("audit: pruned entries %d..%d (older than %s)", first, through, rfc3339(cutoff))
    return Pruned(first=first, through=through, anchor=anchor, seq=seq)
