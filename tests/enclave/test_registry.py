"""The models registry over real sockets: discovery, routing, failure isolation, pull/remove, background refresh."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from enclave.backends import BackendConfig
from enclave.registry import (
    BackendUnavailable,
    InvalidModelName,
    ModelNotFound,
    PullError,
    PullModelNotFound,
    Registry,
    Route,
    UnknownBackend,
    UnsupportedOperation,
)
from tests.fakes import FakeOllama, ollama_model
from tests.fakes.fixtures import VLLM_TEST_KEY, fake_ollama, fake_vllm, fake_vllm_with_key  # noqa: F401

SHARED = "llama3.2:3b"


def config(name: str, kind: str, url: str, **extra) -> BackendConfig:
    return BackendConfig(name=name, kind=kind, base_url=url, read_timeout=extra.pop("read_timeout", 1.0), **extra)


@pytest.fixture
def two_ollamas() -> Iterator[tuple[FakeOllama, FakeOllama]]:
    """Two Ollama hosts that both have SHARED (with different modified_at) plus one model of their own."""
    first = FakeOllama(models=[ollama_model(SHARED, modified_at="2025-01-01T00:00:00Z"), ollama_model("only-a:1")])
    second = FakeOllama(models=[ollama_model(SHARED, modified_at="2025-06-01T00:00:00Z"), ollama_model("only-b:1")])
    with first, second:
        yield first, second


async def test_models_from_several_backends_sorted_by_id(fake_ollama, fake_vllm):
    async with Registry([config("local", "ollama", fake_ollama.base_url),
                         config("gpu", "vllm", fake_vllm.base_url)], refresh_interval=0) as registry:
        listed = [card.id for card in registry.models()]
        assert listed == sorted(listed) == [
            "hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M", "jdoe/tinyllama:1.1b", "llama3.2:3b",
            "meta-llama/Llama-3.1-8B-Instruct", "sql-lora"]
        assert registry.get("llama3.2:3b").to_openai() == {
            "id": "llama3.2:3b", "object": "model", "created": 1741940813, "owned_by": "library"}
        assert registry.get("sql-lora").backend == "gpu"
        assert registry.get("sql-lora").parent == "meta-llama/Llama-3.1-8B-Instruct"
        assert registry.get("meta-llama/Llama-3.1-8B-Instruct").max_model_len == 131072
        assert registry.get("nope") is None
        assert [(s.name, s.kind, s.up, s.error, s.models) for s in registry.status()] == [
            ("local", "ollama", True, None, 3), ("gpu", "vllm", True, None, 2)]
        assert all(s.last_ok is not None and s.last_ok.tzinfo is not None for s in registry.status())


async def test_equal_priority_first_configured_wins_and_shadow_takes_over(two_ollamas):
    first, second = two_ollamas
    async with Registry([config("a", "ollama", first.base_url), config("b", "ollama", second.base_url)],
                        refresh_interval=0) as registry:
        assert registry.get(SHARED).backend == "a"
        assert registry.get(SHARED).created == 1735689600  # a's modified_at, not b's
        assert registry.route(SHARED) == Route(SHARED, "a", ("b",))
        assert [card.id for card in registry.models()] == [SHARED, "only-a:1", "only-b:1"]  # listed once
        assert {s.name: s.shadowed for s in registry.status()} == {"a": 0, "b": 1}

        first.answering = False
        await registry.refresh()
        assert registry.get(SHARED).backend == "b"
        assert registry.get(SHARED).created == 1748736000
        assert registry.route(SHARED) == Route(SHARED, "b", ())
        assert [card.id for card in registry.models()] == [SHARED, "only-b:1"]

        first.answering = True
        await registry.refresh()
        assert registry.route(SHARED) == Route(SHARED, "a", ("b",))


async def test_higher_priority_wins_over_config_order(two_ollamas):
    first, second = two_ollamas
    backends = [config("a", "ollama", first.base_url), config("b", "ollama", second.base_url, priority=5)]
    async with Registry(backends, refresh_interval=0) as registry:
        assert registry.route(SHARED) == Route(SHARED, "b", ("a",))
        second.remove_model(SHARED)
        await registry.refresh()
        assert registry.route(SHARED) == Route(SHARED, "a", ())


async def test_routing_rule_is_independent_of_discovery_timing(two_ollamas):
    """The winner does not depend on which backend answered first."""
    first, second = two_ollamas
    first.delay = 0.3
    async with Registry([config("a", "ollama", first.base_url), config("b", "ollama", second.base_url)],
                        refresh_interval=0) as registry:
        assert registry.route(SHARED).backend == "a"


async def test_down_backend_drops_its_models_reports_why_and_comes_back(fake_ollama, fake_vllm):
    async with Registry([config("local", "ollama", fake_ollama.base_url),
                         config("gpu", "vllm", fake_vllm.base_url)], refresh_interval=0) as registry:
        ok_before = {s.name: s.last_ok for s in registry.status()}
        fake_vllm.answering = False
        await registry.refresh()
        assert {card.backend for card in registry.models()} == {"local"}
        assert registry.get("sql-lora") is None
        local, gpu = registry.status()
        assert registry.any_up()
        assert (local.up, local.error, local.models) == (True, None, 3)
        assert (gpu.up, gpu.models) == (False, 0)
        assert gpu.error.startswith("cannot connect")
        assert gpu.last_ok == ok_before["gpu"]  # the last success is remembered
        assert registry.backend_models("gpu") == []

        fake_ollama.answering = False
        await registry.refresh()
        assert not registry.any_up() and registry.models() == []
        fake_ollama.answering = True
        fake_vllm.answering = True
        await registry.refresh()
        assert registry.get("sql-lora").backend == "gpu"
        assert registry.status()[1].up and registry.status()[1].error is None


async def test_malformed_backend_is_down_and_others_unaffected(fake_ollama, fake_vllm):
    async with Registry([config("local", "ollama", fake_ollama.base_url),
                         config("gpu", "vllm", fake_vllm.base_url)], refresh_interval=0) as registry:
        fake_ollama.malformed = "not_json"
        await registry.refresh()
        assert [card.id for card in registry.models()] == ["meta-llama/Llama-3.1-8B-Instruct", "sql-lora"]
        local = registry.status()[0]
        assert not local.up and local.error.startswith("malformed response from GET /api/tags: not JSON")


async def test_slow_backend_times_out_without_holding_others(fake_ollama, fake_vllm):
    fake_ollama.delay = 3.0
    backends = [config("local", "ollama", fake_ollama.base_url, read_timeout=0.3),
                config("gpu", "vllm", fake_vllm.base_url)]
    async with Registry(backends, refresh_interval=0) as registry:
        assert {card.backend for card in registry.models()} == {"gpu"}
        assert registry.status()[0].error == "no answer within the 0.3s read timeout"


async def test_vllm_api_key_through_registry(fake_vllm_with_key):
    backends = [config("keyed", "vllm", fake_vllm_with_key.base_url, api_key=VLLM_TEST_KEY),
                config("keyless", "vllm", fake_vllm_with_key.base_url)]
    async with Registry(backends, refresh_interval=0) as registry:
        assert registry.route("sql-lora") == Route("sql-lora", "keyed", ())
        keyless = registry.status()[1]
        assert not keyless.up and "HTTP 401" in keyless.error and "needs an api_key" in keyless.error


async def test_vllm_created_is_stable_across_refreshes(fake_vllm):
    async with Registry([config("gpu", "vllm", fake_vllm.base_url)], refresh_interval=0) as registry:
        before = {card.id: card.created for card in registry.models()}
        await asyncio.sleep(1.1)  # vLLM's own "created" moves on with the clock
        await registry.refresh()
        assert {card.id: card.created for card in registry.models()} == before


async def test_models_do_no_io_and_status_before_first_refresh(fake_ollama):
    registry = Registry([config("local", "ollama", fake_ollama.base_url)], refresh_interval=0)
    assert registry.models() == [] and not registry.any_up()
    status = registry.status()[0]
    assert (status.up, status.error, status.last_ok, status.models) == (False, "not refreshed yet", None, 0)
    await registry.refresh()
    assert registry.any_up()
    seen = len(fake_ollama.requests)
    fake_ollama.answering = False
    for _ in range(5):
        assert len(registry.models()) == 3  # served from the cache: no request, no error
    assert len(fake_ollama.requests) == seen
    await registry.stop()


async def test_background_refresh_picks_up_changes(fake_ollama):
    registry = Registry([config("local", "ollama", fake_ollama.base_url)], refresh_interval=0.05)
    await registry.start()
    try:
        fake_ollama.add_model("phi3:mini")
        for _ in range(200):
            if registry.get("phi3:mini") is not None:
                break
            await asyncio.sleep(0.025)
        assert registry.get("phi3:mini") is not None
        fake_ollama.answering = False
        for _ in range(200):
            if not registry.status()[0].up:
                break
            await asyncio.sleep(0.025)
        assert registry.models() == [] and registry.status()[0].error.startswith("cannot connect")
    finally:
        await registry.stop()
    assert registry._task is None  # the loop is gone after stop()


def test_duplicate_backend_names_are_refused():
    with pytest.raises(ValueError, match="repeated: x"):
        Registry([config("x", "ollama", "http://127.0.0.1:1"), config("x", "vllm", "http://127.0.0.1:2")])


async def test_pull_streams_progress_then_lists_the_model(fake_ollama, fake_vllm):
    async with Registry([config("local", "ollama", fake_ollama.base_url),
                         config("gpu", "vllm", fake_vllm.base_url)], refresh_interval=0) as registry:
        assert registry.get("qwen2.5:0.5b") is None
        progress = [p async for p in registry.pull("local", "qwen2.5:0.5b")]
        assert progress[0] == {"status": "pulling manifest"} and progress[-1] == {"status": "success"}
        card = registry.get("qwen2.5:0.5b")
        assert card is not None and card.backend == "local" and card.owned_by == "library"


async def test_pull_checks_before_streaming(fake_ollama, fake_vllm):
    async with Registry([config("local", "ollama", fake_ollama.base_url),
                         config("gpu", "vllm", fake_vllm.base_url)], refresh_interval=0) as registry:
        requests_before = len(fake_ollama.requests) + len(fake_vllm.requests)
        with pytest.raises(UnknownBackend, match="no backend named 'elsewhere'"):
            registry.pull("elsewhere", "qwen2.5:0.5b")
        with pytest.raises(UnsupportedOperation, match="backend 'gpu' \\(vllm\\) cannot pull models"):
            registry.pull("gpu", "qwen2.5:0.5b")
        with pytest.raises(InvalidModelName):
            registry.pull("local", "bad name")
        assert len(fake_ollama.requests) + len(fake_vllm.requests) == requests_before


async def test_pull_errors_are_typed_and_the_registry_still_refreshes(fake_ollama):
    async with Registry([config("local", "ollama", fake_ollama.base_url)], refresh_interval=0) as registry:
        with pytest.raises(PullModelNotFound) as info:
            async for _ in registry.pull("local", "does-not-exist:1b"):
                pass
        assert info.value.message == "pull model manifest: file does not exist"
        assert str(info.value) == ("model 'does-not-exist:1b' not found on backend 'local': "
                                   "pull model manifest: file does not exist")   # wrapped once, not twice
        assert (info.value.model, info.value.backend) == ("does-not-exist:1b", "local")
        fake_ollama.pull_error = "max retries exceeded"
        fake_ollama.add_model("arrived-meanwhile:1")
        with pytest.raises(PullError, match="max retries exceeded"):
            async for _ in registry.pull("local", "qwen2.5:0.5b"):
                pass
        assert registry.get("arrived-meanwhile:1") is not None  # refreshed after the failed pull


async def test_pull_on_down_backend_is_unavailable(fake_ollama):
    async with Registry([config("local", "ollama", fake_ollama.base_url)], refresh_interval=0) as registry:
        fake_ollama.answering = False
        with pytest.raises(BackendUnavailable):
            async for _ in registry.pull("local", "qwen2.5:0.5b"):
                pass
        assert registry.models() == [] and not registry.status()[0].up


async def test_remove_routed_copy_uncovers_the_shadow(two_ollamas):
    first, second = two_ollamas
    async with Registry([config("a", "ollama", first.base_url), config("b", "ollama", second.base_url)],
                        refresh_interval=0) as registry:
        await registry.remove(SHARED)
        assert SHARED not in first.model_names and SHARED in second.model_names
        assert registry.route(SHARED) == Route(SHARED, "b", ())
        await registry.remove("only-a:1", backend="a")
        assert registry.get("only-a:1") is None
        with pytest.raises(ModelNotFound):
            await registry.remove("only-a:1")
        with pytest.raises(ModelNotFound) as info:
            await registry.remove("only-a:1", backend="a")
        assert info.value.backend == "a"
        with pytest.raises(UnknownBackend):
            await registry.remove(SHARED, backend="zzz")


async def test_remove_on_vllm_is_unsupported(fake_vllm):
    fake_vllm.set_served([{"id": "odd name with spaces", "max_model_len": 2048}, {"id": "sql-lora"}])
    async with Registry([config("gpu", "vllm", fake_vllm.base_url)], refresh_interval=0) as registry:
        with pytest.raises(UnsupportedOperation, match="cannot delete models: vLLM serves"):
            await registry.remove("sql-lora")
        with pytest.raises(UnsupportedOperation):  # the kind is checked before the (Ollama) name rules
            await registry.remove("odd name with spaces")
        assert registry.get("sql-lora") is not None


async def test_status_entries_are_immutable_snapshots(fake_ollama):
    async with Registry([config("local", "ollama", fake_ollama.base_url)], refresh_interval=0) as registry:
        first = registry.status()
        with pytest.raises(AttributeError):
            first[0].up = False  # type: ignore[misc]
        fake_ollama.answering = False
        await registry.refresh()
        assert first[0].up and not registry.status()[0].up


async def test_crawling_backend_is_cut_off_by_the_overall_budget(fake_ollama, fake_vllm):
    """Each read arrives within read_timeout, but the whole listing would take far longer than the budget."""
    fake_ollama.trickle = 0.05
    backends = [config("local", "ollama", fake_ollama.base_url, read_timeout=0.2, connect_timeout=0.2),
                config("gpu", "vllm", fake_vllm.base_url)]
    async with Registry(backends, refresh_interval=0) as registry:
        local = registry.status()[0]
        assert (local.up, local.error) == (False, "discovery took longer than 0.6s")
        assert [card.backend for card in registry.models()] == ["gpu", "gpu"]
