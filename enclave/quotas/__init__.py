"""Per-PAT, per-user-in-domain and per-domain limits and budgets, shared across replicas (docs/limits.md).

* ``kinds``: the limit kinds, subjects, fixed UTC windows and OpenAI's duration form;
* ``rows``: the MAC'd limit rows;
* ``counters``: the shared counters and their leases (the overshoot bound is stated there);
* ``enforcer``: admission, refusals, headers and the recorder's sink (``Quotas``).
"""

from __future__ import annotations

from typing import Any

from enclave.config import QuotaSettings
from enclave.quotas.counters import SharedCounters
from enclave.quotas.enforcer import NO_TICKET, Quotas, Ticket
from enclave.quotas.rows import LimitRows


def open_quotas(settings: QuotaSettings, engine: Any, row_key: bytes, clock: Any, *,
                on_integrity_failure: Any = None, on_refusal: Any = None, replica: str | None = None) -> Quotas:
    """The enforcer over the store's engine (``start()`` it in the lifespan, ``stop()`` it at the end).
    ``on_refusal(kind, level)``: told of every refusal (the metric cube_quota_refusals_total)."""
    return Quotas(settings, LimitRows(engine, row_key, on_integrity_failure=on_integrity_failure),
                  SharedCounters(engine, sync_seconds=settings.sync_seconds, replica=replica), clock,
                  on_refusal=on_refusal)


__all__ = ["NO_TICKET", "Quotas", "Ticket", "open_quotas"]
