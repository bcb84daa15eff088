"""The OpenAI inference routes end to end: openai-python (sync and async) over the attested client, what the
gateway changes in a request and an answer (and what it leaves alone), usage and metrics, bad-body envelopes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from attestation.atls.client import async_openai_client, openai_client
from enclave.inference.body import domain_cache_salt
from enclave.inference.usage import Usage

from tests.enclave.inference_support import QuirkyVllm, Service, enclave_policy, sample, sse_json, start_service
from tests.fakes.ollama import FakeOllama
from tests.fakes.vllm import BASE_MODEL, vllm_model

VLLM = BASE_MODEL                 # on the "vllm" backend (cache_salt: true)
QUIET = "quiet-model"             # on "quiet": reports no usage at all
QUIRKY = "quirky-model"           # on "quirky": `tool_calls: []` in every stream delta
OLLAMA = "llama3.2:3b"            # on "ollama"
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with QuirkyVllm() as vllm, QuirkyVllm(served=[vllm_model(QUIET)]) as quiet, \
            QuirkyVllm(served=[vllm_model(QUIRKY)]) as quirky, FakeOllama() as ollama:
        vllm.accept_suffix = True
        quiet.report_usage = False
        quirky.empty_tool_calls_in_deltas = True
        with start_service(tmp_path_factory.mktemp("inference-openai"), [
            ({"name": "vllm", "kind": "vllm", "cache_salt": True}, vllm),
            ({"name": "quiet", "kind": "vllm"}, quiet),
            ({"name": "quirky", "kind": "vllm"}, quirky),
            ({"name": "ollama", "kind": "ollama"}, ollama),
        ], limits={"max_body_bytes": MAX_BODY}) as service:
            yield service


@pytest.fixture(autouse=True)
def _fresh_fakes(svc: Service) -> None:
    svc.reset_fakes()


def client(svc: Service, domain: str = "A", token: str = "member_a") -> Any:
    return openai_client(f"{svc.server.url}/proxy/{svc.world.domains[domain]}/v1", svc.world.tokens[token],
                         enclave_policy(), max_retries=0)


def raw(svc: Service, route: str, body: Any, *, domain: str = "A", token: str = "member_a", **kw: Any) -> httpx.Response:
    with svc.server.client(svc.world.tokens[token]) as c:
        if isinstance(body, (bytes, str)):
            return c.post(svc.url(domain, route), content=body, headers={"content-type": "application/json"}, **kw)
        return c.post(svc.url(domain, route), json=body, **kw)


def forwarded(svc: Service, backend: str, route: str) -> dict[str, Any]:
    """The body the backend received for its last request on ``/v1/<route>``."""
    return svc.fakes[backend].json_bodies(f"/v1/{route}")[-1]


# ---- openai-python through the attested client -----------------------------------------------------------
def test_chat_non_streamed_and_streamed_sync(svc: Service) -> None:
    c = client(svc)
    answer = c.chat.completions.create(model=VLLM, messages=[{"role": "user", "content": "hello there"}])
    expected = "".join(svc.fakes["vllm"].generated_tokens([VLLM, [{"role": "user", "content": "hello there"}]]))
    assert answer.choices[0].message.content == expected
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens == 8
    assert c._client.verification_report.ok and c._client.attestor.verifications == 1

    chunks = list(c.chat.completions.create(model=VLLM, messages=[{"role": "user", "content": "hello there"}],
                                            stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected
    assert all(ch.choices for ch in chunks)            # the usage chunk the gateway asked for is gone
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_chat_and_embeddings_async(svc: Service) -> None:
    c = async_openai_client(f"{svc.server.url}/proxy/{svc.world.domains['A']}/v1", svc.world.tokens["member_a"],
                            enclave_policy(), max_retries=0)
    try:
        answer = await c.chat.completions.create(model=OLLAMA, messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content
        stream = await c.chat.completions.create(model=VLLM, messages=[{"role": "user", "content": "hi"}],
                                                 stream=True, stream_options={"include_usage": True})
        chunks = [ch async for ch in stream]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
        vectors = await c.embeddings.create(model=VLLM, input=["one", "two"])
        assert len(vectors.data) == 2 and vectors.usage.prompt_tokens == 2
        assert c._client.verification_report.ok
    finally:
        await c.close()


def test_completions_with_suffix_and_embeddings_sync(svc: Service) -> None:
    c = client(svc)
    answer = c.completions.create(model=VLLM, prompt="def add(a, b):\n    ", suffix="\n    return total\n")
    assert answer.choices[0].text
    sent = forwarded(svc, "vllm", "completions")
    assert sent["prompt"] == "def add(a, b):\n    " and sent["suffix"] == "\n    return total\n"
    streamed = list(c.completions.create(model=VLLM, prompt="x = ", suffix=" + 1", stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) and all(ch.choices for ch in streamed)
    vectors = c.embeddings.create(model=OLLAMA, input="a sentence")
    assert len(vectors.data) == 1 and vectors.data[0].embedding


def test_tool_call_round_trip(svc: Service) -> None:
    vllm = svc.fakes["vllm"]
    vllm.tool_call = ("get_weather", '{"city": "Paris"}')
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    c = client(svc)
    first = c.chat.completions.create(model=VLLM, messages=messages, tools=tools, tool_choice="auto")
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert forwarded(svc, "vllm", "chat/completions")["tools"] == tools

    vllm.tool_call = None   # the model answers once it has the tool's result
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    second = c.chat.completions.create(model=VLLM, messages=messages, tools=tools)
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    sent = forwarded(svc, "vllm", "chat/completions")
    assert sent["messages"][-1] == {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}
    assert sent["messages"][1]["tool_calls"][0]["id"] == call.id

    vllm.tool_call = ("get_weather", '{"city": "Paris"}')
    chunks = list(c.chat.completions.create(model=VLLM, messages=messages[:1], tools=tools, stream=True))
    arguments = "".join(tc.function.arguments or "" for ch in chunks for tc in (ch.choices[0].delta.tool_calls or ()))
    assert json.loads(arguments) == {"city": "Paris"}


# ---- what the gateway owns in a request, and what it leaves alone ----------------------------------------
def test_unowned_fields_reach_the_backend_unchanged_and_priority_is_dropped(svc: Service) -> None:
    fields = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
              "tool_choice": "none", "response_format": {"type": "json_object"}, "seed": 1234,
              "logprobs": True, "top_logprobs": 2, "reasoning_effort": "low", "temperature": 0.25,
              "x_cube_unknown": {"nested": [1, "two", None, 3.5], "ünïcode": "✓"}}
    body = {"model": VLLM, "messages": [{"role": "user", "content": "fields"}], "priority": -100, **fields}
    r = raw(svc, "chat/completions", body)
    assert r.status_code == 200, r.text
    sent = forwarded(svc, "vllm", "chat/completions")
    assert "priority" not in sent
    assert {k: sent[k] for k in fields} == fields
    assert sent["model"] == VLLM and sent["messages"] == body["messages"]
    assert "stream_options" not in sent                   # not a stream: nothing asked for

    stream = raw(svc, "chat/completions", {**body, "stream": True, "stream_options": {"continuous_usage_stats": False}})
    sent = forwarded(svc, "vllm", "chat/completions")
    assert sent["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    assert "priority" not in sent and {k: sent[k] for k in fields} == fields
    assert stream.status_code == 200


def test_usage_chunk_removed_unless_asked(svc: Service) -> None:
    for route, body in (("chat/completions", {"messages": [{"role": "user", "content": "u"}]}),
                        ("completions", {"prompt": "u"})):
        quiet = raw(svc, route, {"model": VLLM, "stream": True, **body})
        events, done = sse_json(quiet.text)
        assert done and events and all(e["choices"] for e in events), route
        assert forwarded(svc, "vllm", route)["stream_options"] == {"include_usage": True}
        asked = raw(svc, route, {"model": VLLM, "stream": True, "stream_options": {"include_usage": True}, **body})
        events, done = sse_json(asked.text)
        assert done and events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 8, route
        assert asked.headers["content-type"].startswith("text/event-stream")


def test_vllm_empty_tool_calls_are_stripped(svc: Service) -> None:
    msg = {"messages": [{"role": "user", "content": "t"}]}
    whole = raw(svc, "chat/completions", {"model": VLLM, **msg})
    assert "tool_calls" not in whole.json()["choices"][0]["message"]
    assert whole.json()["choices"][0]["message"]["content"]
    direct = httpx.post(f"{svc.fakes['quirky'].base_url}/v1/chat/completions",
                        json={"model": QUIRKY, "stream": True, **msg})
    assert direct.text.count('"tool_calls":[]') >= 8                     # what the gateway receives
    streamed = raw(svc, "chat/completions", {"model": QUIRKY, "stream": True, **msg})
    assert '"tool_calls":[]' not in streamed.text
    events, done = sse_json(streamed.text)
    assert done and "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"


def test_cache_salt_is_per_domain_and_set_by_the_gateway(svc: Service) -> None:
    body = {"model": VLLM, "messages": [{"role": "user", "content": "salt"}], "cache_salt": "chosen-by-client"}
    salts = {}
    for domain, token in (("A", "member_a"), ("B", "member_b")):
        assert raw(svc, "chat/completions", body, domain=domain, token=token).status_code == 200
        salts[domain] = forwarded(svc, "vllm", "chat/completions")["cache_salt"]
    assert salts["A"] == domain_cache_salt(svc.world.domains["A"])
    assert salts["B"] == domain_cache_salt(svc.world.domains["B"])
    assert salts["A"] != salts["B"] and "chosen-by-client" not in salts.values()
    raw(svc, "completions", {"model": VLLM, "prompt": "p", "stream": True})
    assert forwarded(svc, "vllm", "completions")["cache_salt"] == salts["A"]
    # A backend without the option gets no salt from the gateway.
    raw(svc, "chat/completions", {"model": QUIET, "messages": [{"role": "user", "content": "s"}]})
    assert "cache_salt" not in forwarded(svc, "quiet", "chat/completions")


@pytest.mark.parametrize("route", ["chat/completions", "completions", "embeddings"])
def test_bad_bodies_get_openai_envelopes(svc: Service, route: str) -> None:
    cases: list[tuple[Any, int, str, str | None]] = [
        (b"", 400, "invalid_json", None),
        (b'{"model": "x", ', 400, "invalid_json", None),
        (b'["a", "list"]', 400, "invalid_json", None),
        (b'{"model": NaN}', 400, "invalid_json", None),
        ({"messages": [], "prompt": "p", "input": "i"}, 400, "missing_required_parameter", "model"),
        ({"model": 7, "input": "i"}, 400, "invalid_type", "model"),
        ({"model": VLLM, "stream": "yes"}, 400, "invalid_type", "stream"),
        ({"model": VLLM, "prompt": "x" * (MAX_BODY + 10)}, 413, "body_too_large", None),
    ]
    before = len(svc.fakes["vllm"].requests)
    for body, status, code, param in cases:
        r = raw(svc, route, body)
        assert r.status_code == status, (body if isinstance(body, bytes) else code, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert (error["code"], error["param"]) == (code, param)
    assert len(svc.fakes["vllm"].requests) == before      # none of them reached the backend


def test_openai_python_sees_envelope_errors(svc: Service) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client(svc).chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert nf.value.body["code"] == "model_not_found" and nf.value.body["param"] == "model"


# ---- usage and metrics ------------------------------------------------------------------------------------
def _prompt(route: str, text: str) -> dict[str, Any]:
    return {"chat/completions": {"messages": [{"role": "user", "content": text}]},
            "completions": {"prompt": text}, "embeddings": {"input": text}}[route]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_reported_usage_is_recorded_exactly(svc: Service, route: str, stream: bool) -> None:
    domain = svc.world.domains["A"]
    before = svc.metrics_text()
    body = {"model": VLLM, "stream": stream, **_prompt(route, "count these five words")}
    r = raw(svc, route, {**body, "stream_options": {"include_usage": True}} if stream else body)
    assert r.status_code == 200
    reported = sse_json(r.text)[0][-1]["usage"] if stream else r.json()["usage"]
    record = svc.record(r)
    assert (record.model, record.route, record.stream, record.outcome) == (VLLM, route, stream, "completed")
    assert record.usage == Usage(reported["prompt_tokens"], reported["completion_tokens"], reported["total_tokens"])
    assert record.usage.completion_tokens == 8 and record.usage.prompt_tokens > 0
    after = svc.metrics_text()
    for kind, count in (("prompt", record.usage.prompt_tokens), ("completion", record.usage.completion_tokens)):
        labels = {"domain": domain, "model": VLLM, "kind": kind}
        assert sample(after, "cube_tokens_total", **labels) - sample(before, "cube_tokens_total", **labels) == count
    for hist in ("cube_inference_time_to_first_token_seconds_count", "cube_inference_duration_seconds_count"):
        assert sample(after, hist, model=VLLM, route=route) == sample(before, hist, model=VLLM, route=route) + 1


def test_embeddings_usage_is_recorded(svc: Service) -> None:
    r = raw(svc, "embeddings", {"model": VLLM, "input": ["three words here", "two words"]})
    assert r.status_code == 200
    assert svc.record(r).usage == Usage(r.json()["usage"]["prompt_tokens"], 0, r.json()["usage"]["prompt_tokens"])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_missing_usage_is_estimated_and_flagged(svc: Service, route: str, stream: bool) -> None:
    domain = svc.world.domains["A"]
    before = svc.metrics_text()
    r = raw(svc, route, {"model": QUIET, "stream": stream, "stream_options": {"include_usage": True},
                         **_prompt(route, "twelve bytes")} if stream else
            {"model": QUIET, **_prompt(route, "twelve bytes")})
    assert r.status_code == 200
    if stream:
        events, done = sse_json(r.text)
        assert done and all("usage" not in e for e in events)   # the backend really sent none
    else:
        assert "usage" not in r.json()
    usage = svc.record(r).usage
    assert usage is not None and usage.estimated
    assert usage.prompt_tokens == 3 and usage.completion_tokens > 0          # 12 bytes / 4; never a silent 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    after = svc.metrics_text()
    labels = {"domain": domain, "model": QUIET, "kind": "prompt"}
    assert sample(after, "cube_tokens_estimated_total", **labels) - sample(before, "cube_tokens_estimated_total",
                                                                           **labels) == 3
    assert sample(after, "cube_tokens_total", **labels) == sample(before, "cube_tokens_total", **labels)
    assert sample(after, "cube_inference_requests_total", domain=domain, model=QUIET, route=route,
                  outcome="completed", usage="estimated") >= 1
