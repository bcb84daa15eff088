"""POST /v1/verify throughput (run by hand: python bench/bench_verify.py [--seconds 5] [--concurrency 8]).

Starts `cube-host serve` (uvicorn, one worker) on loopback with a throw-away data directory, then
measures requests/second for:
  * GET /health                  (the HTTP stack's ceiling on this machine, the baseline),
  * SNP evidence (VCEK + ASK/ARK carried in the evidence; chain verification cached after the first),
  * TDX v5 evidence carrying its Intel collateral (pcs-2026-02, verified at 2026-02-03),
and prints each as a ratio of the baseline. Vectors are read from ../shared/vectors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT.parent / "shared" / "vectors"
sys.path.insert(0, str(ROOT))

from attestation.evidence import encode_cmw  # noqa: E402
from tests.host.conftest import snp_evidence, tdx_evidence  # noqa: E402

CBOR = {"content-type": "application/cmw+cbor"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _run(url: str, seconds: float, concurrency: int, method: str, path: str, body: bytes | None,
               params: dict | None, expect: str | None) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            if method == "GET":
                r = await client.get(path)
            else:
                r = await client.post(path, content=body, params=params, headers=CBOR)
            if r.status_code != 200 or (expect is not None and expect not in r.text):
                raise RuntimeError(f"unexpected answer {r.status_code}: {r.text[:200]}")
            done += 1

    async with httpx.AsyncClient(base_url=url, timeout=30,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        start = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        return done / (time.perf_counter() - start)


_WRK_SCRIPT = """
local f = assert(io.open(os.getenv("CUBE_BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/cmw+cbor"
"""


def _wrk(url: str, seconds: float, concurrency: int, path: str, body: bytes | None, params: dict | None,
         tmp: Path) -> float:
    """Requests/second measured by wrk (C load generator, so the client is not the bottleneck)."""
    target = url + path + (("?" + httpx.QueryParams(params).__str__()) if params else "")
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", target]
    env = dict(os.environ)
    if body is not None:
        (tmp / "body.bin").write_bytes(body)
        (tmp / "post.lua").write_text(_WRK_SCRIPT)
        env["CUBE_BENCH_BODY"] = str(tmp / "body.bin")
        cmd[1:1] = ["-s", str(tmp / "post.lua")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw error answers:\n{out}")
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("Requests/sec")))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--httpx", action="store_true", help="use the Python client even when wrk is installed")
    args = ap.parse_args()
    expected = json.loads((VECTORS / "expected.json").read_text())
    snp_entry = next(e for e in expected["snp"] if e["report"] == "snp/trustee--test-report.bin")
    tdx_entry = next(e for e in expected["tdx"] if e["quote"].endswith("quote_v5_sample.dat"))
    snp_body = encode_cmw(snp_evidence(VECTORS, snp_entry))
    snp_at = (datetime.fromisoformat(snp_entry["vek_not_before"]) + timedelta(days=1)).isoformat()
    tdx_body = encode_cmw(tdx_evidence(VECTORS, tdx_entry))
    tdx_at = tdx_entry["tcb_evaluation"]["at"]

    tmp = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    port = _free_port()
    config = tmp / "host.yaml"
    config.write_text(
        f"data_dir: {tmp / 'data'}\nlisten: 127.0.0.1:{port}\npolicies: {{default: builtin:default}}\n"
        "verify: {allow_time_override: true, fetch_collateral: false}\ncollateral: {enabled: false}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "host.cli", "serve", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        else:
            raise RuntimeError("cube-host serve did not start")
        runs = [
            ("GET /health (baseline)", "GET", "/health", None, None, None),
            ("POST /v1/verify SNP", "POST", "/v1/verify", snp_body, {"at": snp_at}, None),
            ("POST /v1/verify TDX+coll.", "POST", "/v1/verify", tdx_body, {"at": tdx_at}, None),
        ]
        results = {}
        use_wrk = shutil.which("wrk") is not None and not args.httpx
        for name, method, path, body, params, expect in runs:
            asyncio.run(_run(url, 0.5, args.concurrency, method, path, body, params, expect))  # warm-up, caches
            if use_wrk:
                results[name] = _wrk(url, args.seconds, args.concurrency, path, body, params, tmp)
            else:
                results[name] = asyncio.run(_run(url, args.seconds, args.concurrency, method, path, body, params,
                                                 expect))
        # sanity: the benchmarked requests really were affirmed
        for body, at in ((snp_body, snp_at), (tdx_body, tdx_at)):
            r = httpx.post(url + "/v1/verify", content=body, params={"at": at},
                           headers={**CBOR, "accept": "application/json"})
            assert r.json()["status"] == "affirming", r.text
        base = results["GET /health (baseline)"]
        print(f"{'request':28s} {'req/s':>9s} {'x baseline':>11s}   ({'wrk' if use_wrk else 'httpx'}, "
              f"concurrency {args.concurrency}, {args.seconds:g}s each, {os.cpu_count()} CPUs)")
        for name, rps in results.items():
            print(f"{name:28s} {rps:9.1f} {rps / base:11.3f}")
        return 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
