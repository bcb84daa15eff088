"""Prometheus metrics of the host agent (one process-wide registry, served at /metrics)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:  # pragma: no cover
    from .relay import Relay

REGISTRY = CollectorRegistry(auto_describe=True)

VERIFY_RESULTS = Counter("cube_host_verify_results", "POST /v1/verify results by EAR status and policy",
                         ["status", "policy"], registry=REGISTRY)
VERIFY_REJECTED = Counter("cube_host_verify_rejected_requests", "POST /v1/verify requests refused with 4xx",
                          ["code"], registry=REGISTRY)
COLLATERAL_REQUESTS = Counter("cube_host_collateral_requests", "Collateral cache requests by source "
                              "(cache, seed, upstream, stale, error)", ["service", "source"], registry=REGISTRY)
COLLATERAL_UPSTREAM_FETCHES = Counter("cube_host_collateral_upstream_fetches", "Upstream fetches by outcome",
                                      ["service", "outcome"], registry=REGISTRY)




class RelayCollector:
    """Reads relay counters at scrape time, so the byte pump pays nothing per chunk."""

    def __init__(self) -> None:
        self.relays: list["Relay"] = []

    def collect(self) -> Iterator[Metric]:
        events = CounterMetricFamily("cube_host_relay_connections", "Relay connection events: accepted, "
                                     "rejected (over the limit), source_rejected (over the per-source limit), "
                                     "first_byte_timeouts (sent nothing), connect_failed (enclave refused, "
                                     "unreachable or timed out), idle_closed, half_close_closed", labels=["event"])
        data = CounterMetricFamily("cube_host_relay_bytes", "Bytes relayed (up = client to enclave)",
                                   labels=["direction"])
        active = GaugeMetricFamily("cube_host_relay_active_connections", "Relay connections open now")
        names = ("accepted", "rejected", "source_rejected", "first_byte_timeouts", "connect_failed", "idle_closed",
                 "half_close_closed")
        totals = dict.fromkeys(names, 0)
        up = down = live = 0
        for relay in self.relays:
            st = relay.stats
            for name in names:
                totals[name] += getattr(st, name)
            up += st.bytes_up
            down += st.bytes_down
            live += st.active
        for name, value in totals.items():
            events.add_metric([name], value)
        data.add_metric(["up"], up)
        data.add_metric(["down"], down)
        active.add_metric([], live)
        yield events
        yield data
        yield active


RELAYS = RelayCollector()
REGISTRY.register(RELAYS)
