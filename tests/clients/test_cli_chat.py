"""The real OpenCode and Continue CLIs complete a chat against the real llama.cpp server.

A recording relay sits between each CLI and the server, so the tests also pin down how each CLI calls the
API (paths, Authorization, stream_options): what the gateway and ``cube-attest proxy`` must serve.
For now the base URL is the server's own; the gateway's tests point the same harness at the enclave.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.clients.harness import continue_config, run_continue, run_continue_adapters, run_opencode
from tests.clients.recorder import Exchange, RecordingServer
from tests.llama.fixtures import LlamaServer
from tests.llama.model import EMBED

PROMPT = "say hello"


@pytest.fixture
def recorder(llama_server: LlamaServer) -> Iterator[RecordingServer]:
    with RecordingServer(llama_server.base_url) as relay:
        yield relay


def chat_calls(recorder: RecordingServer) -> list[Exchange]:
    calls = [e for e in recorder.relay.exchanges if e.path == "/v1/chat/completions"]
    assert calls, f"no chat request reached the server; saw {recorder.relay.paths()}"
    return calls


def assert_streamed_with_usage_asked(call: Exchange, model: str) -> None:
    body = call.json()
    assert call.method == "POST" and call.status == 200
    assert body["model"] == model
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_opencode_completes_a_chat(llama_server: LlamaServer, recorder: RecordingServer) -> None:
    run = run_opencode(f"{recorder.base_url}/v1", llama_server.model, PROMPT, api_key="test-key-opencode")
    assert run.exit_code == 0, run.describe()
    calls = chat_calls(recorder)
    # A title request (no tools) and the agent's request (its tools, ~9,600 prompt tokens); no GET /models.
    assert recorder.relay.paths() == ["POST /v1/chat/completions"] * len(calls)
    assert len(calls) == 2
    for call in calls:
        assert_streamed_with_usage_asked(call, llama_server.model)
        assert call.headers["authorization"] == "Bearer test-key-opencode"
    agent = max(calls, key=lambda c: len(c.body))
    assert agent.json()["tools"] and agent.json()["tool_choice"] == "auto"
    answer = agent.generated_text()
    assert answer and answer in run.stdout, run.describe()
    assert "POST /v1/chat/completions" in llama_server.requests_seen()


def test_opencode_with_empty_key_sends_no_authorization(llama_server: LlamaServer, recorder: RecordingServer) -> None:
    run = run_opencode(f"{recorder.base_url}/v1", llama_server.model, PROMPT, api_key="")
    assert run.exit_code == 0, run.describe()
    assert all("authorization" not in call.headers for call in chat_calls(recorder))


@pytest.mark.parametrize("api_key, authorization", [("test-key-continue", "Bearer test-key-continue"),
                                                     (None, "Bearer")])
def test_continue_completes_a_chat(
    llama_server: LlamaServer, recorder: RecordingServer, api_key: str | None, authorization: str
) -> None:
    """``provider: openai``; with no apiKey Continue still sends an (empty) Bearer, which the proxy replaces."""
    config = continue_config(f"{recorder.base_url}/v1", llama_server.model, api_key)
    run = run_continue(config, PROMPT)
    assert run.exit_code == 0, run.describe()
    assert run.refused_hosts == ["api.continue.dev"], "the offline guard saw other outside hosts"
    [call] = chat_calls(recorder)
    assert recorder.relay.paths() == ["POST /v1/chat/completions"]
    assert_streamed_with_usage_asked(call, llama_server.model)
    # h11 strips the trailing space of "Bearer " when it parses the header.
    assert call.headers["authorization"] == authorization
    answer = call.generated_text()
    assert answer and answer in run.stdout, run.describe()


def test_continue_ollama_provider_uses_the_openai_routes(llama_server: LlamaServer, recorder: RecordingServer) -> None:
    """In ``cn`` 1.5, ``provider: ollama`` talks to Ollama's OpenAI-compatible ``{apiBase}/v1/...``, not /api/chat."""
    config = continue_config(recorder.base_url, llama_server.model, None, provider="ollama")
    run = run_continue(config, PROMPT)
    assert run.exit_code == 0, run.describe()
    assert recorder.relay.paths() == ["POST /v1/chat/completions"]
    assert_streamed_with_usage_asked(chat_calls(recorder)[0], llama_server.model)


def test_continue_model_layer_autocompletes_and_embeds(llama_server: LlamaServer, recorder: RecordingServer) -> None:
    """Continue's autocomplete (a streamed completion with ``suffix``) and embeddings through its adapters."""
    run, result = run_continue_adapters(f"{recorder.base_url}/v1", llama_server.model, "test-key-adapters")
    assert result is not None, run.describe()
    assert recorder.relay.paths() == ["POST /v1/completions", "POST /v1/embeddings"]
    completion, embedding = recorder.relay.exchanges
    assert completion.json()["suffix"] and completion.json()["stream"] is True
    assert completion.headers["authorization"] == "Bearer test-key-adapters"
    streamed = "".join(
        json.loads(block.removeprefix("data: "))["choices"][0]["text"]
        for block in completion.response.decode().split("\n\n")
        if block.startswith("data: {")
    )
    assert result.completion == streamed
    assert embedding.json()["input"] == ["hello world", "cube"]
    relayed = [item["embedding"] for item in embedding.json_response()["data"]]
    assert len(result.embeddings) == len(relayed) == 2
    for got, sent in zip(result.embeddings, relayed):
        assert len(got) == EMBED and got == pytest.approx(sent)
