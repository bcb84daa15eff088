"""Self-tests of the backend fakes' inference routes: shapes, stream framing, every control, disconnect notice."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.fakes import FakeOllama, FakeVllm
from tests.fakes.fixtures import VLLM_TEST_KEY, fake_ollama, fake_vllm, fake_vllm_with_key  # noqa: F401
from tests.fakes.vllm import BASE_MODEL
from tests.fakes.wire import go_json

OLLAMA_MODEL = "llama3.2:3b"
CHAT = [{"role": "user", "content": "Say something <nice> & short"}]


def sse_events(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, asserting the framing on the way."""
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


def ndjson(text: str) -> list[dict]:
    assert text.endswith("\n")
    return [json.loads(line) for line in text.split("\n")[:-1]]


def wait_for(condition, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture
def vllm_client(fake_vllm: FakeVllm) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake_vllm.base_url, timeout=5) as client:
        yield client


@pytest.fixture
def ollama_client(fake_ollama: FakeOllama) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake_ollama.base_url, timeout=5) as client:
        yield client


# vLLM shapes ---------------------------------------------------------------------------------------------
def test_vllm_chat_body_has_every_field_and_the_empty_tool_calls_quirk(vllm_client):
    response = vllm_client.post("/v1/chat/completions", json={"model": BASE_MODEL, "messages": CHAT})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", body["id"])
    assert list(body) == ["id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
                          "usage", "prompt_logprobs", "prompt_token_ids", "kv_transfer_params"]
    message = body["choices"][0]["message"]
    assert message["tool_calls"] == [] and message["role"] == "assistant" and message["reasoning_content"] is None
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["stop_reason"] is None
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] == usage["prompt_tokens"] + 8
    assert usage["prompt_tokens_details"] is None


