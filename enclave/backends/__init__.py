"""LLM backend drivers (Ollama, vLLM) behind one interface; the registry owns and schedules them."""

from enclave.backends.base import Backend, BackendConfig, ModelCard
from enclave.backends.errors import InvalidModelName
from enclave.backends.ollama import OllamaBackend
from enclave.backends.vllm import VllmBackend

DRIVERS: dict[str, type[Backend]] = {"ollama": OllamaBackend, "vllm": VllmBackend}


def make_backend(config: BackendConfig) -> Backend:
    """The driver for ``config.kind``."""
    return DRIVERS[config.kind](config)


__all__ = ["Backend", "BackendConfig", "DRIVERS", "InvalidModelName", "ModelCard", "OllamaBackend",
           "VllmBackend", "make_backend"]
