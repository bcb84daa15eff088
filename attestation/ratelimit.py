"""Keyed token buckets, bounded in memory: the one rate limiter the enclave and the host agent share."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable


class TokenBucket:
    """Token buckets per key (key -> tokens), bounded in memory (least recently seen evicted).

    ``rate`` tokens per second refill each bucket up to ``burst``; a new key starts full.
    """

    def __init__(self, rate: float, burst: int, *, max_clients: int = 10_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: Hashable) -> float:
        """0.0 when a token was taken, else the seconds until one is available (nothing taken)."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return wait


def client_key(host: str) -> str:
    """The bucket of a client address: its IPv6 /64 (one host usually holds a whole /64, so per-address
    buckets would let it hop addresses freely); IPv4-mapped IPv6 counts as the IPv4 address."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
