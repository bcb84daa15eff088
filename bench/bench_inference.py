"""Benchmark: streamed chat completions direct, through the enclave, and through LiteLLM proxy, in one run.

Three paths to the same streaming backend (``_sse_backend``: 256 events per response at a fixed pace, every
event's token different, each stamped with the backend's monotonic clock):

* direct: load generator -> backend, plain HTTP (the baseline every "added" figure subtracts);
* enclave: ``cube-enclave serve --simulate`` in its own process, attested TLS (its key attested once with
  the attested client and the simulated platform's policy before the run; the load generator then trusts the
  certificate the simulated platform publishes), a member's PAT, the access check on ``model``;
* plain: the same enclave with its usage ledger switched off by a bench-only launcher (``_enclave_plain``:
  ``Ledger.record`` a no-op; the product has no such switch), no limits: the baseline of issue 11;
* limits: the same enclave with limits and budgets configured (``quotas.defaults``: every kind on every
  level, high enough never to refuse) and the ledger on, to price their bookkeeping (issue 11);
* litellm: LiteLLM proxy (``litellm[proxy]``, one worker, in its own venv ``.venv-litellm``, installed here
  on first use) with the backend as an openai-compatible model, its master key, plain HTTP.

The load generator (``_loadgen``, its own process, raw asyncio sockets) measures time to first token and
each event's one-way delay; the gateways' CPU time comes from /proc (user + system of the process and its
children), their events from what the load generator received (every stream checked complete and in order).
Printed: added TTFT p50/p99 at 1 and 64 concurrent streams, added per-event delay p99, gateway CPU-seconds
per 1,000 relayed events and the enclave/LiteLLM ratio, and the enclave's RSS growth while 1,000 slow
streams (one event a second) are open at once.

Goals (issue 9): added TTFT p50 < 1 ms at 1 stream and p99 < 5 ms at 64; CPU per 1,000 events <= 0.3 x
LiteLLM's; 1,000 open streams with < 300 MB RSS growth. Issue 11: limits (all kinds) and the ledger add at
most 5% gateway CPU per request and no TTFT beyond noise: printed as plain -> enclave -> limits, with the
ratios over plain.

Noise (a shared 2-core machine): the phases run in ``--rounds`` rounds; each round runs every path at 1
stream, then every path at 64, the three enclaves in an order rotated by one each round (so none always
runs first or after the same neighbour); direct runs in every round, LiteLLM in the first only. Figures
pool the rounds (TTFT percentiles over all streams, CPU summed); "noise" is the largest round-to-round
spread of the statistic among the three enclaves. Each phase's CPU is read ``--settle`` s after its load
ends, so the ledger's and the limits' background writes of that phase are counted in it.

    python bench/bench_inference.py [--quick] [--paths direct,plain,enclave,limits,litellm] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for entry in (str(ROOT), str(HERE)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

from _sse_backend import SLOW_MODEL, STREAM_MODEL  # noqa: E402
from bench_models import bootstrap, free_port  # noqa: E402

LOADGEN = HERE / "_loadgen.py"
PLAIN_LAUNCHER = HERE / "_enclave_plain.py"   # bench-only: the enclave without its usage ledger
BACKEND = HERE / "_sse_backend.py"
LITELLM_VENV = Path(os.environ.get("CUBE_BENCH_LITELLM_VENV", ROOT / ".venv-litellm"))
# An exact, known release (1.107.0 was a compromised upload); 1.108 is what the figures came from.
LITELLM_REQUIREMENT = os.environ.get("CUBE_BENCH_LITELLM_REQUIREMENT", "litellm[proxy]==1.108.7")

GOAL_TTFT_P50_1_MS = 1.0
GOAL_TTFT_P99_64_MS = 5.0
GOAL_CPU_RATIO = 0.3
GOAL_RSS_MB = 300.0
GOAL_LIMITS_CPU_RATIO = 1.05
#: The enclave paths of issue 11, baseline first: neither limits nor ledger, ledger, limits + ledger.
ENCLAVE_VARIANTS = ("plain", "enclave", "limits")
VARIANT_LABELS = {"plain": "plain (no limits, no ledger)", "enclave": "enclave (no limits, ledger)",
                  "limits": "limits (limits all kinds + ledger)"}
PATHS = ("direct", *ENCLAVE_VARIANTS, "litellm")
#: Limits for the ``limits`` path: every kind at every level, never reached by the run.
BENCH_LIMITS = {"rpm": 10**7, "tpm": 10**12, "concurrent": 10**5, "tokens_per_day": 10**15,
                "tokens_per_month": 10**15}


# --- processes ----------------------------------------------------------------------------------------
def _tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (LiteLLM may run its server in a child)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process tree, from /proc (Linux)."""
    ticks = 0
    for member in _tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    total_kb = 0
    for member in _tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def _raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


