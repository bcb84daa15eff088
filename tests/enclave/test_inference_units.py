"""Units of enclave.inference: event framing, answer editors, admission, body rewriting, usage."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, strategies as st

from enclave.inference.admission import Admission, Overloaded
from enclave.inference.body import BodyError, domain_cache_salt, parse_body, upstream_body
from enclave.inference.editors import OllamaStreamEditor, OpenAIStreamEditor, edit_openai_body
from enclave.inference.framing import NDJSON_TERMINATORS, SSE_TERMINATORS, EventSplitter
from enclave.inference.usage import Usage, estimate, find_openai_usage, prompt_text_bytes, usage_from_ollama


# ---- framing ------------------------------------------------------------------------------------------------
@given(events=st.lists(st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b),
                       min_size=1, max_size=12),
       cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=10),
       ending=st.sampled_from((b"\n\n", b"\r\n\r\n")))
def test_sse_splitter_returns_whole_events_however_the_bytes_arrive(events, cuts, ending) -> None:
    wire = b"".join(b"data: " + e + ending for e in events)
    splitter = EventSplitter(SSE_TERMINATORS)
    out: list[bytes] = []
    start = 0
    for cut in sorted(c for c in cuts if c < len(wire)) + [len(wire)]:
        out += splitter.feed(wire[start:cut])
        start = max(start, cut)
    assert out == [b"data: " + e + ending for e in events]
    assert splitter.pending == b"" and splitter.terminator == ending


def test_splitter_keeps_a_partial_tail_back() -> None:
    splitter = EventSplitter(NDJSON_TERMINATORS)
    assert splitter.feed(b'{"a":1}\n{"b":') == [b'{"a":1}\n']
    assert splitter.pending == b'{"b":'
    assert splitter.feed(b'2}\n') == [b'{"b":2}\n'] and splitter.pending == b""


# ---- editors ------------------------------------------------------------------------------------------------
USAGE_CHUNK = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}\n\n'


@pytest.mark.parametrize("drop", [True, False])
def test_usage_chunk_is_read_and_dropped_only_when_not_asked(drop: bool) -> None:
    editor = OpenAIStreamEditor(drop_usage_chunk=drop, strip_tool_calls=False)
    assert editor.edit(USAGE_CHUNK) == (None if drop else USAGE_CHUNK)
    assert editor.usage == Usage(3, 5, 8)


def test_text_events_are_forwarded_verbatim_and_counted() -> None:
    editor = OpenAIStreamEditor(drop_usage_chunk=True, strip_tool_calls=True)
    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    token = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}\r\n\r\n'
    assert editor.edit(role) == role and editor.edit(token) == token
    assert editor.text_events == 1 and editor.usage is None
    assert editor.edit(b"data: [DONE]\n\n") == b"data: [DONE]\n\n" and editor.done


def test_empty_tool_calls_are_stripped_from_stream_events_and_bodies() -> None:
    editor = OpenAIStreamEditor(drop_usage_chunk=True, strip_tool_calls=True)
    event = b'data: {"choices":[{"index":0,"delta":{"tool_calls":[],"content":"x"}}]}\r\n\r\n'
    edited = editor.edit(event)
    assert edited is not None and edited.endswith(b"\r\n\r\n") and b"tool_calls" not in edited
    assert json.loads(edited[6:]) == {"choices": [{"index": 0, "delta": {"content": "x"}}]}
    keep = b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]}}]}\n\n'
    assert editor.edit(keep) == keep
    body = b'{"choices":[{"message":{"content":"a","tool_calls":[]}}],"usage":{"prompt_tokens":1,"total_tokens":2,' \
           b'"completion_tokens":1}}'
    stripped, usage = edit_openai_body(body, strip_tool_calls=True)
    assert b"tool_calls" not in stripped and usage == Usage(1, 1, 2)
    assert edit_openai_body(body, strip_tool_calls=False)[0] == body


def test_ollama_editor_reads_the_final_counts() -> None:
    editor = OllamaStreamEditor()
    assert editor.edit(b'{"response":"a","done":false}\n') == b'{"response":"a","done":false}\n'
    editor.edit(b'{"response":"","done":true,"prompt_eval_count":4,"eval_count":2}\n')
    assert editor.done and editor.usage == Usage(4, 2, 6) and editor.text_events == 1
    editor.edit(b'{"error":"boom"}\n')
    assert editor.backend_error


# ---- admission ----------------------------------------------------------------------------------------------
async def test_admission_is_fifo_bounded_and_survives_cancellation() -> None:
    gate = Admission(max_in_flight=1, max_queued=2, queue_timeout=5)
    await gate.acquire()
    order: list[str] = []

    async def waiter(name: str) -> None:
        await gate.acquire()
        order.append(name)

    first = asyncio.create_task(waiter("first"))
    gone = asyncio.create_task(waiter("gone"))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as full:
        await gate.acquire()
    assert full.value.retry_after >= 1
    third = asyncio.create_task(waiter("third"))   # the queue is full: this one is refused at once
    await asyncio.sleep(0)
    assert third.done() and isinstance(third.exception(), Overloaded)
    gone.cancel()
    await asyncio.sleep(0)
    assert gate.queued == 1
    gate.release()
    await first
    assert order == ["first"] and gate.in_flight == 1
    gate.release()
    assert gate.in_flight == 0 and gate.queued == 0


async def test_admission_queue_timeout() -> None:
    gate = Admission(max_in_flight=1, max_queued=1, queue_timeout=0.05)
    await gate.acquire()
    with pytest.raises(Overloaded):
        await gate.acquire()
    assert gate.queued == 0 and gate.in_flight == 1


# ---- body ---------------------------------------------------------------------------------------------------
def test_upstream_body_owns_only_its_fields() -> None:
    raw = json.dumps({"model": "m", "stream": True, "priority": 9, "seed": 1, "x": {"y": [1, None]},
                      "stream_options": {"other": 1}, "cache_salt": "mine"}).encode()
    parsed = parse_body(raw)
    assert (parsed.model, parsed.stream, parsed.wants_usage) == ("m", True, False)
    sent = json.loads(upstream_body(parsed, ask_usage=True, cache_salt=domain_cache_salt("d1")))
    assert sent == {"model": "m", "stream": True, "seed": 1, "x": {"y": [1, None]},
                    "stream_options": {"other": 1, "include_usage": True}, "cache_salt": domain_cache_salt("d1")}
    assert domain_cache_salt("d1") != domain_cache_salt("d2")
    plain = json.loads(upstream_body(parse_body(b'{"model":"m","cache_salt":"mine"}'), ask_usage=True, cache_salt=None))
    assert plain == {"model": "m", "cache_salt": "mine"}          # not a stream: no stream_options added


@pytest.mark.parametrize("raw, code, param", [
    (b"", "invalid_json", None), (b"  \n", "invalid_json", None), (b"{", "invalid_json", None),
    (b"[]", "invalid_json", None), (b'{"model": Infinity}', "invalid_json", None), (b"\xff", "invalid_json", None),
    (b"{}", "missing_required_parameter", "model"), (b'{"model": null}', "missing_required_parameter", "model"),
    (b'{"model": ""}', "invalid_type", "model"), (b'{"model": ["m"]}', "invalid_type", "model"),
    (b'{"model": "m", "stream": 1}', "invalid_type", "stream"),
    (b'{"model": "m", "stream_options": true}', "invalid_type", "stream_options"),
])
def test_bad_bodies(raw: bytes, code: str, param: str | None) -> None:
    with pytest.raises(BodyError) as err:
        parse_body(raw)
    assert (err.value.code, err.value.param) == (code, param)


# ---- usage --------------------------------------------------------------------------------------------------
def test_usage_parsing_and_estimates() -> None:
    big = b'{"data":[{"embedding":[' + b"0.1," * 10000 + b'0.2]}],"text":"\\"usage\\": {","usage":{"prompt_tokens":7,' \
          b'"total_tokens":7}}'
    assert find_openai_usage(big) == Usage(7, 0, 7)
    assert find_openai_usage(b'{"choices":[]}') is None
    assert usage_from_ollama({"eval_count": 5}) == Usage(0, 5, 5)      # omitempty dropped a 0 prompt count
    assert usage_from_ollama({"done": True}) is None
    assert estimate(9, 4) == Usage(3, 4, 7, estimated=True)
    assert prompt_text_bytes({"messages": [{"content": "abc"}, {"content": [{"type": "text", "text": "dé"}]}],
                              "suffix": "z"}) == 3 + 3 + 1


def test_a_prompt_of_token_ids_is_estimated_as_that_many_tokens() -> None:
    """OpenAI's completions and embeddings take token ids (``prompt: [1, 2, 3]``, ``input: [[1, 2], [3]]``); a
    backend that reports no usage had such a prompt estimated as 0 tokens."""
    assert estimate(prompt_text_bytes({"prompt": [5, 6, 7, 8] * 50}), 0).prompt_tokens == 200
    assert estimate(prompt_text_bytes({"input": [[1, 2], [3]]}), 0).prompt_tokens == 3
    assert prompt_text_bytes({"prompt": [True, None, 1.5]}) == 0


def test_a_count_beyond_what_a_backend_can_mean_is_no_count() -> None:
    """A backend reporting 2**70 tokens: no count (the usage is then estimated), never a number the ledger's
    64-bit columns cannot hold (one such row made every write of the ledger fail)."""
    huge = 2**70
    assert find_openai_usage(b'{"usage":{"prompt_tokens":%d,"total_tokens":%d}}' % (huge, huge)) is None
    assert find_openai_usage(b'{"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":%d}}' % huge) \
        == Usage(3, 2, 5)
    assert usage_from_ollama({"eval_count": huge, "prompt_eval_count": huge}) is None
    assert usage_from_ollama({"eval_count": 2**53 - 1}) == Usage(0, 2**53 - 1, 2**53 - 1)


def test_an_estimated_prompt_counts_the_tool_definitions() -> None:
    """An agent's request (OpenCode: ~10 tools) is mostly tool schemas, which the model reads as prompt."""
    tools = [{"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}}]
    plain = prompt_text_bytes({"messages": [{"content": "abc"}]})
    with_tools = prompt_text_bytes({"messages": [{"content": "abc"}], "tools": tools})
    assert with_tools == plain + len(b'[{"type":"function","function":{"name":"read","parameters":{"type":"object"}}}]')
