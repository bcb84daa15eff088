"""attestation.fetch: bounded backoff, Retry-After, no retry on other 4xx, the size cap, atomic writes.

Most tests script answers with httpx.MockTransport (the real httpx client code runs, only the socket
is replaced); the loopback tests use a real server and a closed port on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from attestation import fetch
from attestation.errors import CollateralError, FetchError
from attestation.fetch import (afetch_with_backoff, atomic_write, backoff_delay, fetch_with_backoff, is_retryable,
                               retry_after_seconds)

NOW = datetime(2026, 2, 3, tzinfo=timezone.utc)
Answer = httpx.Response | Exception


class Script:
    """Answers handed out in order (an Exception is raised as the transport failure); counts requests."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.urls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.urls.append(str(request.url))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self), **kwargs)

    def async_client(self) -> httpx.AsyncClient:
        async def handler(request: httpx.Request) -> httpx.Response:
            return self(request)

        return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def ok(body: bytes = b"body", **headers: str) -> httpx.Response:
    return httpx.Response(200, content=body, headers=headers)


def status(code: int, retry_after: str | None = None) -> httpx.Response:
    return httpx.Response(code, headers={"Retry-After": retry_after} if retry_after is not None else {})


def refused() -> httpx.ConnectError:
    return httpx.ConnectError("connection refused")


def get(script: Script, **kwargs) -> tuple[fetch.Fetched, list[float]]:
    sleeps: list[float] = []
    kwargs.setdefault("clock", lambda: NOW)
    with script.client() as client:
        return fetch_with_backoff(client, "https://kds.example/x", sleep=sleeps.append, **kwargs), sleeps


def failure(script: Script, **kwargs) -> tuple[FetchError, list[float]]:
    sleeps: list[float] = []
    kwargs.setdefault("clock", lambda: NOW)
    with script.client() as client, pytest.raises(FetchError) as caught:
        fetch_with_backoff(client, "https://kds.example/x", sleep=sleeps.append, **kwargs)
    return caught.value, sleeps


# --- the rules -----------------------------------------------------------------------------------

def test_backoff_doubles_and_retry_after_raises_the_pause() -> None:
    script = Script(status(429, "3"), status(503), refused(), status(500), ok(b"chain", Chain="c"))
    attempts: list[int] = []
    got, sleeps = get(script, attempts=5, backoff_base=0.25, backoff_max=30.0,
                      on_attempt=lambda: attempts.append(1))
    assert got.content == b"chain" and got.headers["Chain"] == "c"
    assert sleeps == [3.0, 0.5, 1.0, 2.0]  # Retry-After 3 beats 0.25; then 0.25 * 2**attempt
    assert len(script.urls) == 5 and len(attempts) == 5


def test_retry_after_is_capped_and_attempts_are_bounded() -> None:
    script = Script(*[status(429, "1000")] * 5)
    error, sleeps = failure(script, attempts=3, backoff_base=0.5, backoff_max=5.0, what="KDS")
    assert sleeps == [5.0, 5.0]  # no pause after the last attempt
    assert len(script.urls) == 3
    assert str(error) == "KDS https://kds.example/x: giving up after 3 attempts (HTTP 429)"
    assert (error.status, error.reason) == (429, "status")
    assert isinstance(error, CollateralError)


def test_retry_after_as_http_date_follows_the_clock() -> None:
    later = format_datetime(NOW + timedelta(seconds=7), usegmt=True)
    earlier = format_datetime(NOW - timedelta(seconds=7), usegmt=True)
    _, sleeps = get(Script(status(503, later), status(503, earlier), status(503, "soon"), ok()),
                    attempts=4, backoff_base=0.5)
    assert sleeps == [7.0, 1.0, 2.0]  # a past or garbled date leaves the plain backoff


@pytest.mark.parametrize("code", [400, 401, 403, 404, 301, 302])
def test_other_statuses_fail_at_once(code: int) -> None:
    script = Script(status(code, "1"), ok())
    error, sleeps = failure(script, attempts=4, what="Intel PCS")
    assert len(script.urls) == 1 and sleeps == []
    assert str(error) == f"Intel PCS https://kds.example/x: HTTP {code}"
    assert (error.status, error.reason) == (code, "status")


def test_transport_errors_are_retried_and_named() -> None:
    script = Script(refused(), httpx.ReadTimeout("slow"), refused())
    error, sleeps = failure(script, attempts=3, backoff_base=1.0, backoff_max=1.5)
    assert sleeps == [1.0, 1.5]
    assert "giving up after 3 attempts (ConnectError: connection refused)" in str(error)
    assert (error.status, error.reason) == (None, "unreachable")
    assert isinstance(error.__cause__, httpx.ConnectError)


def test_a_single_attempt_never_sleeps() -> None:
    error, sleeps = failure(Script(status(503, "9")), attempts=1)
    assert sleeps == [] and str(error).endswith("giving up after 1 attempt (HTTP 503)")
    error, _ = failure(Script(status(503)), attempts=0)  # fewer than one attempt means one
    assert "1 attempt" in str(error)