def spawn(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("ab") as sink:
        return subprocess.Popen(command, cwd=str(ROOT), stdout=sink, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_raise_nofile, start_new_session=True)


def wait_for(what: str, ready: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before it was ready:\n{_tail(log)}")
        try:
            if ready():
                return
        except Exception:   # not up yet: refused connection, 503 while discovering, ...
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} not ready within {timeout:g} s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Gateway:
    """One path the load generator drives: a gateway, or (``direct``) the backend itself."""

    name: str
    port: int
    path: str
    headers: list[str]
    pid: int | None = None          # the gateway process (CPU, RSS); None for direct
    cafile: Path | None = None

    def loadgen_args(self, model: str, events: int) -> list[str]:
        args = ["--port", str(self.port), "--path", self.path, "--model", model, "--events", str(events)]
        for header in self.headers:
            args += ["--header", header]
        if self.cafile is not None:
            args += ["--cafile", str(self.cafile)]
        return args


def start_backend(tmp: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    port_file, log = tmp / "backend.port", tmp / "backend.log"
    proc = spawn([sys.executable, str(BACKEND), "--port-file", str(port_file), "--events", str(args.events),
                  "--interval-ms", str(args.interval_ms), "--slow-interval-ms", str(args.slow_interval_ms)], log)
    wait_for("the backend", lambda: port_file.exists() and port_file.read_text() != "", proc, log, 20)
    return proc, int(port_file.read_text())


# --- the enclave ------------------------------------------------------------------------------------------
def _enclave_backend(backend_url: str, streams: int) -> dict:
    """The backend's config entry; the inference limits are raised where this enclave version has them, so
    the benchmark measures relaying, not the (default 32) in-flight bound."""
    from enclave.backends import BackendConfig

    entry: dict = {"name": "bench", "kind": "vllm", "base_url": backend_url}
    wanted = {"max_in_flight": streams + 64, "max_queued": streams + 64, "idle_timeout": 60.0,
              "first_byte_timeout": 60.0, "read_timeout": 60.0}
    entry.update({k: v for k, v in wanted.items() if k in BackendConfig.model_fields})
    return entry


def start_enclave(tmp: Path, backend_port: int, args: argparse.Namespace, *, name: str = "enclave",
                  quotas: dict | None = None, ledger: bool = True) -> tuple[subprocess.Popen, Gateway]:
    """``ledger=False``: started through the bench-only launcher that switches the usage ledger off."""
    from cryptography import x509

    from attestation.atls.binding import spki_der_of, spki_sha256
    from attestation.atls.client import AttestedClient
    from attestation.policy import load_policy
    from enclave.backends import BackendConfig
    from enclave.config import Settings

    data_dir, log, port = tmp / name, tmp / f"{name}.log", free_port()
    backend = _enclave_backend(f"http://127.0.0.1:{backend_port}", args.hold_streams)
    # Simulation takes its root secret from the configuration (the platform secrets are sealed otherwise,
    # which bootstrapping the store from here cannot open).
    secret = secrets.token_urlsafe(48)
    settings = Settings(data_dir=data_dir, simulate=True, backends=[BackendConfig(**backend)], server_secret=secret)
    domain_id, token = asyncio.run(bootstrap(settings))   # a plain member with models:read + models:infer
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "backends": [backend],
        "limits": {"max_connections": args.hold_streams + 200},
        "attestation": {"rotate_every_seconds": 24 * 3600, "kds_url": None, "pcs_url": None},
        "log_level": "INFO",   # as deployed: one JSON access line per request
        "server_secret": secret,
    }
    if quotas is not None:
        config["quotas"] = quotas
    config_path = tmp / f"{name}.yaml"
    config_path.touch(mode=0o600)   # it holds the simulation's secret: owner-only, as the enclave requires
    config_path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUBE_ENCLAVE__")}
    program = ["-m", "enclave.main"] if ledger else [str(PLAIN_LAUNCHER)]
    proc = spawn([sys.executable, *program, "serve", "--simulate", "--config", str(config_path),
                  "--data-dir", str(data_dir), "--port", str(port)], log, env=env)
    policy_file, cert_file = data_dir / "sim-policy.yaml", data_dir / "server-cert.pem"
    wait_for("the enclave", lambda: policy_file.exists() and cert_file.exists(), proc, log, 60)
    url = f"https://127.0.0.1:{port}"
    listing = f"/proxy/{domain_id}/v1/models"
    auth = {"Authorization": f"Bearer {token}"}
    with AttestedClient(url, policy=load_policy(policy_file)) as client:
        def models_listed() -> bool:
            answer = client.get(listing, headers=auth)
            return answer.status_code == 200 and {STREAM_MODEL, SLOW_MODEL} <= {m["id"] for m in answer.json()["data"]}

        wait_for("the enclave's models list", models_listed, proc, log, 60)
        pinned = client.attestor.pinned
    # The load generator trusts the certificate file as is: only once it is the key just attested.
    published = spki_sha256(spki_der_of(x509.load_pem_x509_certificate(cert_file.read_bytes())))
    if published != pinned:
        raise SystemExit("the published certificate is not the attested key: refusing to trust it")
    return proc, Gateway(name, port, f"/proxy/{domain_id}/v1/chat/completions",
                         [f"Authorization: Bearer {token}"], proc.pid, cert_file)


# --- LiteLLM ----------------------------------------------------------------------------------------------
def ensure_litellm() -> Path:
    """The LiteLLM venv's ``litellm`` command, installing it on first use (its pins would fight ours)."""
    command = LITELLM_VENV / "bin" / "litellm"
    if command.exists():
        return command
    shown = LITELLM_VENV.relative_to(ROOT) if LITELLM_VENV.is_relative_to(ROOT) else LITELLM_VENV
    print(f"installing {LITELLM_REQUIREMENT} into {shown} (once)...", flush=True)
    base = getattr(sys, "_base_executable", None) or "python3"
    subprocess.run([base, "-m", "venv", str(LITELLM_VENV)], check=True)
    subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", LITELLM_REQUIREMENT], check=True)
    if not command.exists():
        raise SystemExit(f"{LITELLM_REQUIREMENT} installed no litellm command in {LITELLM_VENV}")
    return command


def litellm_version(command: Path) -> str:
    done = subprocess.run([str(command.parent / "python"), "-c",
                           "import importlib.metadata as m; print(m.version('litellm'))"],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() or "?"


def start_litellm(tmp: Path, backend_port: int) -> tuple[subprocess.Popen, Gateway]:
    import httpx

    command = ensure_litellm()
    port, log, key = free_port(), tmp / "litellm.log", "sk-bench-" + secrets.token_hex(16)
    config = {
        "model_list": [{"model_name": model, "litellm_params": {
            "model": f"openai/{model}", "api_base": f"http://127.0.0.1:{backend_port}/v1", "api_key": "none"}}
            for model in (STREAM_MODEL, SLOW_MODEL)],
        "general_settings": {"master_key": key},
        "litellm_settings": {"telemetry": False},
    }
    config_path = tmp / "litellm.yaml"
    config_path.write_text(yaml.safe_dump(config))
    # Offline: the bundled model-cost map instead of fetching it from GitHub at start.
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "NO_DOCS": "True"}
    proc = spawn([str(command), "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port),
                  "--num_workers", "1"], log, env=env)
    wait_for("LiteLLM", lambda: httpx.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=2).status_code == 200,
             proc, log, 180)
    return proc, Gateway("litellm", port, "/v1/chat/completions", [f"Authorization: Bearer {key}"], proc.pid)


