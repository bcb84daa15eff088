"""What the inference tests share: a service wired to backend fakes, fake variants, SSE and metrics readers."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from attestation.policy import Policy, policy_from_yaml, sim_policy_yaml
from enclave.inference.record import InferenceRecord
from enclave.store import Store

from tests.enclave.conftest import SERVER_SECRET, EnclaveServer, FakeClock, World, make_settings, seed_world, sim_provider, PAT_KEY, ROW_KEY
from tests.fakes.base import FakeBackend
from tests.fakes.generation import DEFAULT_TOKEN_COUNT
from tests.fakes.streaming import Reply
from tests.fakes.vllm import FakeVllm


def enclave_policy() -> Policy:
    """The policy trusting the simulated platform every EnclaveServer runs on."""
    return policy_from_yaml(sim_policy_yaml(sim_provider().fingerprint))


#: The inference controls of a well-behaved backend (see FakeBackend's docstring).
CALM_CONTROLS: dict[str, Any] = {"delay": 0.0, "event_interval": 0.0, "fail_after": None, "stall_after": None,
                                 "upstream_status": None, "tokens": None, "token_count": DEFAULT_TOKEN_COUNT,
                                 "tool_call": None}


def reset(fake: FakeBackend) -> None:
    """Back to a well-behaved backend (module-scoped fakes are shared by the tests of a module)."""
    for name, value in CALM_CONTROLS.items():
        setattr(fake, name, value)
    for counter in ("max_in_flight_seen", "streams_started", "streams_finished", "streams_errored", "streams_failed",
                    "streams_cancelled", "requests_cancelled"):
        setattr(fake, counter, 0)
    fake.cancelled_at.clear()
    fake.requests.clear()


class QuirkyVllm(FakeVllm):
    """FakeVllm with two behaviours of real servers switched on by flags:

    * ``report_usage = False``: no ``usage`` anywhere, streamed or not (the llama.cpp server ignores
      ``stream_options.include_usage``);
    * ``empty_tool_calls_in_deltas = True``: every stream delta carries ``"tool_calls":[]`` (vLLM releases whose
      DeltaMessage renders the empty default).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.report_usage = True
        self.empty_tool_calls_in_deltas = False

    def reply(self, reply: Reply) -> Any:
        if reply.status == 200 and not self.report_usage:
            if reply.events is None:
                doc = json.loads(reply.body)
                doc.pop("usage", None)
                reply.body = json.dumps(doc, separators=(",", ":")).encode()
            else:
                reply.events = [e for e in reply.events if b'"choices":[]' not in e]
                reply.events = [e.replace(b',"usage":null', b"") for e in reply.events]
        if reply.events is not None and self.empty_tool_calls_in_deltas:
            reply.events = [e.replace(b'"delta":{', b'"delta":{"tool_calls":[],', 1) for e in reply.events]
        return super().reply(reply)


@dataclass
class Service:
    server: EnclaveServer
    world: World
    fakes: dict[str, FakeBackend]
    records: list[InferenceRecord] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    def reset_fakes(self) -> None:
        for fake in self.fakes.values():
            if fake.answering:
                reset(fake)

    def url(self, domain: str, route: str) -> str:
        return f"{self.server.url}/proxy/{self.world.domains[domain]}/v1/{route}"

    def record(self, response: httpx.Response, within: float = 5.0) -> InferenceRecord:
        """The inference record of an answered request (by its x-request-id); it is made as the answer ends, so
        it may land a moment after the client has read the last byte."""
        request_id = response.headers["x-request-id"]
        deadline = time.monotonic() + within
        while True:
            with self._lock:
                found = [r for r in self.records if r.request_id == request_id]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"no inference record for request {request_id}"
            time.sleep(0.01)

    def http(self, token: str = "member_a", timeout: float | httpx.Timeout = 30) -> httpx.Client:
        """An HTTPS client of the service holding one of the world's keys (by label)."""
        return httpx.Client(base_url=self.server.url, verify=self.server.client_ssl(), timeout=timeout,
                            headers={"Authorization": f"Bearer {self.world.tokens[token]}"})

    def latest(self, model: str) -> InferenceRecord:
        """The newest record for ``model`` (for refusals, whose x-request-id names no record)."""
        with self._lock:
            return [r for r in self.records if r.model == model][-1]

    def metrics_text(self) -> str:
        with self.server.client(self.world.tokens["superadmin"]) as c:
            r = c.get("/metrics")
        assert r.status_code == 200, r.text
        return r.text


def start_service(tmp: Path, backends: list[tuple[dict[str, Any], FakeBackend]], *,
                  setup: Callable[[Store, World], Any] | None = None, **settings: Any) -> Service:
    """The service over the given (backend config without base_url, running fake) pairs, with the test world
    seeded (``setup(store, world)`` may add to it) and every inference record collected."""
    configs = [{**config, "base_url": fake.base_url} for config, fake in backends]
    settings_ = make_settings(tmp, backends=configs, **settings)

    async def seed() -> World:
        store = await Store.open(settings_.effective_database_url(), row_key=ROW_KEY, schema=settings_.database_schema)
        try:
            world = await seed_world(store, PAT_KEY, FakeClock()())
            if setup is not None:
                await setup(store, world)
            return world
        finally:
            await store.close()

    world = asyncio.run(seed())
    server = EnclaveServer(settings_, clock=FakeClock()).start()
    service = Service(server, world, {config["name"]: fake for config, fake in backends})

    def sink(record: InferenceRecord) -> None:
        with service._lock:
            service.records.append(record)

    server.ctx.gateway.recorder.sinks.append(sink)
    return service


def sse_data(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order (asserting every event is whole)."""
    assert text.endswith("\n\n"), f"stream does not end with a whole event: {text[-80:]!r}"
    out = []
    for event in text.split("\n\n")[:-1]:
        lines = [line for line in event.split("\n") if line.startswith("data:")]
        assert len(lines) == 1, f"not one data line: {event!r}"
        out.append(lines[0][5:].strip())
    return out


def sse_json(text: str) -> tuple[list[dict[str, Any]], bool]:
    """(the JSON events, whether ``[DONE]`` ended the stream); every non-[DONE] event must be valid JSON."""
    data = sse_data(text)
    done = bool(data) and data[-1] == "[DONE]"
    return [json.loads(d) for d in (data[:-1] if done else data)], done


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0
