"""One record per inference request (who, which model and backend, outcome, usage, timings) — never content.

The route puts it on ``request.state.inference``; ``Recorder`` turns it into metrics and hands it to the sinks
registered on it (the usage ledger subscribes here).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from enclave.inference.usage import Usage
from enclave.metrics import Metrics

log = logging.getLogger("enclave.inference")


@dataclass
class InferenceRecord:
    domain_id: str
    user_id: str
    pat_id: str
    model: str
    backend: str
    route: str
    stream: bool
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter, repr=False)
    status: int = 200
    outcome: str = "completed"
    usage: Usage | None = None
    ttft_seconds: float | None = None
    duration_seconds: float | None = None
    # For receipts (enclave.receipts): SHA-256 (hex) of the request body as received and of the exact response
    # body bytes sent to the client (streamed or not; what was sent when the client left early).
    request_sha256: str | None = None
    response_sha256: str | None = None


Sink = Callable[[InferenceRecord], None]


class Recorder:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.sinks: list[Sink] = []

    def finish(self, record: InferenceRecord, usage: Usage, *, outcome: str, status: int,
               ttft: float | None) -> None:
        record.usage, record.outcome, record.status = usage, outcome, status
        record.ttft_seconds = ttft
        record.duration_seconds = time.perf_counter() - record.started
        self.metrics.inference_finished(record.domain_id, record.model, record.route, outcome, usage,
                                        ttft, record.duration_seconds)
        for sink in self.sinks:
            try:
                sink(record)
            except Exception:  # a sink must never break the request path
                log.exception("inference record sink failed")
