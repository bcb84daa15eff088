"""The issue's "Done when", end to end: real clients complete their work against the gateway with the real
llama.cpp backend, each verifying the enclave before its PAT leaves.

- openai-python goes through our attested client (``openai_client`` / ``async_openai_client``) straight to the
  enclave;
- OpenCode, Continue's CLI and Continue's model layer (Node: they cannot embed our client) and the ``ollama``
  Python client go through the real ``cube-attest proxy``, which holds the PAT: their configs hold none, so the
  enclave's record of each request naming ``member_a``'s PAT shows the PAT reached it only over the proxy's
  attested TLS.

The llama.cpp server does not speak Ollama's native API (``/api/chat`` and friends), so the ``ollama`` client
runs against the FakeOllama backend's model; everything else runs on ``tiny-llama``.
"""

from __future__ import annotations

import time


import httpx
import ollama
import pytest
import yaml

from attestation.atls.client import async_openai_client, openai_client
from attestation.policy import Policy, policy_from_yaml, sim_policy_yaml
from enclave.attestation_api import ATTESTATION_PATH
from enclave.inference.record import InferenceRecord

from tests.atls.test_adversaries import PRODUCTION_POLICY
from tests.atls.test_proxy_cli import private_file
from tests.clients.gateway_chain import OLLAMA_MODEL, Chain, chain, gateway, start_proxy  # noqa: F401
from tests.clients.harness import continue_config, run_continue, run_continue_adapters, run_opencode
from tests.enclave.conftest import sim_provider
from tests.llama.model import EMBED

PROMPT = "say hello"


def sim_policy() -> Policy:
    """What the attested client trusts: the simulated platform every EnclaveServer runs on."""
    return policy_from_yaml(sim_policy_yaml(sim_provider().fingerprint))


def chat_records(chain: Chain, start: int, model: str) -> list[InferenceRecord]:
    """The chat records made since ``start`` for ``model``; every one must be the proxy's PAT's and completed."""
    found = [r for r in chain.records_since(start)
             if r.model == model and (r.route.endswith("chat/completions") or r.route == "api/chat")]
    assert found, f"the enclave recorded no chat for {model}: {chain.records_since(start)}"
    for record in found:
        assert record.pat_id == chain.pat_id and record.status == 200 and record.outcome == "completed", record
    return found


# ---- 1. openai-python through the attested client, straight to the enclave ---------------------------------
def test_openai_python_chat_exact_usage_and_stream_estimated(chain: Chain) -> None:
    model = chain.llama.model
    client = openai_client(chain.enclave_v1, chain.token, sim_policy(), max_retries=0, timeout=60)
    messages = [{"role": "user", "content": PROMPT}]
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=8)
    answer = raw.parse()
    assert answer.model == model and answer.choices[0].message.content
    assert client._client.verification_report.ok
    record = chain.service.record(raw.http_response)
    assert record.backend == "llama" and record.pat_id == chain.pat_id and not record.stream
    assert record.usage is not None and not record.usage.estimated
    assert record.usage.prompt_tokens == answer.usage.prompt_tokens > 0
    assert record.usage.completion_tokens == answer.usage.completion_tokens > 0

    with client.chat.completions.with_streaming_response.create(model=model, messages=messages, max_tokens=8,
                                                                stream=True) as streamed:
        chunks = list(streamed.parse())
        http_response = streamed.http_response
    assert chunks and all(chunk.choices for chunk in chunks)   # no usage-only chunk reached the client
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    record = chain.service.record(http_response)
    # llama.cpp ignores the stream_options.include_usage the gateway adds: the counts are estimated, flagged.
    assert record.stream and record.usage is not None and record.usage.estimated
    assert record.usage.prompt_tokens > 0 and record.usage.completion_tokens > 0


async def test_openai_python_async_completion_with_suffix_and_embeddings(chain: Chain) -> None:
    model = chain.llama.model
    client = async_openai_client(chain.enclave_v1, chain.token, sim_policy(), max_retries=0, timeout=60)
    try:
        completion = await client.completions.create(model=model, prompt="def hello(", suffix="\n    return x\n",
                                                     max_tokens=8)
        assert completion.model == model and completion.choices[0].text
        embedded = await client.embeddings.create(model=model, input=["hello world", "cube"])
        assert [len(item.embedding) for item in embedded.data] == [EMBED, EMBED]
        assert embedded.data[0].embedding != embedded.data[1].embedding
    finally:
        await client.close()
    assert "POST /v1/completions" in chain.llama.requests_seen()
    assert "POST /v1/embeddings" in chain.llama.requests_seen()


# ---- 2-5. Clients through cube-attest proxy, which holds the PAT ------------------------------------------
def test_the_proxy_verified_the_enclave_and_lists_the_chain_models(chain: Chain) -> None:
    assert "ACCEPTED" in chain.startup and chain.token not in chain.startup
    with httpx.Client(trust_env=False, timeout=10) as http:
        ids = {m["id"] for m in http.get(f"{chain.proxy_v1}/models").json()["data"]}
    assert {chain.llama.model, OLLAMA_MODEL} <= ids


