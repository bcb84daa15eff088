"""The export an auditor verifies offline (``cube-attest verify-audit``): JSON lines (attestation.audit).

Order: the header; the entries ``since``..``until`` (default: all, up to the head) as stored; the signing keys
and the checkpoints within that range; last, a checkpoint signed now over the export's last entry. Refusals
counted so far are written first, so the export holds them too. Entries are read in batches, never all at once.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from attestation.audit import EXPORT_FORMAT, GENESIS
from attestation.signing import canonical_json
from enclave.audit.chain import StoredEntry
from enclave.audit.checkpoints import Checkpoint
from enclave.audit.retention import pruned_through
from enclave.audit.trail import AuditTrail
from enclave.schema import audit_checkpoints, audit_signing_keys

log = logging.getLogger("enclave.audit")


def _line(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _checkpoint_line(cp: Checkpoint) -> bytes:
    return _line({"type": "checkpoint", "statement": cp.statement, "signature": _b64(cp.signature)})


def _hex64(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _entry_line(stored: StoredEntry) -> bytes:
    """An entry as stored; one the host made unreadable (not JSON, fields missing) is exported as a stand-in
    that cannot match its hash, so that verify-audit reports it at its seq instead of refusing the file."""
    entry, digest = stored.entry, stored.hash
    if not (isinstance(entry.get("seq"), int) and _hex64(entry.get("prev")) and isinstance(entry.get("kind"), str)
            and isinstance(entry.get("time"), str) and _hex64(digest)):
        entry = {"v": 1, "seq": stored.seq, "prev": GENESIS, "time": "", "kind": "unreadable"}
        digest = GENESIS
    return _line({"type": "entry", "hash": digest, "entry": entry})


def _stored_checkpoint_line(row: Any) -> bytes:
    """A stored checkpoint; an unreadable one becomes a statement whose signature cannot verify (reported)."""
    try:
        statement = json.loads(row.statement)
        canonical_json(statement)   # NaN, a lone surrogate: verify-audit would refuse the whole file
    except (ValueError, TypeError, RecursionError):
        statement = None
    if not (isinstance(statement, dict) and isinstance(statement.get("seq"), int) and _hex64(statement.get("hash"))
            and _hex64(statement.get("key_id"))):
        statement = {"v": 1, "seq": int(row.seq), "hash": GENESIS,
                     "key_id": row.key_id if _hex64(row.key_id) else GENESIS, "unreadable": True}
    return _line({"type": "checkpoint", "statement": statement, "signature": _b64(row.signature)})


async def export_lines(trail: AuditTrail, *, since: int | None = None, until: int | None = None
                       ) -> AsyncIterator[bytes]:
    await trail.flush_refusals()
    head, _ = await trail.chain.verified_head()
    last = min(until, head) if until is not None else head
    yield _line({"type": "export", "format": EXPORT_FORMAT, "since": since, "until": until})
    exported_last: int | None = None
    async for stored in trail.chain.entries(since=since, until=last):
        exported_last = stored.seq
        yield _entry_line(stored)
    if exported_last is not None and exported_last < last:
        async with trail.chain.engine.connect() as conn:
            raced = (await pruned_through(trail.chain, conn) or 0) > exported_last
        if raced:   # another replica's prune removed them meanwhile (an export with until, into old entries)
            log.warning("audit: entries %d..%d were pruned while the export read them", exported_last + 1, last)
        else:
            # The database answered the read short of the head it had just shown (the host's server can answer
            # each query as it likes): signing the end read would vouch for a truncated export. Say so in the
            # database, and end the export on a stand-in that verify-audit refuses at the first seq held back.
            detail = (f"the export read entries only up to seq {exported_last}, but the head is at seq {last}: "
                      "the database held entries back")
            await trail.chain.report_tamper(detail)
            yield _line({"type": "entry", "hash": GENESIS, "entry": {
                "v": 1, "seq": exported_last + 1, "prev": GENESIS, "time": "", "kind": "tamper", "detail": detail}})
        exported_last = None   # nothing is signed over a short read
    low = since or 0
    engine = trail.chain.engine
    async with engine.connect() as conn:
        checkpoints = (await conn.execute(
            audit_checkpoints.select().where(audit_checkpoints.c.seq >= low, audit_checkpoints.c.seq <= last)
            .order_by(audit_checkpoints.c.seq, audit_checkpoints.c.id))).all()
    fresh = None
    if exported_last is not None:
        try:
            fresh = await trail.checkpoints.checkpoint_at(exported_last)
        except Exception as e:   # e.g. no signer: the export ends uncovered, which verify-audit reports
            log.error("audit: the export's checkpoint could not be signed: %s: %s", type(e).__name__, e)
    key_ids = sorted({row.key_id for row in checkpoints} | ({fresh.statement["key_id"]} if fresh else set()))
    if key_ids:
        async with engine.connect() as conn:
            keys = (await conn.execute(audit_signing_keys.select()
                                       .where(audit_signing_keys.c.key_id.in_(key_ids)))).all()
        for key in keys:
            yield _line({"type": "signing_key", "key_id": key.key_id, "public_key": _b64(key.public_key),
                         "evidence": _b64(key.evidence)})
    for row in checkpoints:
        yield _stored_checkpoint_line(row)
    if fresh is not None:
        yield _checkpoint_line(fresh)
