"""What the ledger keeps when the service stops: a clean shutdown (the app's lifespan ends, a stream still
running) loses nothing; `kill -9` of a real `cube-enclave serve --simulate` loses at most the stated bound, the
records of the last flush interval (plus a batch being written)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from enclave.app import create_app
from enclave.inference.gateway import Gateway
from enclave.store import Store

from tests.enclave.conftest import ROW_KEY, make_settings
from tests.enclave.inference_support import start_service
from tests.enclave.test_main import free_port, wait_until_serving
from tests.enclave.usage_support import made_record, stored_rows
from tests.fakes.ollama import FakeOllama

MODEL = "llama3.2:3b"
FLUSH_SECONDS = 0.5
MARGIN_SECONDS = 2.0   # beyond flush_seconds: a write's own time, and a loaded test machine


def _stored_ids(db: Path) -> list[str]:
    async def read() -> list[str]:
        store = await Store.open(f"sqlite+aiosqlite:///{db}", row_key=ROW_KEY)
        try:
            return [r.request_id for r in await stored_rows(store)]
        finally:
            await store.close()
    return asyncio.run(read())


def _chat(stream: bool) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def test_clean_shutdown_loses_nothing(tmp_path: Path) -> None:
    with FakeOllama() as ollama:
        svc = start_service(tmp_path, [({"name": "ollama", "kind": "ollama"}, ollama)],
                            usage={"flush_seconds": 60, "batch_size": 10_000, "max_pending": 10_000})
        try:
            with svc.http() as c:
                ids = [c.post(svc.url("A", "chat/completions"), json=_chat(i % 2 == 1)).headers["x-request-id"]
                       for i in range(25)]
            for request_id in ids:
                svc.record(httpx.Response(200, headers={"x-request-id": request_id}))
            assert _stored_ids(tmp_path / "enclave.db") == []    # nothing written yet: the interval is 60 s
            ollama.event_interval, ollama.token_count = 0.1, 200   # a 20 s stream, still running at shutdown
            started = threading.Event()
            slow: list[str] = []

            def read_slowly() -> None:
                try:
                    with svc.http() as c, c.stream("POST", svc.url("A", "chat/completions"), json=_chat(True)) as r:
                        slow.append(r.headers["x-request-id"])
                        started.set()
                        for _ in r.iter_lines():
                            pass
                except httpx.HTTPError:
                    pass   # the server ends the stream as it shuts down

            reader = threading.Thread(target=read_slowly, daemon=True)
            reader.start()
            assert started.wait(10)
        finally:
            svc.server.stop()                                     # the lifespan ends: ledger.stop() writes
        reader.join(10)
    stored = _stored_ids(tmp_path / "enclave.db")
    assert sorted(stored) == sorted(ids + slow) and len(slow) == 1   # the cancelled stream's record too
    assert sorted(stored) == sorted(r.request_id for r in svc.records)


def _serve(config: Path, data: Path, port: int, log: Path, pat_file: Path | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "enclave.main", "serve", "--simulate", "--config", str(config), "--data-dir",
            str(data), "--port", str(port)]
    if pat_file is not None:
        args += ["--pat-file", str(pat_file)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUBE_ENCLAVE__")}
    with log.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


def test_kill_9_loses_at_most_the_last_flush_interval(tmp_path: Path) -> None:
    data, port, pat_file, log = tmp_path / "data", free_port(), tmp_path / "admin.pat", tmp_path / "serve.log"
    with FakeOllama() as ollama:
        config = tmp_path / "enclave.yaml"
        config.write_text(f"log_json: true\nregistry_refresh_seconds: 3600\nusage: {{flush_seconds: {FLUSH_SECONDS}}}\n"
                          f"backends:\n  - {{name: ollama, kind: ollama, base_url: \"{ollama.base_url}\"}}\n")
        proc = _serve(config, data, port, log, pat_file)
        try:
            tls = wait_until_serving(proc, data / "server-cert.pem", port, log)
            token = pat_file.read_text().strip()
            base = f"https://localhost:{port}"
            with httpx.Client(base_url=base, verify=tls, headers={"Authorization": f"Bearer {token}"},
                              timeout=30) as c:
                domain = next(iter(c.get("/users/me").json()["memberships"]))
                chat = f"/proxy/{domain}/v1/chat/completions"

                def served(n: int) -> list[str]:
                    out = []
                    for i in range(n):
                        r = c.post(chat, json=_chat(i % 2 == 0))
                        assert r.status_code == 200, r.text
                        out.append(r.headers["x-request-id"])
                    return out

                before = served(20)
                time.sleep(FLUSH_SECONDS + MARGIN_SECONDS)          # these are older than the bound
                last = served(10)                                   # these may be lost
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        proc = _serve(config, data, port, log)                    # the same data: the sealed keys, the database
        try:
            tls = wait_until_serving(proc, data / "server-cert.pem", port, log)
            with httpx.Client(base_url=f"https://localhost:{port}", verify=tls, timeout=30,
                              headers={"Authorization": f"Bearer {token}"}) as c:
                report = c.get("/admin/usage", params={"limit": 10_000}).json()
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    kept = [r["request_id"] for r in report["data"]]
    assert report["integrity_failures"] == 0 and len(kept) == len(set(kept))
    assert set(before) <= set(kept), "records older than flush_seconds + margin were lost"
    assert set(kept) <= set(before) | set(last)
    print(f"kill -9: {len(set(last) - set(kept))} of the last {len(last)} records (served within "
          f"{FLUSH_SECONDS} s of the kill) lost")


def test_a_failing_shutdown_step_does_not_cost_the_ledgers_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend clients fail to close at shutdown: the ledger still writes what it holds."""
    app = create_app(make_settings(tmp_path))
    record = made_record()
    closes = Gateway.aclose

    async def broken(self: Gateway) -> None:
        await closes(self)
        raise RuntimeError("backend client did not close")

    monkeypatch.setattr(Gateway, "aclose", broken)
    with pytest.raises(RuntimeError, match="did not close"):
        with TestClient(app):
            app.state.ctx.ledger.record(record)
    assert record.request_id in _stored_ids(tmp_path / "enclave.db")
