"""The llama.cpp server fixture for the tests of the server and model themselves."""

from tests.llama.fixtures import llama_server, tiny_model  # noqa: F401