def test_vllm_chat_stream_framing_and_usage_chunk(vllm_client):
    whole = vllm_client.post("/v1/chat/completions", json={"model": BASE_MODEL, "messages": CHAT}).json()
    streamed = vllm_client.post("/v1/chat/completions", json={
        "model": BASE_MODEL, "messages": CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all("usage" not in c for c in chunks[:-1])  # vLLM sets usage only for continuous_usage_stats
    assert chunks[-1]["choices"] == [] and set(chunks[-1]["usage"]) == {"prompt_tokens", "total_tokens",
                                                                        "completion_tokens"}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert content == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and "stop_reason" in chunks[-2]["choices"][0]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert all('": ' not in e and '", "' not in e for e in events[:-1])  # compact JSON, as pydantic writes it
    plain = sse_events(vllm_client.post("/v1/chat/completions", json={
        "model": BASE_MODEL, "messages": CHAT, "stream": True}).text)
    assert all(json.loads(e)["choices"] for e in plain[:-1])  # no usage chunk when not asked for


def test_tokens_vary_by_default_and_controls_override_them(fake_vllm, vllm_client):
    first = vllm_client.post("/v1/completions", json={"model": BASE_MODEL, "prompt": "a"}).json()
    again = vllm_client.post("/v1/completions", json={"model": BASE_MODEL, "prompt": "a"}).json()
    other = vllm_client.post("/v1/completions", json={"model": BASE_MODEL, "prompt": "b"}).json()
    assert first["choices"][0]["text"] == again["choices"][0]["text"] != other["choices"][0]["text"]
    fake_vllm.token_count = 40
    events = sse_events(vllm_client.post("/v1/completions", json={"model": BASE_MODEL, "prompt": "a",
                                                                  "stream": True}).text)
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert len(texts) == 40 and all(a != b for a, b in zip(texts, texts[1:]))
    assert all(json.loads(e)["usage"] is None for e in events[:-1])  # completion chunks carry every field
    fake_vllm.tokens = ["x", "y", "z"]
    limited = vllm_client.post("/v1/completions", json={"model": BASE_MODEL, "prompt": "a", "max_tokens": 2}).json()
    assert limited["choices"][0]["text"] == "xy" and limited["choices"][0]["finish_reason"] == "length"
    assert limited["usage"]["completion_tokens"] == 2


def test_vllm_tool_call_whole_and_streamed(fake_vllm, vllm_client):
    fake_vllm.tool_call = ("get_weather", '{"city": "Paris"}')
    request = {"model": BASE_MODEL, "messages": CHAT, "tools": [{"type": "function", "function": {"name": "x"}}]}
    body = vllm_client.post("/v1/chat/completions", json=request).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", call["id"])
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    events = sse_events(vllm_client.post("/v1/chat/completions", json={**request, "stream": True}).text)
    deltas = [json.loads(e)["choices"][0] for e in events[:-1]]
    calls = [d["delta"]["tool_calls"][0] for d in deltas if "tool_calls" in d["delta"]]
    assert calls[0]["function"] == {"name": "get_weather"} and calls[0]["index"] == 0
    assert "".join(c["function"].get("arguments", "") for c in calls[1:]) == '{"city": "Paris"}'
    assert deltas[-1]["finish_reason"] == "tool_calls"
    plain = vllm_client.post("/v1/chat/completions", json={"model": BASE_MODEL, "messages": CHAT}).json()
    assert plain["choices"][0]["message"]["tool_calls"] == []  # no tools in the request: no tool call


def test_vllm_suffix_is_refused_like_vllm_unless_accepted(fake_vllm, vllm_client):
    request = {"model": BASE_MODEL, "prompt": "def f(", "suffix": "    return x\n"}
    refused = vllm_client.post("/v1/completions", json=request)
    assert refused.status_code == 400
    assert refused.json() == {"error": {"message": "suffix is not currently supported", "type": "BadRequestError",
                                        "param": None, "code": 400}}
    fake_vllm.accept_suffix = True
    assert vllm_client.post("/v1/completions", json=request).status_code == 200
    assert fake_vllm.json_bodies("/v1/completions")[-1]["suffix"] == "    return x\n"


def test_vllm_embeddings_strings_and_token_arrays(vllm_client):
    strings = vllm_client.post("/v1/embeddings", json={"model": BASE_MODEL, "input": ["a", "b"]}).json()
    assert re.fullmatch(r"embd-[0-9a-f]{32}", strings["id"]) and strings["object"] == "list"
    assert [d["index"] for d in strings["data"]] == [0, 1] and strings["data"][0] != strings["data"][1]
    assert strings["usage"]["completion_tokens"] == 0 and strings["usage"]["prompt_tokens_details"] is None
    single = vllm_client.post("/v1/embeddings", json={"model": BASE_MODEL, "input": "a"}).json()
    assert single["data"][0]["embedding"] == strings["data"][0]["embedding"]
    tokens = vllm_client.post("/v1/embeddings", json={"model": BASE_MODEL, "input": [1, 2, 3]}).json()
    assert len(tokens["data"]) == 1 and tokens["usage"]["prompt_tokens"] == 3


def test_vllm_errors_in_its_envelope(fake_vllm, vllm_client):
    unknown = vllm_client.post("/v1/chat/completions", json={"model": "nope", "messages": CHAT})
    assert unknown.status_code == 404
    assert unknown.json() == {"error": {"message": "The model `nope` does not exist.", "type": "NotFoundError",
                                        "param": None, "code": 404}}
    bad = vllm_client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == 400
    fake_vllm.upstream_status = (503, "engine overloaded")
    busy = vllm_client.post("/v1/chat/completions", json={"model": BASE_MODEL, "messages": CHAT, "stream": True})
    assert busy.status_code == 503 and busy.json()["error"]["message"] == "engine overloaded"
    assert fake_vllm.streams_started == 0


def test_vllm_inference_needs_the_api_key(fake_vllm_with_key):
    url = f"{fake_vllm_with_key.base_url}/v1/chat/completions"
    body = {"model": BASE_MODEL, "messages": CHAT}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {VLLM_TEST_KEY}"}).status_code == 200


def test_request_id_header_and_unknown_fields_are_recorded(fake_vllm, vllm_client):
    body = {"model": BASE_MODEL, "messages": CHAT, "x_unknown": {"kept": [1, 2]}, "cache_salt": "s"}
    answer = vllm_client.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "abc"}).json()
    assert answer["id"] == "chatcmpl-abc"
    assert fake_vllm.json_bodies("/v1/chat/completions")[-1] == body


# Ollama shapes -------------------------------------------------------------------------------------------
def test_ollama_chat_streams_ndjson_by_default(ollama_client):
    response = ollama_client.post("/api/chat", json={"model": OLLAMA_MODEL, "messages": CHAT})
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = ndjson(response.text)
    assert all(not line["done"] and set(line) == {"model", "created_at", "message", "done"} for line in lines[:-1])
    assert all(line["message"]["role"] == "assistant" for line in lines)
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "stop" and final["message"]["content"] == ""
    for field in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                  "eval_duration"):
        assert isinstance(final[field], int) and final[field] > 0
    assert final["eval_count"] == len(lines) - 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", final["created_at"])
    whole = ollama_client.post("/api/chat", json={"model": OLLAMA_MODEL, "messages": CHAT, "stream": False})
    assert whole.headers["content-type"] == "application/json; charset=utf-8"
    assert whole.json()["message"]["content"] == "".join(line["message"]["content"] for line in lines)


