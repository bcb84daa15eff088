"""Best-of-rounds throughput, shared by the verification benchmarks (run by hand, see bench/*.py)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_rates(fns: list[Callable[[], object]], seconds: float, rounds: int = 5, batch: int = 1) -> list[float]:
    """Best-of-rounds calls per second of each function, rounds interleaved so that load on the shared
    machine hits every function alike; ``batch`` calls between clock reads (for sub-microsecond calls)."""
    for fn in fns:
        fn()  # warm-up and smoke test
    best = [0.0] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            count = 0
            start = time.perf_counter()
            deadline = start + seconds / rounds
            while True:
                for _ in range(batch):
                    fn()
                count += batch
                now = time.perf_counter()
                if now >= deadline:
                    break
            best[i] = max(best[i], count / (now - start))
    return best