# --- load and figures -------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for an empty list."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


@dataclass
class Phase:
    """One load run on one path, or (``pooled``) the rounds of one path at one concurrency summed."""

    gateway: str
    streams: int          # concurrent
    ttft: list[float]     # ms, one per completed stream
    delay: list[float]    # ms, per-event one-way delay (event 2 onwards)
    events: int
    completed: int        # streams completed
    errors: int
    first_error: str
    cpu_s: float          # gateway CPU during the phase and its settle
    seconds: float        # the load's duration
    rounds: int = 1

    @property
    def ttft_p50(self) -> float:
        return percentile(self.ttft, 50)

    @property
    def ttft_p99(self) -> float:
        return percentile(self.ttft, 99)

    @property
    def delay_p50(self) -> float:
        return percentile(self.delay, 50)

    @property
    def delay_p99(self) -> float:
        return percentile(self.delay, 99)

    @property
    def cpu_per_1000(self) -> float:
        return self.cpu_s / self.events * 1000 if self.events else float("nan")

    @property
    def cpu_per_request(self) -> float:
        return self.cpu_s / self.completed if self.completed else float("nan")


def pooled(phases: list[Phase]) -> Phase:
    """The rounds of one path at one concurrency as one phase: samples joined, counts and CPU summed."""
    first = phases[0]
    return Phase(first.gateway, first.streams, [x for p in phases for x in p.ttft],
                 [x for p in phases for x in p.delay], sum(p.events for p in phases),
                 sum(p.completed for p in phases), sum(p.errors for p in phases),
                 next((p.first_error for p in phases if p.first_error), ""), sum(p.cpu_s for p in phases),
                 sum(p.seconds for p in phases), len(phases))


