"""A prompt never leaves a trace: a unique canary sent in every kind of inference request (streamed and not,
succeeding and failing) appears in no log line, no /metrics line and no row of the store."""

from __future__ import annotations

import io
import logging
import sqlite3
import time
import uuid
from pathlib import Path

import pytest

from enclave.logs import configure_logging

from tests.enclave.inference_support import start_service
from tests.fakes.ollama import FakeOllama
from tests.fakes.vllm import BASE_MODEL, FakeVllm


def _dump_sqlite(path: Path) -> str:
    """Every row of every table, as text."""
    with sqlite3.connect(path) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert "pats" in tables, tables
        return "\n".join(repr(row) for table in tables for row in db.execute(f'SELECT * FROM "{table}"'))


def test_a_prompt_canary_appears_in_no_log_metric_or_store_row(tmp_path: Path) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    stream = io.StringIO()
    handler = configure_logging("DEBUG", json_format=True, stream=stream)
    try:
        with FakeVllm() as vllm, FakeOllama() as ollama, start_service(tmp_path, [
                ({"name": "vllm", "kind": "vllm", "first_byte_timeout": 1, "idle_timeout": 1}, vllm),
                ({"name": "ollama", "kind": "ollama"}, ollama)]) as svc:
            vllm.accept_suffix = True
            sent = 0

            def send(route: str, body: dict, expect: int) -> None:
                nonlocal sent
                with svc.http() as c:
                    r = c.post(svc.url("A", route), json=body)
                assert r.status_code == expect, (route, r.text)
                sent += 1

            text = f"My secret is {canary}"
            for model in (BASE_MODEL, "llama3.2:3b"):
                for stream_ in (False, True):
                    send("chat/completions", {"model": model, "stream": stream_, "messages": [
                        {"role": "system", "content": canary}, {"role": "user", "content": text}]}, 200)
                    send("completions", {"model": model, "stream": stream_, "prompt": text,
                                         **({"suffix": canary} if model == BASE_MODEL else {})}, 200)
                send("embeddings", {"model": model, "input": [text, canary]}, 200)
            # failing requests: the backend refuses (quoting the prompt), dies mid-stream, stalls, never answers
            vllm.upstream_status = (400, f"cannot handle prompt {canary}")
            send("chat/completions", {"model": BASE_MODEL, "messages": [{"role": "user", "content": text}]}, 400)
            vllm.upstream_status = (500, f"crashed on {canary}")
            send("completions", {"model": BASE_MODEL, "prompt": text, "stream": True}, 502)
            vllm.upstream_status = None
            vllm.fail_after = 2
            send("chat/completions", {"model": BASE_MODEL, "stream": True,
                                      "messages": [{"role": "user", "content": text}]}, 200)
            vllm.fail_after, vllm.stall_after = None, 2
            send("completions", {"model": BASE_MODEL, "prompt": text, "stream": True}, 200)
            vllm.stall_after, vllm.delay = None, 3600
            send("chat/completions", {"model": BASE_MODEL, "messages": [{"role": "user", "content": text}]}, 504)
            vllm.delay = 0
            # the gateway's own refusals: an unknown model named by the canary, a bad body, a body too large
            send("chat/completions", {"model": canary, "messages": [{"role": "user", "content": text}]}, 404)
            send("chat/completions", {"model": BASE_MODEL, "stream": canary}, 400)
            send("completions", {"model": BASE_MODEL, "prompt": canary * 40_000}, 413)
            assert sum(1 for r in vllm.requests if canary.encode() in r.body) >= 10    # it did travel
            deadline = time.monotonic() + 5
            while len(svc.records) < sent - 3 and time.monotonic() < deadline:      # the last records land
                time.sleep(0.01)
            metrics = svc.metrics_text()
            svc.server.run_async(svc.server.ctx.tracker.flush())
            database = svc.server.settings.data_dir / "enclave.db"
    finally:
        logging.getLogger().removeHandler(handler)
    logs = stream.getvalue()
    assert "enclave ready" in logs and "backend vllm answered HTTP 400" in logs   # the capture works
    assert canary not in logs
    assert "cube_tokens_total" in metrics and canary not in metrics
    rows = _dump_sqlite(database)
    assert rows and canary not in rows


@pytest.mark.parametrize("fragment", ["secret", "canary"])
def test_dump_sees_what_is_stored(tmp_path: Path, fragment: str) -> None:
    """The store dump used above finds a value that is in a row (so an empty result means something)."""
    path = tmp_path / "t.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE pats (v TEXT)")
        db.execute("INSERT INTO pats VALUES (?)", (f"a {fragment} b",))
    assert fragment in _dump_sqlite(path)