def test_ollama_generate_with_suffix_and_num_predict(fake_ollama, ollama_client):
    request = {"model": OLLAMA_MODEL, "prompt": "def f(", "suffix": "return 1", "raw": True, "system": "s",
               "images": ["aGk="], "options": {"num_predict": 3}}
    lines = ndjson(ollama_client.post("/api/generate", json=request).text)
    assert [set(line) for line in lines[:-1]] == [{"model", "created_at", "response", "done"}] * 3
    assert lines[-1]["done_reason"] == "length" and isinstance(lines[-1]["context"], list)
    assert fake_ollama.json_bodies("/api/generate")[-1] == request


def test_ollama_unknown_model_and_go_json(ollama_client):
    unknown = ollama_client.post("/api/chat", json={"model": "ghost", "messages": CHAT})
    assert unknown.status_code == 404 and unknown.text == '{"error":"model \\"ghost\\" not found, try pulling it first"}'
    assert go_json({"a": "<&>"}) == b'{"a":"\\u003c\\u0026\\u003e"}'


def test_ollama_embed_show_and_ps(fake_ollama, ollama_client):
    assert ollama_client.get("/api/ps").json() == {"models": []}
    embed = ollama_client.post("/api/embed", json={"model": OLLAMA_MODEL, "input": ["a", "b"]}).json()
    assert list(embed) == ["model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"]
    assert len(embed["embeddings"]) == 2 and abs(sum(v * v for v in embed["embeddings"][0]) - 1) < 1e-3
    legacy = ollama_client.post("/api/embeddings", json={"model": OLLAMA_MODEL, "prompt": "a"}).json()
    assert list(legacy) == ["embedding"] and len(legacy["embedding"]) == fake_ollama.embedding_dim
    show = ollama_client.post("/api/show", json={"name": OLLAMA_MODEL}).json()
    assert {"license", "modelfile", "parameters", "template", "details", "model_info", "capabilities",
            "modified_at"} <= set(show) and "completion" in show["capabilities"]
    assert ollama_client.post("/api/show", json={"model": "ghost:1"}).status_code == 404
    (loaded,) = ollama_client.get("/api/ps").json()["models"]
    assert loaded["name"] == OLLAMA_MODEL and loaded["context_length"] > 0 and "expires_at" in loaded


def test_ollama_openai_compat_shapes(fake_ollama, ollama_client):
    body = ollama_client.post("/v1/chat/completions", json={"model": OLLAMA_MODEL, "messages": CHAT}).json()
    assert re.fullmatch(r"chatcmpl-\d{1,3}", body["id"]) and body["system_fingerprint"] == "fp_ollama"
    assert "tool_calls" not in body["choices"][0]["message"] and body["usage"]["completion_tokens"] == 8
    plain = sse_events(ollama_client.post("/v1/chat/completions", json={
        "model": OLLAMA_MODEL, "messages": CHAT, "stream": True}).text)
    assert plain[-1] == "[DONE]" and all(json.loads(e)["choices"] for e in plain[:-1])
    counted = sse_events(ollama_client.post("/v1/chat/completions", json={
        "model": OLLAMA_MODEL, "messages": CHAT, "stream": True, "stream_options": {"include_usage": True}}).text)
    usage_chunk = json.loads(counted[-2])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 8
    assert json.loads(counted[-3])["choices"][0]["finish_reason"] == "stop"
    completion = ollama_client.post("/v1/completions", json={"model": OLLAMA_MODEL, "prompt": "a", "suffix": "b"})
    assert completion.json()["object"] == "text_completion" and re.fullmatch(r"cmpl-\d+", completion.json()["id"])
    embeddings = ollama_client.post("/v1/embeddings", json={"model": OLLAMA_MODEL, "input": ["a"]}).json()
    assert embeddings["object"] == "list" and set(embeddings["usage"]) == {"prompt_tokens", "total_tokens"}
    missing = ollama_client.post("/v1/chat/completions", json={"model": "ghost", "messages": CHAT})
    assert missing.status_code == 404
    assert missing.json()["error"] == {"message": 'model "ghost" not found, try pulling it first',
                                       "type": "not_found_error", "param": None, "code": None}
    fake_ollama.tool_call = ("lookup", '{"q": 1}')
    called = ollama_client.post("/v1/chat/completions", json={"model": OLLAMA_MODEL, "messages": CHAT,
                                                              "tools": [{"type": "function"}]}).json()
    assert called["choices"][0]["finish_reason"] == "tool_calls"
    assert called["choices"][0]["message"]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": '{"q":1}'}


def test_ollama_error_line_inside_the_200_stream(fake_ollama, ollama_client):
    fake_ollama.error_line_after = 2
    response = ollama_client.post("/api/chat", json={"model": OLLAMA_MODEL, "messages": CHAT})
    lines = ndjson(response.text)
    assert response.status_code == 200 and len(lines) == 3 and list(lines[-1]) == ["error"]
    wait_for(lambda: fake_ollama.streams_errored == 1, timeout=10)   # counted after the last line is written
    assert fake_ollama.streams_finished == 0
    fake_ollama.upstream_status = (500, "out of memory")
    failed = ollama_client.post("/api/chat", json={"model": OLLAMA_MODEL, "messages": CHAT})
    assert failed.status_code == 500 and failed.json() == {"error": "out of memory"}


