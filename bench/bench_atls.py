"""Attested TLS cost against plain TLS, same server, same run, same machine.

cold: first request of a new client (attested: handshake + certificate evidence + nonce round
trip + two policy appraisals; plain: handshake with the certificate trusted as a CA).
warm: a request on an open keep-alive connection (attested: verdict cached).
Goals: cold <= 3x, warm <= 1.1x.  Run: python bench/bench_atls.py [--rounds N]
"""

from __future__ import annotations

import argparse
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402

from attestation.atls.client import AttestedClient  # noqa: E402
from attestation.policy import policy_from_yaml, sim_policy_yaml  # noqa: E402
from attestation.providers import SimProvider  # noqa: E402
from enclave.attestation_api import attestation_router  # noqa: E402
from enclave.tls import TlsManager, uvicorn_config  # noqa: E402

AUTH = {"Authorization": "Bearer cube_pat_bench"}


def make_app(tls: TlsManager) -> FastAPI:
    app = FastAPI()
    app.include_router(attestation_router(tls, per_connection_rate=1e6, burst=1_000_000))

    @app.get("/v1/ping")
    async def ping(request: Request) -> JSONResponse:
        return JSONResponse({"ok": bool(request.headers.get("authorization"))})

    return app


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="cold clients per kind (default 40)")
    parser.add_argument("--warm", type=int, default=400, help="warm requests per kind (default 400)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        provider = SimProvider(Path(tmp))
        policy = policy_from_yaml(sim_policy_yaml(provider.fingerprint))
        tls = TlsManager(provider, hostnames=["127.0.0.1"], rotate_every=None)
        tls.start()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn_config(tls, make_app(tls), host="127.0.0.1", port=port,
                                               log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        url = f"https://127.0.0.1:{port}"
        ca = ssl.create_default_context(
            cadata=tls.current.certificate.public_bytes(serialization.Encoding.PEM).decode())

        def cold_attested() -> float:
            t = time.perf_counter()
            with AttestedClient(url, policy=policy) as c:
                assert c.get("/v1/ping", headers=AUTH).status_code == 200
            return time.perf_counter() - t

        def cold_plain() -> float:
            t = time.perf_counter()
            with httpx.Client(base_url=url, verify=ca) as c:
                assert c.get("/v1/ping", headers=AUTH).status_code == 200
            return time.perf_counter() - t

        for _ in range(3):  # warm up imports, caches, the server
            cold_attested()
            cold_plain()
        cold_a, cold_p = [], []
        for _ in range(args.rounds):  # interleaved so drift hits both kinds alike
            cold_a.append(cold_attested())
            cold_p.append(cold_plain())

        warm_a, warm_p = [], []
        with AttestedClient(url, policy=policy) as a, httpx.Client(base_url=url, verify=ca) as p:
            a.get("/v1/ping", headers=AUTH)
            p.get("/v1/ping", headers=AUTH)
            for _ in range(args.warm):
                t = time.perf_counter()
                a.get("/v1/ping", headers=AUTH)
                warm_a.append(time.perf_counter() - t)
                t = time.perf_counter()
                p.get("/v1/ping", headers=AUTH)
                warm_p.append(time.perf_counter() - t)
            assert a.attestor.verifications == 1

        server.should_exit = server.force_exit = True
        thread.join(timeout=10)
        tls.stop()

    cold_ratio = median_ms(cold_a) / median_ms(cold_p)
    warm_ratio = median_ms(warm_a) / median_ms(warm_p)
    print(f"cold first request  attested {median_ms(cold_a):7.2f} ms   plain TLS {median_ms(cold_p):7.2f} ms   "
          f"ratio {cold_ratio:5.2f}x (goal <= 3x)  [{args.rounds} clients each, median]")
    print(f"warm keep-alive     attested {median_ms(warm_a):7.2f} ms   plain TLS {median_ms(warm_p):7.2f} ms   "
          f"ratio {warm_ratio:5.2f}x (goal <= 1.1x)  [{args.warm} requests each, median]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
