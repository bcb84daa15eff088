"""Prometheus metrics: one registry per app so several apps (tests) never collide."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_MAX_CACHED_SERIES = 1024

if TYPE_CHECKING:
    from enclave.inference.usage import Usage


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("cube_http_requests_total", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("cube_http_request_duration_seconds", "HTTP request latency by route template",
                                 ["route", "method"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.auth_failures = Counter("cube_auth_failures_total", "Refused API keys by reason", ["reason"],
                                     registry=self.registry)
        self.join_requests = Counter("cube_join_requests_total", "Requests of replicas joining this one, by "
                                     "outcome (accepted | refused) and reason", ["outcome", "reason"],
                                     registry=self.registry)
        self.integrity_failures = Counter("cube_store_integrity_failures_total", "Store rows refused because their "
                                          "MAC did not match (edited, swapped or inserted outside the enclave)",
                                          ["table"], registry=self.registry)
        self.quota_refusals = Counter("cube_quota_refusals_total", "Inference requests refused by a limit or budget "
                                      "(enclave.quotas), by kind and subject level (pat | user | domain)",
                                      ["kind", "level"], registry=self.registry)
        self.backend_up = Gauge("cube_backend_up", "1 if the backend answered its last discovery", ["backend", "kind"],
                                registry=self.registry)
        self.models = Gauge("cube_registry_models", "Routable models in the registry", registry=self.registry)
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        # Inference. ``domain`` is the domain id and ``model`` a registry id the caller may use, so both label
        # sets stay as small as the platform's own lists.
        self.tokens = Counter("cube_tokens_total", "Tokens the backends reported, by domain, model and kind "
                              "(prompt | completion)", ["domain", "model", "kind"], registry=self.registry)
        self.tokens_estimated = Counter("cube_tokens_estimated_total", "Tokens estimated by the gateway where the "
                                        "backend reported none", ["domain", "model", "kind"], registry=self.registry)
        self.inference = Counter("cube_inference_requests_total", "Inference requests by route, outcome and "
                                 "whether their usage was reported or estimated",
                                 ["domain", "model", "route", "outcome", "usage"], registry=self.registry)
        slow = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
        self.ttft = Histogram("cube_inference_time_to_first_token_seconds", "From request to the first relayed "
                              "event (streams) or the whole answer", ["model", "route"], registry=self.registry,
                              buckets=slow)
        self.duration = Histogram("cube_inference_duration_seconds", "From request to the end of the answer",
                                  ["model", "route"], registry=self.registry, buckets=slow)

    def inference_finished(self, domain: str, model: str, route: str, outcome: str, usage: "Usage",
                           ttft: float | None, duration: float) -> None:
        tokens = self.tokens_estimated if usage.estimated else self.tokens
        if usage.prompt_tokens:
            tokens.labels(domain=domain, model=model, kind="prompt").inc(usage.prompt_tokens)
        if usage.completion_tokens:
            tokens.labels(domain=domain, model=model, kind="completion").inc(usage.completion_tokens)
        self.inference.labels(domain=domain, model=model, route=route, outcome=outcome,
                              usage="estimated" if usage.estimated else "reported").inc()
        if ttft is not None:
            self.ttft.labels(model=model, route=route).observe(ttft)
        self.duration.labels(model=model, route=route).observe(duration)

    def integrity_failed(self, table: str) -> None:
        self.integrity_failures.labels(table=table).inc()

    def quota_refused(self, kind: str, level: str) -> None:
        self.quota_refusals.labels(kind=kind, level=level).inc()

    def auth_failed(self, reason: str) -> None:
        self.auth_failures.labels(reason=reason).inc()

    def request_series(self, route: str, method: str, status: int) -> tuple[Counter, Histogram]:
        """The (request counter, latency histogram) children for these labels, looked up once per label set
        (``.labels()`` validates and hashes the labels under a lock on every call). Route templates, methods and
        statuses form a small set; the cache stops growing at ``_MAX_CACHED_SERIES`` all the same."""
        key = (route, method, status)
        series = self._series.get(key)
        if series is None:
            series = (self.requests.labels(route=route, method=method, status=str(status)),
                      self.latency.labels(route=route, method=method))
            if len(self._series) < _MAX_CACHED_SERIES:
                self._series[key] = series
        return series


class MetricsMiddleware:
    """Counts requests by the matched route's path template (never the raw path, so no ids in labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = getattr(scope.get("route"), "path", None) or "unmatched"
            requests, latency = self.metrics.request_series(template, scope.get("method", ""), status)
            requests.inc()
            latency.observe(time.perf_counter() - start)

