"""Property: over any mix of whole, streamed, aborted (the client leaves mid-stream), failed (the backend dies
mid-stream, or refuses) and usage-less requests, the ledger holds one row per request with exactly the usage
served (the request's InferenceRecord), none lost, none doubled; its totals are the sum of what was served."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclave.inference.usage import Usage
from enclave.usage import UsageFilter

from tests.enclave.inference_support import QuirkyVllm, Service, reset, start_service
from tests.fakes.ollama import FakeOllama
from tests.fakes.vllm import BASE_MODEL

OLLAMA_MODEL = "llama3.2:3b"
KINDS = ("whole", "stream", "abort", "fail", "refused", "no_usage")


@dataclass(frozen=True)
class Op:
    kind: str
    backend: str        # "vllm" | "ollama"
    native: bool        # Ollama's /api/chat rather than the OpenAI route (ollama only)
    tokens: int
    cut_after: int      # fail: events before the backend dies; abort: events read before leaving


ops = st.builds(Op, kind=st.sampled_from(KINDS), backend=st.sampled_from(("vllm", "ollama")), native=st.booleans(),
                tokens=st.integers(1, 12), cut_after=st.integers(1, 3))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def svc(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    database: dict[str, str] = {}
    if request.param == "postgres":   # a schema of its own (the test PostgreSQL is thrown away after the run)
        database = {"database_url": request.getfixturevalue("postgres_url"),
                    "database_schema": f"t_{uuid.uuid4().hex[:12]}"}
    with QuirkyVllm() as vllm, FakeOllama() as ollama:
        with start_service(tmp_path_factory.mktemp("usage-property"), [
            ({"name": "vllm", "kind": "vllm"}, vllm), ({"name": "ollama", "kind": "ollama"}, ollama),
        ], usage={"flush_seconds": 0.2, "batch_size": 3}, **database) as service:
            assert service.server.ctx.store.engine.dialect.name == {"sqlite": "sqlite",
                                                                    "postgres": "postgresql"}[request.param]
            yield service


def _request(svc: Service, op: Op) -> str:
    """Run one request as ``op`` says; the request id the answer carried."""
    fake = svc.fakes[op.backend]
    reset(fake)
    fake.token_count = op.tokens
    if isinstance(fake, QuirkyVllm):
        fake.report_usage = op.kind != "no_usage"
    native = op.native and op.backend == "ollama"
    stream = op.kind in ("stream", "abort", "fail") or (op.kind == "no_usage" and op.cut_after > 1)
    if op.kind == "fail":
        fake.fail_after = min(op.cut_after, op.tokens)
    elif op.kind == "refused":
        fake.upstream_status = (500, "the backend is broken")
    elif op.kind == "abort":
        fake.event_interval, fake.token_count = 0.05, 40
    model = OLLAMA_MODEL if op.backend == "ollama" else BASE_MODEL
    doc: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "x" * op.tokens}],
                           "stream": stream}
    if stream and not native:
        doc["stream_options"] = {"include_usage": True}
    url = (f"{svc.server.url}/proxy/{svc.world.domains['A']}/api/chat" if native else svc.url("A", "chat/completions"))
    with svc.http() as c:
        if op.kind == "abort":
            with c.stream("POST", url, json=doc) as r:
                lines = r.iter_lines()
                for _ in range(op.cut_after):
                    next(lines)
                return r.headers["x-request-id"]   # leaving the block closes the connection mid-stream
        r = c.post(url, json=doc)
        assert r.status_code == (502 if op.kind == "refused" else 200), r.text
        return r.headers["x-request-id"]


def _usage(svc: Service, request_id: str) -> Usage:
    class Answer:
        headers = {"x-request-id": request_id}
    record = svc.record(Answer(), within=10)   # type: ignore[arg-type]
    assert record.usage is not None
    return record.usage


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mix=st.lists(ops, min_size=1, max_size=6))
def test_ledger_totals_equal_what_was_served(svc: Service, mix: list[Op]) -> None:
    served = {(rid := _request(svc, op)): _usage(svc, rid) for op in mix}
    ledger = svc.server.ctx.ledger
    svc.server.run_async(ledger.flush())
    for request_id, usage in served.items():
        entry = svc.server.run_async(ledger.find(request_id))
        assert entry is not None, f"request {request_id} has no usage row"
        assert Usage(entry.prompt_tokens, entry.completion_tokens, entry.total_tokens, entry.estimated) == usage

    async def every_row() -> list[Any]:
        return [e async for e in ledger.scan(UsageFilter())]
    rows = svc.server.run_async(every_row())
    with svc._lock:
        records = list(svc.records)
    assert None not in rows
    assert sorted(e.request_id for e in rows) == sorted(r.request_id for r in records)   # one row per request
    assert sum(e.total_tokens for e in rows) == sum(r.usage.total_tokens for r in records if r.usage)
    with svc.http("superadmin") as c:
        totals = c.get("/admin/usage").json()["totals"]
    assert totals["requests"] == len(records)
    assert totals["prompt_tokens"] == sum(r.usage.prompt_tokens for r in records if r.usage)
    assert totals["completion_tokens"] == sum(r.usage.completion_tokens for r in records if r.usage)
    assert totals["estimated_requests"] == sum(1 for r in records if r.usage and r.usage.estimated)