def test_is_retryable_and_backoff_delay() -> None:
    assert [c for c in (200, 301, 400, 404, 408, 429, 500, 501, 503, 599, 600) if is_retryable(c)] == [
        429, 500, 501, 503, 599]
    assert [backoff_delay(a, 0.5, 3.0) for a in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff_delay(0, 0.5, 3.0, retry_after=2.0) == 2.0
    assert backoff_delay(3, 0.5, 30.0, retry_after=1.0) == 4.0


def test_retry_after_seconds() -> None:
    assert retry_after_seconds(" 12 ", NOW) == 12.0
    assert retry_after_seconds(format_datetime(NOW + timedelta(seconds=7), usegmt=True), NOW) == 7.0
    assert retry_after_seconds(format_datetime(NOW - timedelta(seconds=7), usegmt=True), NOW) == 0.0
    assert retry_after_seconds("Tue, 03 Feb 2026 00:00:05", NOW) == 5.0  # no zone: read as UTC
    for garbled in ("soon", "-1", "1.5", "", None):
        assert retry_after_seconds(garbled, NOW) is None


# --- the size cap --------------------------------------------------------------------------------

def test_size_cap_stops_reading_early() -> None:
    served: list[int] = []

    def chunks() -> Iterator[bytes]:
        for i in range(1000):
            served.append(i)
            yield b"x" * 1024

    script = Script(httpx.Response(200, content=chunks()), ok())
    error, sleeps = failure(script, max_bytes=4096, what="KDS")
    assert (error.status, error.reason) == (200, "too_large")
    assert "response too large (over 4096 bytes)" in str(error)
    assert len(served) <= 6  # gave up after the fifth KiB, not after a MiB
    assert len(script.urls) == 1 and sleeps == []  # an oversized answer is not retried


def test_body_of_exactly_the_cap_is_accepted() -> None:
    got, _ = get(Script(ok(b"y" * 4096)), max_bytes=4096)
    assert got.content == b"y" * 4096


def test_relative_path_against_the_client_base_url() -> None:
    script = Script(ok())
    with script.client(base_url="https://kdsintf.example") as client:
        fetched = fetch_with_backoff(client, "/vcek/v1/Milan/cert_chain", sleep=lambda s: None)
    assert script.urls == ["https://kdsintf.example/vcek/v1/Milan/cert_chain"]
    assert fetched.url == "/vcek/v1/Milan/cert_chain"


# --- async twin ----------------------------------------------------------------------------------

async def test_async_fetch_follows_the_same_rules() -> None:
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    script = Script(status(429, "2"), refused(), ok(b"tcb", **{"TCB-Info-Issuer-Chain": "pem"}))
    async with script.async_client() as client:
        got = await afetch_with_backoff(client, "https://pcs.example/tcb", sleep=sleep, backoff_base=0.5,
                                        clock=lambda: NOW)
    assert got.content == b"tcb" and got.headers["TCB-Info-Issuer-Chain"] == "pem"
    assert sleeps == [2.0, 1.0]

    script = Script(status(404), ok())
    async with script.async_client() as client:
        with pytest.raises(FetchError, match="HTTP 404") as caught:
            await afetch_with_backoff(client, "https://pcs.example/tcb", sleep=sleep)
    assert caught.value.status == 404 and len(script.urls) == 1

    script = Script(httpx.Response(200, content=b"z" * 5000))
    async with script.async_client() as client:
        with pytest.raises(FetchError) as caught:
            await afetch_with_backoff(client, "https://pcs.example/tcb", sleep=sleep, max_bytes=4999)
    assert caught.value.reason == "too_large"


# --- real sockets on 127.0.0.1 -------------------------------------------------------------------

class _Big(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        size = int(self.path.strip("/"))
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        try:
            for _ in range(size // 65536):
                self.wfile.write(b"b" * 65536)
            self.wfile.write(b"b" * (size % 65536))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up at the cap, as it should


def test_loopback_server_answer_and_cap() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Big)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=5) as client:
            assert fetch_with_backoff(client, "/1000", max_bytes=1000).content == b"b" * 1000
            with pytest.raises(FetchError, match="too large") as caught:
                fetch_with_backoff(client, f"/{8 << 20}", max_bytes=64 << 10, sleep=lambda s: None)
            assert caught.value.reason == "too_large"
    finally:
        server.shutdown()
        server.server_close()


def test_loopback_closed_port_is_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        sleeps: list[float] = []
        with httpx.Client(timeout=2) as client, pytest.raises(FetchError) as caught:
            fetch_with_backoff(client, f"http://127.0.0.1:{port}/", attempts=2, backoff_base=0.1,
                               sleep=sleeps.append, what="KDS")
    assert caught.value.reason == "unreachable" and caught.value.status is None
    assert "giving up after 2 attempts (ConnectError" in str(caught.value) and sleeps == [0.1]


# --- atomic_write --------------------------------------------------------------------------------

def test_atomic_write_creates_replaces_and_sets_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "vcek"
    atomic_write(target, b"one")
    assert target.read_bytes() == b"one"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    atomic_write(target, b"two", mode=0o600)
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["vcek"]


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "tcb_info.json"
    atomic_write(target, b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fetch.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, b"new")
    monkeypatch.undo()
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]  # fails while writing
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["tcb_info.json"]


def test_atomic_write_long_names(tmp_path: Path) -> None:
    """Host cache names of VCEKs run to ~230 characters; the temporary name must not add to them."""
    name = "f" * 128 + "-blSPL=3-teeSPL=0-snpSPL=8-ucodeSPL=115-fmcSPL=1" + "-" * 60
    atomic_write(tmp_path / name, b"vcek")
    assert (tmp_path / name).read_bytes() == b"vcek"


def test_concurrent_writers_never_leave_a_torn_file(tmp_path: Path) -> None:
    target = tmp_path / "crl"
    bodies = [bytes([i]) * 200_000 for i in range(8)]

    writers = [threading.Thread(target=atomic_write, args=(target, body)) for body in bodies]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert target.read_bytes() in bodies
    assert os.listdir(tmp_path) == ["crl"]
