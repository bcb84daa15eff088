"""pytest fixtures starting the fakes; import the ones you need into your conftest or test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.ollama import FakeOllama
from tests.fakes.vllm import FakeVllm

VLLM_TEST_KEY = "vllm-test-key-0123456789"


@pytest.fixture
def fake_ollama() -> Iterator[FakeOllama]:
    """A running FakeOllama with its default three models (official, user namespace, host-prefixed)."""
    with FakeOllama() as fake:
        yield fake


@pytest.fixture
def fake_vllm() -> Iterator[FakeVllm]:
    """A running FakeVllm without an API key, serving a base model and a LoRA adapter on it."""
    with FakeVllm() as fake:
        yield fake


@pytest.fixture
def fake_vllm_with_key() -> Iterator[FakeVllm]:
    """A running FakeVllm started with ``--api-key`` VLLM_TEST_KEY."""
    with FakeVllm(api_key=VLLM_TEST_KEY) as fake:
        yield fake
