"""The real llama.cpp server on the generated model: what it serves, byte for byte, to the gateway's tests."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import httpx
import pytest

from tests.llama.fixtures import LlamaServer
from tests.llama.model import CHAT_TEMPLATE, EMBED, build_vocabulary, write_model

TIMEOUT = httpx.Timeout(60.0)


def sse_events(body: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    events = [block for block in body.split("\n\n") if block.strip()]
    assert all(block.startswith("data: ") for block in events), events
    return [block.removeprefix("data: ") for block in events]


def post(server: LlamaServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.v1}/{path}", json=body, timeout=TIMEOUT)


def chat_body(server: LlamaServer, **extra: object) -> dict:
    return {"model": server.model, "messages": [{"role": "user", "content": "say hello"}], **extra}


def test_model_file_is_small_deterministic_and_complete(tmp_path: Path) -> None:
    first, second = write_model(tmp_path / "a.gguf"), write_model(tmp_path / "b.gguf")
    assert first.read_bytes() == second.read_bytes()
    assert 300_000 < first.stat().st_size < 700_000
    reader = gguf.GGUFReader(first)
    keys = set(reader.fields)
    for key in ("general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
                "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count", "tokenizer.ggml.model",
                "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.chat_template"):
        assert key in keys, key
    names = {tensor.name for tensor in reader.tensors}
    per_block = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down")
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    expected |= {f"blk.{b}.{t}.weight" for b in range(2) for t in per_block}
    assert names == expected
    vocab = build_vocabulary()
    assert 300 <= len(vocab.tokens) <= 400
    assert vocab.tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert vocab.tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert set(vocab.types[3:259]) == {int(gguf.TokenType.BYTE)}
    template = reader.fields["tokenizer.chat_template"]
    assert bytes(template.parts[template.data[0]]).decode() == CHAT_TEMPLATE


def test_models_list_serves_the_alias(llama_server: LlamaServer) -> None:
    listed = httpx.get(f"{llama_server.v1}/models", timeout=TIMEOUT).json()
    assert [m["id"] for m in listed["data"]] == [llama_server.model]


def test_chat_not_streamed_ends_by_itself_with_usage(llama_server: LlamaServer) -> None:
    """No max_tokens (as OpenCode sends none): the model still stops, with finish_reason "stop"."""
    reply = post(llama_server, "chat/completions", chat_body(llama_server))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("temperature", [0.0, 1.0, 1.5])
def test_generation_stops_at_any_temperature(llama_server: LlamaServer, temperature: float) -> None:
    body = post(llama_server, "chat/completions", chat_body(llama_server, temperature=temperature)).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert 0 < body["usage"]["completion_tokens"] < 64


def test_chat_streamed_is_sse_ending_in_done(llama_server: LlamaServer) -> None:
    reply = post(llama_server, "chat/completions", chat_body(llama_server, stream=True))
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = sse_events(reply.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_ignores_include_usage(llama_server: LlamaServer) -> None:
    """The real engine sends no usage at all on a stream, even when asked: the gateway must estimate."""
    reply = post(llama_server, "chat/completions",
                 chat_body(llama_server, stream=True, stream_options={"include_usage": True}))
    assert reply.status_code == 200
    events = sse_events(reply.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks, "no chunks"
    assert all(c["choices"] for c in chunks), "a usage-only chunk (choices == []) was sent"
    assert all(c.get("usage") is None for c in chunks), "a chunk carried usage"


def test_completions_with_suffix_use_it(llama_server: LlamaServer) -> None:
    """``suffix`` goes into the prompt (the model has FIM markers): more prompt tokens than without it."""
    plain = {"model": llama_server.model, "prompt": "def hello(", "max_tokens": 16}
    without = post(llama_server, "completions", plain).json()
    with_suffix = post(llama_server, "completions", {**plain, "suffix": "\n    return name\n"}).json()
    assert with_suffix["object"] == "text_completion"
    assert isinstance(with_suffix["choices"][0]["text"], str)
    assert with_suffix["choices"][0]["finish_reason"] in {"stop", "length"}
    assert with_suffix["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]


def test_completions_streamed(llama_server: LlamaServer) -> None:
    body = {"model": llama_server.model, "prompt": "hello", "max_tokens": 8, "stream": True}
    events = sse_events(post(llama_server, "completions", body).text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)


def test_embeddings_one_vector_per_input(llama_server: LlamaServer) -> None:
    reply = post(llama_server, "embeddings", {"model": llama_server.model, "input": ["hello world", "cube"]})
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    vectors = [d["embedding"] for d in data]
    assert all(len(v) == EMBED and all(isinstance(x, float) for x in v) for v in vectors)
    assert vectors[0] != vectors[1]
    single = post(llama_server, "embeddings", {"model": llama_server.model, "input": "hello world"}).json()
    assert single["data"][0]["embedding"] == pytest.approx(vectors[0], rel=1e-4)


def test_unknown_route_is_404_and_access_log_records_requests(llama_server: LlamaServer) -> None:
    assert httpx.post(f"{llama_server.base_url}/api/chat", json={}, timeout=TIMEOUT).status_code == 404
    assert "POST /api/chat" in llama_server.requests_seen()


def test_embeddings_ignore_base64_encoding_format(llama_server: LlamaServer) -> None:
    """Asked for base64 (the openai SDK's default), the engine still answers float lists."""
    body = {"model": llama_server.model, "input": "hello", "encoding_format": "base64"}
    embedding = post(llama_server, "embeddings", body).json()["data"][0]["embedding"]
    assert isinstance(embedding, list) and len(embedding) == EMBED
