"""Limit rows in the database (table ``quota_limits``), each under a row MAC (``enclave.row_mac``).

A row whose MAC fails (edited, swapped or inserted by the host) never becomes "unlimited": its subject is
reported as tampered and every request it binds is refused (503 ``limit_integrity_failure``, see
``enclave.quotas.enforcer``) until an administrator sets or clears its limits again. A deleted row cannot be
seen by a per-row MAC: its subject falls back to the platform defaults (docs/limits.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from enclave.quotas.kinds import KINDS, Subject
from enclave.row_mac import RowMac
from enclave.schema import quota_limits

log = logging.getLogger("enclave.quotas")
TABLE = "quota_limits"


@dataclass(frozen=True)
class StoredLimits:
    """A subject's own limits as stored: per kind None (the platform default applies), ``UNLIMITED`` (-1) or
    the limit."""

    subject: Subject
    values: Mapping[str, int | None]
    updated_at: datetime


def _fields(subject: Subject, values: Mapping[str, int | None]) -> tuple[Any, ...]:
    return (subject.level, subject.domain_id, subject.subject_id, *(values.get(kind) for kind in KINDS))


class LimitRows:
    def __init__(self, engine: AsyncEngine, row_key: bytes, *,
                 on_integrity_failure: Callable[[str], None] | None = None) -> None:
        self.engine = engine
        self._mac = RowMac(row_key)
        self.on_integrity_failure = on_integrity_failure

    def _row(self, row: Any) -> StoredLimits | None:
        """The row's limits, or None (logged and counted) when its MAC fails or its values are not ours."""
        subject = Subject(row.subject_kind, row.domain_id, row.subject_id)
        values = {kind: getattr(row, kind) for kind in KINDS}
        if all(v is None or (isinstance(v, int) and v >= -1) for v in values.values()) \
                and self._mac.valid(TABLE, _fields(subject, values), row.mac):
            updated = row.updated_at
            updated = updated.replace(tzinfo=UTC) if updated.tzinfo is None else updated
            return StoredLimits(subject, values, updated)
        log.error("store integrity: refused a %s row whose MAC does not match (subject %s): edited, swapped or "
                  "inserted outside the enclave; its subject is refused until its limits are set again",
                  TABLE, subject.key)
        if self.on_integrity_failure is not None:
            self.on_integrity_failure(TABLE)
        return None

    async def load_all(self) -> tuple[dict[Subject, StoredLimits], set[Subject]]:
        """Every valid row by subject, and the subjects whose rows failed their MAC."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(quota_limits.select())).all()
        valid: dict[Subject, StoredLimits] = {}
        tampered: set[Subject] = set()
        for row in rows:
            limits = self._row(row)
            if limits is None:
                tampered.add(Subject(row.subject_kind, row.domain_id, row.subject_id))
            else:
                valid[limits.subject] = limits
        return valid, tampered

    async def put(self, subject: Subject, values: Mapping[str, int | None], now: datetime) -> StoredLimits:
        """Replace the subject's row (insert or update), MAC'd; read back, so a write the database swallowed
        is an error, not a success."""
        clean = {kind: values.get(kind) for kind in KINDS}
        mac = self._mac.mac(TABLE, _fields(subject, clean))
        where = ((quota_limits.c.subject_kind == subject.level) & (quota_limits.c.domain_id == subject.domain_id)
                 & (quota_limits.c.subject_id == subject.subject_id))
        async with self.engine.begin() as conn:
            updated = await conn.execute(quota_limits.update().where(where).values(**clean, updated_at=now, mac=mac))
            if updated.rowcount == 0:
                await conn.execute(quota_limits.insert().values(subject_kind=subject.level,
                                                                domain_id=subject.domain_id,
                                                                subject_id=subject.subject_id, **clean,
                                                                updated_at=now, mac=mac))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(quota_limits.select().where(where))).all()
        got = self._row(rows[0]) if rows else None
        if got is None or dict(got.values) != clean:
            raise RuntimeError(f"limits of {subject.key}: the database did not keep the update")
        return got

    async def delete(self, subject: Subject) -> bool:
        where = ((quota_limits.c.subject_kind == subject.level) & (quota_limits.c.domain_id == subject.domain_id)
                 & (quota_limits.c.subject_id == subject.subject_id))
        async with self.engine.begin() as conn:
            deleted = (await conn.execute(quota_limits.delete().where(where))).rowcount > 0
        async with self.engine.connect() as conn:
            if (await conn.execute(sa.select(sa.literal(1)).select_from(quota_limits).where(where))).all():
                raise RuntimeError(f"limits of {subject.key}: the database did not carry out the delete")
        return deleted
