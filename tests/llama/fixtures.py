"""The real llama.cpp server (llama-cpp-python's ``llama_cpp.server``) on the tiny generated model.

One server answers chat, completions and embeddings: started with ``--embedding true`` it still generates
(checked with llama-cpp-python 0.3.36), so the suite needs a single process. It runs from its own venv
(``.venv-llama``, or ``$CUBE_LLAMA_PYTHON``): llama-cpp-python's server pins FastAPI/uvicorn/pydantic
versions of its own, which must never decide ours.

Import the fixture into the conftest of a test package that needs it:
``from tests.llama.fixtures import llama_server  # noqa: F401``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.llama.model import write_model

ROOT = Path(__file__).resolve().parents[2]
MODEL_ID = "tiny-llama"
CONTEXT = 32768  # OpenCode's first request alone carries ~9,600 prompt tokens (its tools and system prompt)
STARTUP_TIMEOUT = 60.0
INSTALL_HINT = (
    "run ./dev test (it creates .venv-llama with "
    "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install 'llama-cpp-python[server]==0.3.36'), "
    "or point CUBE_LLAMA_PYTHON at a python that has it"
)


@dataclass(frozen=True)
class LlamaServer:
    base_url: str  # http://127.0.0.1:P (the OpenAI API is under /v1)
    model: str
    log_path: Path

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def requests_seen(self) -> list[str]:
        """``"POST /v1/chat/completions"``-style lines from the server's uvicorn access log."""
        seen = []
        for line in self.log().splitlines():
            if line.startswith("INFO:") and '"' in line and " HTTP/1.1" in line:
                seen.append(line.split('"')[1].removesuffix(" HTTP/1.1"))
        return seen


def llama_python() -> Path:
    """The interpreter with llama-cpp-python[server]; a loud failure saying how to install it."""
    python = Path(os.environ.get("CUBE_LLAMA_PYTHON", ROOT / ".venv-llama" / "bin" / "python"))
    if not python.exists():
        pytest.fail(f"llama-cpp-python interpreter not found at {python}: {INSTALL_HINT}")
    probe = subprocess.run([str(python), "-c", "import llama_cpp.server"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(f"{python} cannot import llama_cpp.server ({probe.stderr.strip()[-400:]}): {INSTALL_HINT}")
    return python


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(process: subprocess.Popen, base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"llama.cpp server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base_url}/v1/models", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"llama.cpp server not ready within {STARTUP_TIMEOUT:.0f} s:\n{log_path.read_text()[-3000:]}")


def start_llama_server(model_path: Path, log_path: Path) -> tuple[subprocess.Popen, LlamaServer]:
    port = _free_port()
    command = [
        str(llama_python()), "-m", "llama_cpp.server", "--model", str(model_path), "--model_alias", MODEL_ID,
        "--n_ctx", str(CONTEXT), "--embedding", "true", "--interrupt_requests", "false", "--host", "127.0.0.1", "--port", str(port),
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    server = LlamaServer(base_url=f"http://127.0.0.1:{port}", model=MODEL_ID, log_path=log_path)
    try:
        _wait_ready(process, server.base_url, log_path)
    except BaseException:
        stop(process)
        raise
    return process, server


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("llama") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def llama_server(tiny_model: Path) -> Iterator[LlamaServer]:
    """A running llama.cpp server serving the tiny model as ``tiny-llama`` (chat, completions, embeddings)."""
    process, server = start_llama_server(tiny_model, tiny_model.with_suffix(".log"))
    try:
        yield server
    finally:
        stop(process)
