"""Benchmark: GET /proxy/{domain}/v1/models on the real enclave app versus a bare FastAPI app.

Both servers run in their own processes, served the same way (uvicorn, one worker, httptools + uvloop, the
same self-signed TLS certificate, access log off), and are measured in the same run with ``wrk`` (its own
process) over TLS keep-alive at 64 concurrent connections. The real app authenticates a member's PAT, checks
the domain and filters the registry's models (a FakeOllama backend with 20 models, discovered in the
background); the bare app returns a constant JSON body identical to the real app's answer (same bytes,
``JSONResponse`` of the same object) with no middleware.

Goals (issue 2): real throughput >= 0.6 x bare, real p99 <= 2 x bare.

Besides req/s and latency it prints each server's CPU time per request (from /proc): on a shared 2-core machine
req/s swings with other load, CPU per request much less, and its ratio bounds the throughput ratio of a
CPU-bound single worker. ``--profile real|bare|both`` samples a server with py-spy under load afterwards;
``--access-log`` serves both with request logging on (the real app with its own JSON redacting handler).

    python bench/bench_models.py [--duration 10] [--connections 64] [--rounds 2] [--models 20] [--profile real]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOAL_THROUGHPUT = 0.6
GOAL_P99 = 2.0


# --- servers (run in child processes) -------------------------------------------------------------
def _uvicorn_run(app, args: argparse.Namespace, **logging_options) -> None:
    import uvicorn

    if not args.access_log:
        logging_options.update(access_log=False, log_level="warning")
    config = uvicorn.Config(app, host="127.0.0.1", port=args.port, ssl_certfile=args.cert, ssl_keyfile=args.key,
                            http="httptools", loop="uvloop", workers=1, server_header=False, **logging_options)
    uvicorn.Server(config).run()


def _real_settings(data_dir: Path, backend_url: str, *, log_level: str = "WARNING"):
    from enclave.backends import BackendConfig
    from enclave.config import Settings

    # Simulation, with the root secret in a private file both processes read (the parent bootstraps, the child
    # serves): the sealed state needs a platform's sealing key, which a benchmark has no use for.
    secret = data_dir / "bench-root-secret"
    if not secret.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    return Settings(data_dir=data_dir, log_level=log_level, simulate=True, server_secret_file=secret,
                    backends=[BackendConfig(name="ollama", kind="ollama", base_url=backend_url)])


def serve_real(args: argparse.Namespace) -> None:
    """The enclave app as ``cube-enclave serve`` builds it (create_app + its JSON redacting log handler)."""
    from enclave.app import create_app
    from enclave.logs import configure_logging, uvicorn_log_config

    settings = _real_settings(Path(args.data_dir), args.backend_url,
                              log_level="INFO" if args.access_log else "WARNING")
    configure_logging(settings.log_level, json_format=settings.log_json)
    _uvicorn_run(create_app(settings), args, log_config=uvicorn_log_config())


def serve_bare(args: argparse.Namespace) -> None:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    body = json.loads(Path(args.body_file).read_text())
    app = FastAPI()

    @app.get("/proxy/{domain_id}/v1/models")
    async def models(domain_id: str) -> JSONResponse:
        return JSONResponse(body)

    _uvicorn_run(app, args)  # uvicorn's default logging (its plain access log when --access-log)


# --- set-up in the parent ---------------------------------------------------------------------------
def write_cert(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return cert_path, key_path


async def bootstrap(settings) -> tuple[str, str]:
    """Bootstrap the store, then add a plain member with a models PAT; returns (domain id, member PAT)."""
    from enclave.access import DEFAULT_SCOPES
    from enclave.bootstrap import bootstrap_if_empty
    from enclave.config import load_server_secret
    from enclave.store import open_store
    from enclave.tokens import generate_token, token_hash

    from enclave.platform_secrets import PlatformSecrets

    keys = PlatformSecrets(load_server_secret(settings))
    secret = keys.pat_hmac_key()
    store = await open_store(settings, keys.row_mac_key())
    try:
        boot = await bootstrap_if_empty(store, settings, secret)
        assert boot is not None, "fresh data dir expected"
        member = await store.create_user("bench-member")
        await store.set_membership(boot.domain.id, member.id, "member")
        token = generate_token()
        await store.create_pat(user_id=member.id, name="bench", token_hash=token_hash(secret, token),
                               last4=token[-4:], scopes=DEFAULT_SCOPES,
                               expires_at=datetime.now(timezone.utc) + timedelta(days=1))
        return boot.domain.id, token
    finally:
        await store.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(mode: str, *extra: str, log: Path) -> subprocess.Popen:
    """A server child process; its output goes to ``log`` (access logs would otherwise flood the terminal)."""
    with log.open("ab") as sink:
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), mode, *extra], cwd=str(ROOT),
                                stdout=sink, stderr=subprocess.STDOUT)


def wait_ready(url: str, cert: Path, headers: dict[str, str], proc: subprocess.Popen, want_models: int) -> bytes:
    import httpx

    context = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 30
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before answering; see its log")
        try:
            response = httpx.get(url, headers=headers, verify=context, timeout=2)
            if response.status_code == 200 and len(response.json()["data"]) == want_models:
                return response.content
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise SystemExit(f"server at {url} not ready: {last}")


# --- load ---------------------------------------------------------------------------------------
@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: str
    cpu_us: float = 0.0  # server CPU time per request (user + system), steadier than rps on a busy machine


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _latency(text: str, percentile: str) -> float:
    match = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not match:
        raise SystemExit(f"cannot find the {percentile}% latency in wrk output:\n{text}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(url: str, token: str, *, duration: float, connections: int, threads: int,
            server_pid: int | None = None) -> Result:
    cpu_before = cpu_seconds(server_pid) if server_pid else 0.0
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency", "--timeout", "10s",
               "-H", f"Authorization: Bearer {token}", url]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    text = done.stdout
    if done.returncode != 0:
        raise SystemExit(f"wrk failed ({done.returncode}): {done.stderr or text}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    requests = int(re.search(r"(\d+) requests in", text).group(1))
    errors = []
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        raise SystemExit(f"{m.group(1)} of {requests} answers to {url} were not 2xx: the figures would be meaningless")
    if m := re.search(r"Socket errors: (.*)", text):
        errors.append(f"socket errors: {m.group(1)}")
    cpu_us = (cpu_seconds(server_pid) - cpu_before) / max(requests, 1) * 1e6 if server_pid else 0.0
    return Result(rps, _latency(text, "50"), _latency(text, "99"), requests, "; ".join(errors), cpu_us)


def profile_server(label: str, pid: int, url: str, token: str, args: argparse.Namespace, tmp_path: Path) -> None:
    """Sample a server with py-spy during one more load run; print the heaviest frames."""
    if shutil.which("py-spy") is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    raw = tmp_path / f"profile-{label}.txt"
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
                            "--duration", str(int(args.duration)), "--output", str(raw), "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_wrk(url, token, duration=args.duration, connections=args.connections, threads=args.threads)
    _, err = spy.communicate(timeout=60)
    if not raw.exists():
        raise SystemExit(f"py-spy produced nothing: {err}")
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        total += count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    print(f"\nprofile of the {label} server ({total} samples): top inclusive frames")
    for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[: args.profile_top]:
        print(f"  {100 * count / total:5.1f}%  {frame}")
    print("top self frames")
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[: args.profile_top]:
        print(f"  {100 * count / total:5.1f}%  {frame}")


def main_bench(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian package 'wrk')")
    from tests.fakes import FakeOllama, ollama_model

    families = ["llama", "qwen2", "gemma2", "phi3", "mistral"]
    models = [ollama_model(f"{'' if i % 3 else 'team/'}{families[i % 5]}-bench-{i}:{i % 4 + 1}b",
                           modified_at=f"2025-0{i % 9 + 1}-1{i % 10}T10:{i % 60:02d}:00.123456789Z",
                           family=families[i % 5]) for i in range(args.models)]
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="cube-bench-") as tmp, FakeOllama(models=models) as backend:
        tmp_path = Path(tmp)
        cert, key = write_cert(tmp_path)
        data_dir = tmp_path / "data"
        domain_id, token = asyncio.run(bootstrap(_real_settings(data_dir, backend.base_url)))
        real_port, bare_port = free_port(), free_port()
        path = f"/proxy/{domain_id}/v1/models"
        headers = {"Authorization": f"Bearer {token}"}
        try:
            common = ["--cert", str(cert), "--key", str(key)] + (["--access-log"] if args.access_log else [])
            procs.append(spawn("_serve-real", "--port", str(real_port), "--data-dir", str(data_dir),
                               "--backend-url", backend.base_url, *common, log=tmp_path / "real.log"))
            real_url = f"https://127.0.0.1:{real_port}{path}"
            body = wait_ready(real_url, cert, headers, procs[-1], args.models)
            body_file = tmp_path / "body.json"
            body_file.write_bytes(body)
            procs.append(spawn("_serve-bare", "--port", str(bare_port), "--body-file", str(body_file), *common,
                               log=tmp_path / "bare.log"))
            bare_url = f"https://127.0.0.1:{bare_port}{path}"
            bare_body = wait_ready(bare_url, cert, headers, procs[-1], args.models)
            assert bare_body == body, "the bare app must answer the same bytes"

            print(f"cpus={os.cpu_count()} body={len(body)} bytes models={args.models} connections={args.connections} "
                  f"wrk threads={args.threads} duration={args.duration:g}s x {args.rounds} rounds, 1 uvicorn worker "
                  f"each, access log {'on' if args.access_log else 'off'}")
            for url in (bare_url, real_url):  # warm-up: TLS sessions, auth cache, first-request imports
                run_wrk(url, token, duration=min(2.0, args.duration), connections=args.connections,
                        threads=args.threads)
            results: dict[str, list[Result]] = {"bare": [], "real": []}
            for round_no in range(args.rounds):
                for label, url, pid in (("bare", bare_url, procs[1].pid), ("real", real_url, procs[0].pid)):
                    result = run_wrk(url, token, duration=args.duration, connections=args.connections,
                                     threads=args.threads, server_pid=pid)
                    results[label].append(result)
                    note = f", {result.errors}" if result.errors else ""
                    print(f"round {round_no + 1} {label:4}: {result.rps:9.1f} req/s  p50 {result.p50_ms:7.2f} ms  "
                          f"p99 {result.p99_ms:7.2f} ms  cpu {result.cpu_us:6.1f} us/req  "
                          f"({result.requests} requests{note})")
            if args.profile in ("real", "both"):
                profile_server("real", procs[0].pid, real_url, token, args, tmp_path)
            if args.profile in ("bare", "both"):
                profile_server("bare", procs[1].pid, bare_url, token, args, tmp_path)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    bare_rps, real_rps = mean([r.rps for r in results["bare"]]), mean([r.rps for r in results["real"]])
    bare_p50, real_p50 = mean([r.p50_ms for r in results["bare"]]), mean([r.p50_ms for r in results["real"]])
    bare_p99, real_p99 = mean([r.p99_ms for r in results["bare"]]), mean([r.p99_ms for r in results["real"]])
    bare_cpu, real_cpu = mean([r.cpu_us for r in results["bare"]]), mean([r.cpu_us for r in results["real"]])
    throughput_ratio, p99_ratio = real_rps / bare_rps, real_p99 / bare_p99
    print()
    print(f"{'':6}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'cpu us/req':>12}   (mean of {args.rounds} rounds)")
    print(f"{'bare':6}{bare_rps:10.1f}{bare_p50:10.2f}{bare_p99:10.2f}{bare_cpu:12.1f}")
    print(f"{'real':6}{real_rps:10.1f}{real_p50:10.2f}{real_p99:10.2f}{real_cpu:12.1f}")
    print(f"throughput ratio real/bare = {throughput_ratio:.2f}  (goal >= {GOAL_THROUGHPUT}): "
          f"{'met' if throughput_ratio >= GOAL_THROUGHPUT else 'MISSED'}")
    print(f"p99 ratio real/bare        = {p99_ratio:.2f}  (goal <= {GOAL_P99}): "
          f"{'met' if p99_ratio <= GOAL_P99 else 'MISSED'}")
    print(f"p50 ratio real/bare        = {real_p50 / bare_p50:.2f}")
    print(f"server CPU per request     = {real_cpu / bare_cpu:.2f} x bare  (CPU-bound ceiling on throughput ratio: "
          f"{bare_cpu / real_cpu:.2f}; steadier than req/s when the machine is shared)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode")
    for mode in ("_serve-real", "_serve-bare"):
        child = sub.add_parser(mode)
        child.add_argument("--port", type=int, required=True)
        child.add_argument("--cert", required=True)
        child.add_argument("--key", required=True)
        child.add_argument("--data-dir")
        child.add_argument("--backend-url")
        child.add_argument("--body-file")
        child.add_argument("--access-log", action="store_true")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (the machine's other core serves)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating bare/real measurement rounds")
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--access-log", action="store_true",
                        help="serve both with access logging on (real: its JSON redacting logs at INFO, as "
                             "cube-enclave serve does; bare: uvicorn's default access log)")
    parser.add_argument("--profile", choices=("real", "bare", "both"),
                        help="afterwards, sample that server with py-spy (pip install py-spy) under load")
    parser.add_argument("--profile-top", type=int, default=45)
    args = parser.parse_args(argv)
    if args.mode == "_serve-real":
        serve_real(args)
        return 0
    if args.mode == "_serve-bare":
        serve_bare(args)
        return 0
    return main_bench(args)


if __name__ == "__main__":
    sys.exit(main())