def run_phase(gateway: Gateway, concurrency: int, requests: int, args: argparse.Namespace,
              backend_pid: int, tmp: Path) -> Phase:
    """One load run; with several streams their starts are spread over one stream's length, so that about
    ``concurrency`` streams are open at any time (not all starting in one burst). The gateway's CPU is read
    ``--settle`` s after the load ends: what it writes in the background for these requests counts here."""
    stagger = args.events * args.interval_ms / 1000 if concurrency > 1 else 0.0
    result = tmp / "loadgen-result.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, str(LOADGEN), "run", *gateway.loadgen_args(STREAM_MODEL, args.events),
               "--concurrency", str(concurrency), "--requests", str(requests), "--stagger", f"{stagger:g}",
               "--out", str(result)]
    watched = gateway.pid or backend_pid   # direct: the backend's own CPU, as a reference
    cpu_before, began = cpu_seconds(watched), time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False, preexec_fn=_raise_nofile)
    seconds = time.monotonic() - began
    time.sleep(args.settle)
    cpu = cpu_seconds(watched) - cpu_before
    if done.returncode != 0 or not result.exists():
        raise SystemExit(f"load generator failed on {gateway.name} ({done.returncode}):\n{done.stderr[-3000:]}")
    out = json.loads(result.read_text())
    if not out["ttft_ns"]:
        raise SystemExit(f"no stream completed on {gateway.name}: {out['errors'][:3]}")
    return Phase(gateway.name, concurrency, [x / 1e6 for x in out["ttft_ns"]], [x / 1e6 for x in out["delay_ns"]],
                 out["events"], out["streams"], out["error_count"], out["errors"][0] if out["errors"] else "",
                 cpu, seconds)


@dataclass
class Hold:
    streams: int
    flowing: int
    rss_before: float
    rss_peak: float
    rss_after: float
    seconds_to_open: float
    errors: int
    first_error: str


