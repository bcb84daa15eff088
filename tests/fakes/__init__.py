"""Wire-faithful fakes of the LLM backends (Ollama, vLLM) served over real loopback sockets.

Usage::

    from tests.fakes import FakeOllama, FakeVllm
    with FakeOllama() as ollama:          # or: url = fake.start(); ...; fake.stop()
        ollama.base_url                   # http://127.0.0.1:<port>

pytest fixtures (``fake_ollama``, ``fake_vllm``, ``fake_vllm_with_key``) live in ``tests.fakes.fixtures``;
import them into a conftest or test module to use them.
"""

from tests.fakes.base import FakeBackend, SeenRequest
from tests.fakes.ollama import FakeOllama, ollama_model
from tests.fakes.server import LoopbackServer
from tests.fakes.vllm import FakeVllm, vllm_lora, vllm_model

__all__ = [
    "FakeBackend",
    "FakeOllama",
    "FakeVllm",
    "LoopbackServer",
    "SeenRequest",
    "ollama_model",
    "vllm_lora",
    "vllm_model",
]
