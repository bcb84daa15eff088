"""The llama.cpp server fixture, the engine the real CLIs talk to."""

from tests.llama.fixtures import llama_server, tiny_model  # noqa: F401
