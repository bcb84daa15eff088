"""The audit trail of one app: the chain, the refusal counter, checkpoints and retention, on one schedule.

``start`` runs a loop that every ``refusal_interval_seconds`` writes the counted authentication refusals and,
every ``checkpoint_seconds``, prunes (when a retention is set) and checkpoints the head if it moved. ``stop``
(the app's shutdown) writes the refusals left and a last checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from enclave.audit.chain import AuditChain, rfc3339
from enclave.audit.checkpoints import Checkpoint, Checkpointer
from enclave.audit.refusals import RefusalCounter
from enclave.audit.retention import Pruned, prune_before
from enclave.config import AuditSettings
from enclave.row_mac import RowMac
from enclave.signer import SignerSource

log = logging.getLogger("enclave.audit")


class AuditMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.entries = Counter("cube_audit_entries_total", "Audit entries this process appended, by kind", ["kind"],
                               registry=registry)
        self.tampering = Counter("cube_audit_tampering_detected_total", "Problems found at the audit chain's head "
                                 "(entries deleted, replaced or inserted outside an enclave)", registry=registry)
        self.write_failures = Counter("cube_audit_write_failures_total", "Audit entries that could not be written",
                                      registry=registry)


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class AuditTrail:
    def __init__(self, engine: Any, row_mac_key: bytes, signer: SignerSource, settings: AuditSettings, *,
                 clock: Callable[[], datetime], registry: CollectorRegistry) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = AuditMetrics(registry)
        self.chain = AuditChain(engine, RowMac(row_mac_key), clock=clock,
                                on_tamper=lambda detail: self.metrics.tampering.inc(),
                                on_append=lambda kind: self.metrics.entries.labels(kind=kind).inc())
        self.checkpoints = Checkpointer(self.chain, signer)
        self.refusals = RefusalCounter(max_sources=settings.refusal_max_sources)
        self._task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()

    # -- recording ------------------------------------------------------------------------------------------
    async def record_admin(self, fields: dict[str, Any]) -> None:
        try:
            await self.chain.append("admin", fields)
        except Exception:
            self.metrics.write_failures.inc()
            raise

    def count_refusal(self, refusal_class: str, source: str, action: str) -> None:
        self.refusals.count(refusal_class, source, action, self.clock())

    async def flush_refusals(self) -> None:
        async with self._flush_lock:
            drained = self.refusals.drain(rfc3339)
            try:
                await self.chain.append_many([("auth_refused", fields) for fields in drained])
            except Exception as e:
                self.metrics.write_failures.inc()
                log.error("audit: could not write %d refusal entries (kept for the next try): %s", len(drained),
                          type(e).__name__)
                self.refusals.restore(drained, _parse)

    # -- maintenance ----------------------------------------------------------------------------------------
    async def prune(self) -> Pruned | None:
        if self.settings.retention_days is None:
            return None
        return await prune_before(self.chain, self.clock() - timedelta(days=self.settings.retention_days))

    async def maintain(self) -> Checkpoint | None:
        """What the loop does every checkpoint interval: refusals written, old entries pruned, head signed."""
        await self.flush_refusals()
        await self.prune()
        return await self.checkpoints.checkpoint_head()

    async def _loop(self) -> None:
        tick = min(self.settings.refusal_interval_seconds, self.settings.checkpoint_seconds)
        since_checkpoint = 0.0
        while True:
            await asyncio.sleep(tick)
            since_checkpoint += tick
            try:
                if since_checkpoint >= self.settings.checkpoint_seconds:
                    since_checkpoint = 0.0
                    await self.maintain()
                else:
                    await self.flush_refusals()
            except Exception as e:   # keep the loop alive; the next round retries
                log.error("audit: maintenance failed: %s: %s", type(e).__name__, e)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="audit-trail")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        try:
            await self.flush_refusals()
            await self.checkpoints.checkpoint_head()
        except Exception as e:
            log.error("audit: the shutdown checkpoint failed: %s: %s", type(e).__name__, e)
