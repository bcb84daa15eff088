"""What the agent verified last, per policy and enclave: a small JSON file in the data directory.

Written by the verification service after every POST /v1/verify, read by ``cube-host status``.
An enclave is identified by platform and launch measurement (SNP MEASUREMENT, TDX MRTD), which is
what an operator recognises; only the newest ``max_enclaves`` per policy are kept.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from attestation.fetch import atomic_write
from attestation.verdict import Verdict

STATUS_FILE = "status.json"


def enclave_id(verdict: Verdict) -> str:
    claims = verdict.claims or {}
    measurement = claims.get("measurement") or claims.get("mrtd")
    return f"{verdict.platform or 'unknown'}:{measurement or 'unknown'}"


class StatusStore:
    def __init__(self, data_dir: Path, *, max_enclaves: int = 64, min_write_interval: float = 1.0) -> None:
        self.path = Path(data_dir) / STATUS_FILE
        self.max_enclaves = max_enclaves
        # Writing the file costs more than a verification; under load, coalesce writes to one per interval.
        self.min_write_interval = min_write_interval
        self._lock = threading.Lock()
        self._state: dict[str, Any] = self._read(self.path)
        self._last_write = 0.0
        self._dirty = False
        self._timer: threading.Timer | None = None

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return {"version": 1, "policies": {}}
        if not isinstance(state, dict) or not isinstance(state.get("policies"), dict):
            return {"version": 1, "policies": {}}
        return state

    def record(self, *, policy: str, verdict: Verdict, ear_status: str, nonce: str | None,
               when: datetime | None = None) -> dict[str, Any]:
        when = when or datetime.now(timezone.utc)
        entry = {
            "at": when.isoformat(timespec="seconds"),
            "enclave": enclave_id(verdict),
            "ear_status": ear_status,
            "verdict": verdict.status,
            "platform": verdict.platform,
            "product": verdict.product,
            "error": verdict.error,
            "nonce": nonce,
        }
        with self._lock:
            policies = self._state.setdefault("policies", {})
            slot = policies.setdefault(policy, {"last": None, "enclaves": {}, "counts": {}})
            slot["last"] = entry
            enclaves = slot.setdefault("enclaves", {})
            enclaves.pop(entry["enclave"], None)
            enclaves[entry["enclave"]] = entry  # dict order = recency
            while len(enclaves) > self.max_enclaves:
                enclaves.pop(next(iter(enclaves)))
            counts = slot.setdefault("counts", {})
            counts[ear_status] = counts.get(ear_status, 0) + 1
            self._dirty = True
            wait = self._last_write + self.min_write_interval - time.monotonic()
            if wait <= 0:
                self._write()
            elif self._timer is None:
                self._timer = threading.Timer(wait, self.flush)
                self._timer.daemon = True
                self._timer.start()
        return entry

    def flush(self) -> None:
        """Write pending changes now (also called on shutdown)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._dirty:
                self._write()

    def _write(self) -> None:
        self._dirty = False
        self._last_write = time.monotonic()
        atomic_write(self.path, json.dumps(self._state, indent=1).encode(), mode=0o600)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return json.loads(json.dumps(self._state))


def read_status(data_dir: Path) -> dict[str, Any]:
    return StatusStore._read(Path(data_dir) / STATUS_FILE)