def hold_streams(gateway: Gateway, args: argparse.Namespace) -> Hold:
    """Open ``--hold-streams`` slow streams at once, sample the gateway's RSS while they are open, close."""
    assert gateway.pid is not None
    rss_before = rss_mb(gateway.pid)
    proc = subprocess.Popen([sys.executable, str(LOADGEN), "hold", *gateway.loadgen_args(SLOW_MODEL, args.events),
                             "--streams", str(args.hold_streams), "--timeout", str(args.hold_timeout)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_raise_nofile)
    assert proc.stdin is not None and proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready "):
        proc.kill()
        raise SystemExit(f"hold load generator failed: {line}{proc.stderr.read() if proc.stderr else ''}")
    ready = json.loads(line[len("ready "):])
    peak = rss_before
    deadline = time.monotonic() + args.hold_seconds
    while time.monotonic() < deadline:
        peak = max(peak, rss_mb(gateway.pid))
        time.sleep(0.2)
    proc.stdin.write("stop\n")
    proc.stdin.flush()
    final = json.loads(proc.stdout.readline())
    proc.wait(timeout=60)
    time.sleep(1.0)   # the gateway drops the cancelled streams' state
    errors = final.get("errors") or [""]
    return Hold(args.hold_streams, min(ready["flowing"], final["still_open_at_stop"]), rss_before, peak,
                rss_mb(gateway.pid), ready["seconds"], final["error_count"], errors[0])


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(phases: list[Phase], holds: dict[str, Hold], args: argparse.Namespace, litellm: str) -> None:
    groups: dict[tuple[str, int], list[Phase]] = {}
    for phase in phases:   # in the order run: round by round
        groups.setdefault((phase.gateway, phase.streams), []).append(phase)
    by = {key: pooled(group) for key, group in groups.items()}
    rows = sorted(by.values(), key=lambda p: (PATHS.index(p.gateway), p.streams))
    print()
    print(f"{'path':8}{'streams':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'delay p50':>10}{'delay p99':>10}"
          f"{'events':>9}{'streams ok':>11}{'errors':>7}{'CPU s':>8}{'CPU %':>7}{'CPU s/1k ev':>12}{'CPU ms/req':>11}"
          f"{'rounds':>7}")
    for p in rows:
        print(f"{p.gateway:8}{p.streams:8d}{p.ttft_p50:10.3f}{p.ttft_p99:10.3f}{p.delay_p50:10.3f}{p.delay_p99:10.3f}"
              f"{p.events:9d}{p.completed:11d}{p.errors:7d}{p.cpu_s:8.2f}{100 * p.cpu_s / p.seconds:7.0f}"
              f"{p.cpu_per_1000:12.4f}{p.cpu_per_request * 1000:11.2f}{p.rounds:7d}")
    offered = args.streams_high * 1000 / args.interval_ms
    print(f"(times in ms, the rounds pooled; delay = an event's one-way delay backend -> load generator; CPU of the "
          f"gateway process tree up to {args.settle:g} s after each load, for direct the backend's own; CPU % = of "
          f"one core over the loads. At {args.streams_high} streams the backend offers {offered:,.0f} events/s: a "
          f"gateway needing more than 1 core for that, i.e. above {1000 / offered:.3f} CPU-s per 1,000 events, "
          f"queues and its latencies measure that queue)")
    for p in rows:
        if p.errors:
            print(f"  {p.gateway} at {p.streams} streams: {p.errors} failed streams, first: {p.first_error}")

    one, many = args.streams_low, args.streams_high
    base1, base64 = by[("direct", one)], by[("direct", many)]
    print()
    for name in PATHS[1:]:
        if (name, one) not in by:
            continue
        p1, p64 = by[(name, one)], by[(name, many)]
        label = f"litellm {litellm}" if name == "litellm" else name
        add_p50_1 = p1.ttft_p50 - base1.ttft_p50
        add_p99_64 = p64.ttft_p99 - base64.ttft_p99
        goal = name == "enclave"   # the goals are set for 1 and 64 streams
        print(f"{label}: added TTFT p50 at {one} stream  {add_p50_1:8.3f} ms"
              + (f"   (goal < {GOAL_TTFT_P50_1_MS:g} ms): {_verdict(add_p50_1 < GOAL_TTFT_P50_1_MS)}"
                 if goal and one == 1 else ""))
        print(f"{label}: added TTFT p99 at {one} stream  {p1.ttft_p99 - base1.ttft_p99:8.3f} ms")
        print(f"{label}: added TTFT p50 at {many} streams {p64.ttft_p50 - base64.ttft_p50:8.3f} ms")
        print(f"{label}: added TTFT p99 at {many} streams {add_p99_64:8.3f} ms"
              + (f"   (goal < {GOAL_TTFT_P99_64_MS:g} ms): {_verdict(add_p99_64 < GOAL_TTFT_P99_64_MS)}"
                 if goal and many == 64 else ""))
        print(f"{label}: added inter-event delay p99 at {one} stream {p1.delay_p99 - base1.delay_p99:8.3f} ms, "
              f"at {many} streams {p64.delay_p99 - base64.delay_p99:8.3f} ms")
        print(f"{label}: CPU per 1,000 relayed events {p64.cpu_per_1000:.4f} s (at {many} streams; "
              f"{p1.cpu_per_1000:.4f} s at {one})")
    if ("enclave", many) in by and ("litellm", many) in by:
        ratio = by[("enclave", many)].cpu_per_1000 / by[("litellm", many)].cpu_per_1000
        print(f"CPU per 1,000 events enclave/litellm = {ratio:.3f}  (goal <= {GOAL_CPU_RATIO:g}): "
              f"{_verdict(ratio <= GOAL_CPU_RATIO)}")
    _variants_report(groups, by, one, many)
    for name, h in holds.items():
        growth = h.rss_peak - h.rss_before
        verdict = (_verdict(growth < GOAL_RSS_MB and h.flowing == h.streams) if h.streams >= 1000
                   else "not judged below 1,000 streams")
        print(f"{name}: {h.flowing} of {h.streams} slow streams open at once (opened in {h.seconds_to_open:.1f} s): "
              f"RSS {h.rss_before:.0f} -> peak {h.rss_peak:.0f} MB, growth {growth:.0f} MB "
              f"(goal < {GOAL_RSS_MB:g} MB for 1,000): {verdict}; "
              f"{h.rss_after:.0f} MB after they closed" + (f"; {h.errors} errors, first: {h.first_error}" if h.errors else ""))


def _spread(phases: list[Phase], stat: Callable[[Phase], float]) -> float:
    values = [stat(p) for p in phases]
    return max(values) - min(values)


def _variants_report(groups: dict[tuple[str, int], list[Phase]], by: dict[tuple[str, int], Phase],
                     one: int, many: int) -> None:
    """Issue 11: plain -> enclave -> limits, per request and TTFT, the ratios over plain and the verdict
    (<= 5% more gateway CPU per request, added TTFT within the round-to-round noise)."""
    present = [v for v in ENCLAVE_VARIANTS if (v, one) in by and (v, many) in by]
    if "plain" not in present or len(present) < 2:
        return
    levels = (one, many)
    print()
    print("issue 11: " + " -> ".join(VARIANT_LABELS[v] for v in present))
    print(f"{'path':9}" + "".join(f"{f'CPU ms/req @{s}':>17}" for s in levels)
          + "".join(f"{f'TTFT p50 @{s}':>14}{f'p99 @{s}':>10}" for s in levels))
    for v in present:
        print(f"{v:9}" + "".join(f"{by[(v, s)].cpu_per_request * 1000:17.2f}" for s in levels)
              + "".join(f"{by[(v, s)].ttft_p50:14.3f}{by[(v, s)].ttft_p99:10.3f}" for s in levels))
    rounds = min(len(groups[(v, s)]) for v in present for s in levels)
    stats: dict[str, Callable[[Phase], float]] = {"p50": lambda p: p.ttft_p50, "p99": lambda p: p.ttft_p99}
    noise = {(s, name): max(_spread(groups[(v, s)], stat) for v in present)   # 0 with one round
             for s in levels for name, stat in stats.items()}
    for v in present[1:]:
        label = "limits+ledger" if v == "limits" else "ledger"
        for s in levels:
            base, this = by[("plain", s)], by[(v, s)]
            per_round = [b.cpu_per_request / a.cpu_per_request for a, b in zip(groups[("plain", s)], groups[(v, s)])]
            print(f"{label}/neither ({v}/plain) at {s} stream{'s' if s > 1 else ''}: CPU per request "
                  f"{this.cpu_per_request / base.cpu_per_request:.3f} (by round: "
                  f"{', '.join(f'{r:.3f}' for r in per_round)}); TTFT p50 {this.ttft_p50 / base.ttft_p50:.3f} "
                  f"({this.ttft_p50 - base.ttft_p50:+.3f} ms), p99 {this.ttft_p99 / base.ttft_p99:.3f} "
                  f"({this.ttft_p99 - base.ttft_p99:+.3f} ms)")
    if "limits" not in present:
        return
    print(f"noise (largest round-to-round spread among {', '.join(present)} over {rounds} rounds): TTFT "
          + "; ".join(f"p50 {noise[(s, 'p50')]:.3f} ms, p99 {noise[(s, 'p99')]:.3f} ms at {s}" for s in levels))
    verdicts = []
    for s in levels:
        ratio = by[("limits", s)].cpu_per_request / by[("plain", s)].cpu_per_request
        verdicts.append(ratio <= GOAL_LIMITS_CPU_RATIO)
        per_round = [b.cpu_per_request / a.cpu_per_request for a, b in zip(groups[("plain", s)], groups[("limits", s)])]
        unresolved = rounds >= 2 and min(per_round) <= 1.0 and max(per_round) > GOAL_LIMITS_CPU_RATIO
        print(f"verdict: limits+ledger/neither gateway CPU per request at {s} stream{'s' if s > 1 else ''} = "
              f"{ratio:.3f} (goal <= {GOAL_LIMITS_CPU_RATIO:g}): {_verdict(verdicts[-1])}"
              + (f" (rounds span {min(per_round):.3f}..{max(per_round):.3f}: the noise is wider than the goal)"
                 if unresolved else ""))
    for s in levels:
        for name, stat in stats.items():
            added = stat(by[("limits", s)]) - stat(by[("plain", s)])
            if rounds < 2:
                print(f"verdict: added TTFT {name} at {s}: {added:+.3f} ms: not judged (one round, no noise figure)")
                continue
            verdicts.append(added <= noise[(s, name)])
            print(f"verdict: added TTFT {name} at {s} stream{'s' if s > 1 else ''} {added:+.3f} ms against noise "
                  f"{noise[(s, name)]:.3f} ms: {'within noise' if verdicts[-1] else 'BEYOND NOISE'}")
    print(f"verdict (issue 11: <= {100 * (GOAL_LIMITS_CPU_RATIO - 1):.0f}% more gateway CPU per request, no added "
          f"TTFT beyond noise): {_verdict(all(verdicts))}")


def idle_cpu(gateways: list[Gateway], seconds: float) -> dict[str, float]:
    """Each gateway's CPU (ms per s) over one window with no load, all measured over the same window."""
    if not gateways or seconds <= 0:
        return {}
    before = {g.name: cpu_seconds(g.pid) for g in gateways if g.pid is not None}
    time.sleep(seconds)
    return {g.name: (cpu_seconds(g.pid) - before[g.name]) * 1000 / seconds for g in gateways if g.pid is not None}


def ledger_rows(tmp: Path, names: list[str]) -> dict[str, int]:
    """Usage rows each enclave's database holds after its clean shutdown (it writes what is pending)."""
    import sqlite3

    counts = {}
    for name in names:
        with sqlite3.connect(tmp / name / "enclave.db") as db:
            counts[name] = db.execute("SELECT count(*) FROM usage_records").fetchone()[0]
    return counts


def check_ledgers(rows: dict[str, int], served: dict[str, int]) -> bool:
    """plain wrote no usage row (its ledger really was off), the others at least one per stream served."""
    ok = True
    parts = []
    for name, count in rows.items():
        good = count == 0 if name == "plain" else count >= served[name]
        ok &= good
        wanted = "0" if name == "plain" else f">= {served[name]} served"
        parts.append(f"{name} {count} (want {wanted}){'' if good else ' WRONG'}")
    print("usage ledger rows after the run: " + ", ".join(parts))
    return ok


def main_bench(args: argparse.Namespace) -> int:
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(paths) - set(PATHS)
    if unknown or "direct" not in paths:
        raise SystemExit(f"--paths takes direct (always: the baseline), {', '.join(PATHS[1:])}; got {args.paths!r}")
    procs: list[subprocess.Popen] = []
    phases: list[Phase] = []
    holds: dict[str, Hold] = {}
    litellm = ""
    served: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="cube-bench-inference-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            backend, backend_port = start_backend(tmp, args)
            procs.append(backend)
            gateways = [Gateway("direct", backend_port, "/v1/chat/completions", [])]
            levels = {level: BENCH_LIMITS for level in ("pat", "user", "domain")}
            for name in ENCLAVE_VARIANTS:
                if name in paths:
                    proc, gateway = start_enclave(tmp, backend_port, args, name=name, ledger=name != "plain",
                                                  quotas={"defaults": levels} if name == "limits" else None)
                    procs.append(proc)
                    gateways.append(gateway)
            if "litellm" in paths:
                proc, gateway = start_litellm(tmp, backend_port)
                procs.append(proc)
                gateways.append(gateway)
                litellm = litellm_version(ensure_litellm())
            print(f"cpus={os.cpu_count()} events/stream={args.events} pace={args.interval_ms:g} ms "
                  f"streams at {args.streams_low} x {args.requests_low} and {args.streams_high} x {args.requests_high}"
                  f", {args.rounds} rounds; paths: {', '.join(g.name for g in gateways)}"
                  + (f" (LiteLLM {litellm}, one worker)" if litellm else ""), flush=True)
            for gateway in gateways:   # warm-up: connections, imports, caches
                served[gateway.name] = run_phase(gateway, 2, 1, args, backend.pid, tmp).completed
            direct = gateways[0]
            variants = [g for g in gateways if g.name in ENCLAVE_VARIANTS]
            others = [g for g in gateways if g.name == "litellm"]
            for number in range(args.rounds):
                shift = number % len(variants) if variants else 0
                order = [direct, *variants[shift:], *variants[:shift], *(others if number == 0 else [])]
                for concurrency, requests in ((args.streams_low, args.requests_low),
                                              (args.streams_high, args.requests_high)):
                    for gateway in order:
                        phase = run_phase(gateway, concurrency, requests, args, backend.pid, tmp)
                        phases.append(phase)
                        served[gateway.name] += phase.completed
                        print(f"  round {number + 1} {gateway.name:8} {concurrency:4d} streams: TTFT p50 "
                              f"{phase.ttft_p50:8.3f} ms p99 {phase.ttft_p99:8.3f} ms, {phase.events} events, "
                              f"{phase.errors} errors, {phase.seconds:.1f} s, CPU {phase.cpu_per_request * 1000:.2f} "
                              f"ms/request", flush=True)
                        if gateway.name != "litellm" and phase.errors:
                            raise SystemExit(f"{phase.errors} streams failed on {gateway.name}: {phase.first_error}")
            idle = idle_cpu(variants, args.idle_seconds)
            for gateway in gateways:
                if gateway.name == "enclave" and args.hold_streams:
                    holds[gateway.name] = hold_streams(gateway, args)
        finally:
            for proc in reversed(procs):
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            for proc in procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        rows = ledger_rows(tmp, [g.name for g in gateways if g.name in ENCLAVE_VARIANTS])
    report(phases, holds, args, litellm)
    if idle:
        print(f"idle CPU over {args.idle_seconds:g} s right after the rounds (ms of CPU per s; the part of the 1-stream "
              f"figures that is per second, not per request): "
              + ", ".join(f"{name} {ms:.2f}" for name, ms in idle.items()))
    if rows and not check_ledgers(rows, served):
        print("the usage ledgers are not as the paths say: the comparison above does not hold", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run: 2 ms pace, few streams, 50 held streams, 2 rounds")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--rounds", type=int, help="rounds of phases, interleaved (default 3, --quick 2)")
    parser.add_argument("--settle", type=float, default=1.5,
                        help="s after each load before its CPU is read (the ledger and limits write every 1 s)")
    parser.add_argument("--idle-seconds", type=float, default=10.0,
                        help="a window without load after the rounds: the enclaves' background CPU (0: skip)")
    parser.add_argument("--events", type=int, default=256, help="events per response")
    parser.add_argument("--interval-ms", type=float, default=10.0, help="the backend's pace between events")
    parser.add_argument("--slow-interval-ms", type=float, default=1000.0, help="pace of the held streams")
    parser.add_argument("--streams-low", type=int, default=1)
    parser.add_argument("--requests-low", type=int, default=15, help="streams one after another at --streams-low")
    parser.add_argument("--streams-high", type=int, default=64)
    parser.add_argument("--requests-high", type=int, default=3, help="streams per connection at --streams-high")
    parser.add_argument("--hold-streams", type=int, default=1000, help="slow streams held open at once (0: skip)")
    parser.add_argument("--hold-seconds", type=float, default=5.0)
    parser.add_argument("--hold-timeout", type=float, default=90.0, help="longest wait for all held streams")
    args = parser.parse_args(argv)
    if args.quick:
        args.interval_ms, args.requests_low, args.streams_high, args.requests_high = 2.0, 3, 8, 2
        args.hold_streams, args.hold_seconds = min(args.hold_streams, 50), 1.0
        args.idle_seconds = min(args.idle_seconds, 3.0)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.rounds < 1:
        raise SystemExit("--rounds takes 1 or more")
    return main_bench(args)


if __name__ == "__main__":
    sys.exit(main())
