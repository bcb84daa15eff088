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
                                     "first_byte_timeouts (sent nothing), connect_failed (every enclave target "
                                     "refused, unreachable or timed out), connect_retried (one failed, the next "
                                     "was tried), idle_closed, half_close_closed", labels=["event"])
        data = CounterMetricFamily("cube_host_relay_bytes", "Bytes relayed (up = client to enclave)",
                                   labels=["direction"])
        active = GaugeMetricFamily("cube_host_relay_active_connections", "Relay connections open now")
        names = ("accepted", "rejected", "source_rejected", "first_byte_timeouts", "connect_failed", "connect_retried",
                 "idle_closed", "half_close_closed")
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
        yield from self._per_target()

    def _per_target(self) -> Iterator[Metric]:
        """Per enclave target: open connections, state (1 on the current one), connections and failures."""
        open_now = GaugeMetricFamily("cube_host_relay_target_open_connections",
                                     "Connections open to a relay target now", labels=["target"])
        state = GaugeMetricFamily("cube_host_relay_target_state", "A relay target's state (1 = current): healthy, "
                                  "unhealthy (failed its probes), draining", labels=["target", "state"])
        total = CounterMetricFamily("cube_host_relay_target_connections", "Connections relayed to a target",
                                    labels=["target"])
        failed = CounterMetricFamily("cube_host_relay_target_failures", "Failed client connects and health probes "
                                     "of a target", labels=["target", "kind"])
        for relay in self.relays:
            for t in relay.pool.targets:
                open_now.add_metric([t.name], t.open)
                for name in ("healthy", "unhealthy", "draining"):
                    state.add_metric([t.name, name], 1 if t.state == name else 0)
                total.add_metric([t.name], t.connections)
                failed.add_metric([t.name, "connect"], t.connect_failures)
                failed.add_metric([t.name, "probe"], t.probe_failures)
        yield open_now
        yield state
        yield total
        yield failed


RELAYS = RelayCollector()
REGISTRY.register(RELAYS)