def test_opencode_completes_a_chat_through_the_proxy(chain: Chain) -> None:
    start = chain.record_count()
    run = run_opencode(chain.proxy_v1, chain.llama.model, PROMPT, api_key="")
    assert run.exit_code == 0, run.describe()
    records = chat_records(chain, start, chain.llama.model)
    assert len(records) == 2 and all(r.stream for r in records)   # OpenCode's title request and its agent's


@pytest.mark.parametrize("provider", ["openai", "ollama"])
def test_continue_cli_completes_a_chat_through_the_proxy(chain: Chain, provider: str) -> None:
    """No apiKey in the config: Continue sends an empty ``Bearer``, the proxy replaces it with the PAT.
    ``provider: ollama`` (apiBase without /v1) calls ``{apiBase}/v1/chat/completions`` in cn 1.5."""
    api_base = chain.proxy_v1 if provider == "openai" else chain.proxy_domain
    start = chain.record_count()
    run = run_continue(continue_config(api_base, chain.llama.model, None, provider=provider), PROMPT)
    assert run.exit_code == 0, run.describe()
    assert run.refused_hosts == ["api.continue.dev"], "the offline guard saw other outside hosts"
    [record] = chat_records(chain, start, chain.llama.model)
    assert record.stream


def test_continue_model_layer_autocompletes_and_embeds_through_the_proxy(chain: Chain) -> None:
    start = chain.record_count()
    run, result = run_continue_adapters(chain.proxy_v1, chain.llama.model, "")
    assert result is not None, run.describe()
    assert result.completion
    assert [len(vector) for vector in result.embeddings] == [EMBED, EMBED]
    records = chain.records_since(start)
    assert [r.route.rsplit("/", 1)[-1] for r in records] == ["completions", "embeddings"], records
    assert all(r.pat_id == chain.pat_id and r.status == 200 and r.backend == "llama" for r in records)


def test_ollama_client_chats_on_the_native_routes_through_the_proxy(chain: Chain) -> None:
    client = ollama.Client(host=chain.proxy_domain, timeout=30, trust_env=False)
    start = chain.record_count()
    answer = client.chat(model=OLLAMA_MODEL, messages=[{"role": "user", "content": PROMPT}])
    assert answer.done and answer.message.content
    streamed = list(client.chat(model=OLLAMA_MODEL, messages=[{"role": "user", "content": PROMPT}], stream=True))
    assert streamed[-1].done and "".join(part.message.content for part in streamed) == answer.message.content
    records = chat_records(chain, start, OLLAMA_MODEL)
    assert [r.stream for r in records] == [False, True] and {r.backend for r in records} == {"ollama"}


# ---- 6. A refused enclave ----------------------------------------------------------------------------------
def requests_served(chain: Chain) -> dict[str, float]:
    """Requests the enclave has answered so far, by route template (its own request counter, which every
    request passes through, whatever the logging set-up of the test session)."""
    served: dict[str, float] = {}
    for metric in chain.service.server.ctx.metrics.requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                route = sample.labels["route"]
                served[route] = served.get(route, 0.0) + sample.value
    return served


def served_since(chain: Chain, before: dict[str, float]) -> set[str]:
    now = requests_served(chain)
    return {route for route, count in now.items() if count > before.get(route, 0.0)}


def test_a_proxy_whose_policy_refuses_the_enclave_exits_without_sending_the_pat(
    chain: Chain, tmp_path
) -> None:
    policy_file = tmp_path / "production.yaml"
    policy_file.write_text(yaml.safe_dump(PRODUCTION_POLICY.model_dump(mode="json", exclude_none=True)))
    pat_file = private_file(tmp_path / "cube.pat", chain.token + "\n")
    start = chain.record_count()
    before = requests_served(chain)
    running = start_proxy(chain.service.server.url, policy_file, pat_file)
    try:
        text = "".join(running.until("not starting"))
    finally:
        code = running.proc.wait(timeout=30)
    assert code == 1 and "REFUSED" in text and "nothing was sent" in text, text
    assert chain.token not in text
    # At most the (unauthenticated) attestation endpoint was asked: no /users/me, no /proxy/... request.
    refused_phase = served_since(chain, before)
    assert refused_phase <= {ATTESTATION_PATH}, refused_phase
    assert chain.records_since(start) == []
    # The count sees requests at all: one through the accepted proxy shows up.
    before = requests_served(chain)
    with httpx.Client(trust_env=False, timeout=10) as http:
        assert http.get(f"{chain.proxy_v1}/models").status_code == 200
    deadline = time.monotonic() + 5   # counted once the answer is sent, a moment after the client has it
    while "/proxy/{domain_id}/v1/models" not in served_since(chain, before):
        assert time.monotonic() < deadline, "the enclave's request counter did not move"
        time.sleep(0.02)