# fault controls and observation --------------------------------------------------------------------------
def test_fail_after_cuts_in_the_middle_of_an_event(fake_vllm):
    fake_vllm.fail_after = 2
    received = b""
    with httpx.Client(base_url=fake_vllm.base_url, timeout=5) as client:
        with client.stream("POST", "/v1/chat/completions",
                           json={"model": BASE_MODEL, "messages": CHAT, "stream": True}) as response:
            with pytest.raises(httpx.RemoteProtocolError):
                for chunk in response.iter_raw():
                    received += chunk
    whole_events, _, tail = received.decode().rpartition("\n\n")
    assert len(whole_events.split("\n\n")) == 2 and tail.startswith("data: {") and not tail.endswith("}")
    assert b"[DONE]" not in received
    wait_for(lambda: fake_vllm.streams_failed == 1, timeout=10)   # counted as the fake's handler ends
    assert fake_vllm.streams_cancelled == 0 and fake_vllm.streams_finished == 0


def test_event_interval_paces_events(fake_ollama):
    fake_ollama.event_interval = 0.2
    fake_ollama.tokens = ["a", "b", "c"]
    arrivals = []
    with httpx.Client(base_url=fake_ollama.base_url, timeout=5) as client:
        with client.stream("POST", "/api/generate", json={"model": OLLAMA_MODEL, "prompt": "p"}) as response:
            for _ in response.iter_lines():
                arrivals.append(time.monotonic())
    assert len(arrivals) == 4
    assert all(later - earlier >= 0.15 for earlier, later in zip(arrivals, arrivals[1:]))
    wait_for(lambda: fake_ollama.streams_finished == 1, timeout=10)   # counted after the last line is written


def test_disconnect_is_noticed_promptly_while_idle_between_events(fake_vllm):
    fake_vllm.event_interval = 30.0
    with httpx.Client(base_url=fake_vllm.base_url, timeout=5) as client:
        with client.stream("POST", "/v1/chat/completions",
                           json={"model": BASE_MODEL, "messages": CHAT, "stream": True}) as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the response, i.e. disconnects
            assert next(lines).startswith("data: ")
            time.sleep(0.2)
            assert fake_vllm.in_flight == 1 and fake_vllm.streams_cancelled == 0
        closed_at = time.monotonic()
    wait_for(lambda: fake_vllm.streams_cancelled == 1)
    assert fake_vllm.cancelled_at[-1] - closed_at < 1.0
    wait_for(lambda: fake_vllm.in_flight == 0)
    assert fake_vllm.streams_started == 1 and fake_vllm.streams_finished == 0


def test_stall_after_keeps_the_connection_open_and_silent(fake_ollama):
    fake_ollama.stall_after = 1
    with httpx.Client(base_url=fake_ollama.base_url, timeout=httpx.Timeout(5, read=0.5)) as client:
        with client.stream("POST", "/api/chat", json={"model": OLLAMA_MODEL, "messages": CHAT}) as response:
            lines = response.iter_lines()
            assert json.loads(next(lines))["done"] is False
            with pytest.raises(httpx.ReadTimeout):
                next(lines)
    wait_for(lambda: fake_ollama.streams_cancelled == 1)


def test_delay_holds_back_headers_and_a_leaving_client_is_counted(fake_vllm):
    fake_vllm.delay = 3600
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{fake_vllm.base_url}/v1/chat/completions", json={"model": BASE_MODEL, "messages": CHAT},
                   timeout=httpx.Timeout(5, read=0.3))
    wait_for(lambda: fake_vllm.requests_cancelled == 1)
    assert fake_vllm.streams_cancelled == 0 and fake_vllm.in_flight == 0


def test_in_flight_counts_concurrent_requests(fake_ollama):
    fake_ollama.delay = 0.5
    url = f"{fake_ollama.base_url}/api/chat"
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda: statuses.append(
        httpx.post(url, json={"model": OLLAMA_MODEL, "messages": CHAT}, timeout=5).status_code)) for _ in range(3)]
    for thread in threads:
        thread.start()
    wait_for(lambda: fake_ollama.in_flight == 3)
    for thread in threads:
        thread.join()
    assert statuses == [200, 200, 200] and fake_ollama.max_in_flight_seen == 3 and fake_ollama.in_flight == 0
    assert fake_ollama.requests_cancelled == 0 and fake_ollama.streams_finished == 3
