"""Two replicas behind one relay, as operators run them: real processes end to end.

Two ``cube-enclave serve --simulate`` processes (their own data directories and TLS keys; the same simulated
platform directory, the same PostgreSQL schema and, in simulation only, the same ``server_secret``: helper
"join" makes that secret come from an attested peer) behind one ``cube-host relay`` process with two targets
and a control socket. An attested client (keep-alive off, so each request is a new connection the relay
places) reaches both and verifies each replica's key once; a PAT issued on one works on the other; draining
one replica, then stopping it, while a stream of requests runs fails none of them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx
from cryptography import x509

from attestation.atls.binding import spki_der_of, spki_sha256
from attestation.atls.client import AttestedClient
from attestation.policy import load_policy
from host.cli import main as host_main
from host.relay_control import control_request
from tests.enclave.test_main import free_port, wait_until_serving

ROOT = Path(__file__).resolve().parents[2]
SECRET = "replicas-share-this-secret-in-simulation-only-0123456789"
NO_KEEPALIVE = httpx.Limits(max_connections=10, max_keepalive_connections=0)


class Replica:
    """One ``cube-enclave serve --simulate`` process on loopback."""

    def __init__(self, base: Path, name: str, env: dict[str, str], *, bootstrap: bool) -> None:
        self.data = base / name
        self.port = free_port()
        self.log = base / f"{name}.log"
        config = base / "enclave.yaml"
        config.write_text("log_json: true\n")
        args = [sys.executable, "-m", "enclave.main", "serve", "--simulate", "--config", str(config),
                "--data-dir", str(self.data), "--port", str(self.port)]
        if bootstrap:
            args += ["--pat-file", str(base / "admin.pat")]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_until_serving(self.proc, self.data / "server-cert.pem", self.port, self.log)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def spki(self) -> str:
        cert = x509.load_pem_x509_certificate((self.data / "server-cert.pem").read_bytes())
        return spki_sha256(spki_der_of(cert))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _start_relay(targets: list[str], control: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "host.cli", "relay", "--listen", "127.0.0.1:0",
                             *[a for t in targets for a in ("--target", t)], "--control", str(control),
                             "--health-interval", "0.2", "--grace", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert line.startswith("cube-host relay: "), line + proc.stderr.read()  # type: ignore[union-attr]
    return proc, f"https://127.0.0.1:{int(line.split()[2].rsplit(':', 1)[1])}"


def _connections(control: Path) -> dict[str, int]:
    return {t["target"]: t["connections"] for t in control_request(control, {"op": "status"})["targets"]}


def test_two_replicas_behind_one_relay(tmp_path: Path, pg_schema_url: tuple[str, str]) -> None:
    url, schema = pg_schema_url
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUBE_ENCLAVE__")}
    env.update({"CUBE_ENCLAVE__DATABASE_URL": url, "CUBE_ENCLAVE__DATABASE_SCHEMA": schema,
                "CUBE_ENCLAVE__SERVER_SECRET": SECRET,
                "CUBE_ENCLAVE__ATTESTATION__SIM_DIR": str(tmp_path / "sim-platform")})
    control_dir = Path(tempfile.mkdtemp(prefix="crr"))  # a Unix socket path stays short
    control = control_dir / "relay.sock"
    replicas: list[Replica] = []
    relay = None
    try:
        replicas.append(Replica(tmp_path, "r1", env, bootstrap=True))
        replicas.append(Replica(tmp_path, "r2", env, bootstrap=False))  # the store is initialised: no bootstrap
        r1, r2 = replicas
        assert r1.spki() != r2.spki()                                     # a key made in each enclave
        policy = load_policy(r1.data / "sim-policy.yaml")                 # one simulated platform: one policy
        token = (tmp_path / "admin.pat").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        relay, relay_url = _start_relay([r1.target, r2.target], control)

        with AttestedClient(relay_url, policy=policy, limits=NO_KEEPALIVE, headers=auth) as client:
            domain = next(d["id"] for d in client.get("/admin/domains").json() if d["name"] == "default")
            models = f"/proxy/{domain}/v1/models"
            for _ in range(6):
                assert client.get(models).json() == {"object": "list", "data": []}
            assert set(client.attestor.trusted_spkis()) == {r1.spki(), r2.spki()}  # both replicas verified
            assert client.attestor.verifications == 2
            spread = _connections(control)
            assert spread[r1.target] >= 3 and spread[r2.target] >= 3      # the relay spread the load

            # A PAT issued on one replica works on the other (one store), each reached directly and attested.
            issued = {}
            for here, there in ((r1, r2), (r2, r1)):
                with AttestedClient(here.url, policy=policy, headers=auth) as direct:
                    admin = next(u["id"] for u in direct.get("/admin/users").json() if u["name"] == "admin")
                    made = direct.post(f"/admin/users/{admin}/pats", json={"name": f"on-{here.port}"})
                    assert made.status_code == 201, made.text
                    issued[here.port] = made.json()["token"]
                with AttestedClient(there.url, policy=policy,
                                    headers={"Authorization": f"Bearer {issued[here.port]}"}) as other:
                    assert other.get(models).status_code == 200

            # Drain r1, then stop it, while requests keep coming: none fails.
            failures: list[str] = []
            sent = [0]
            stop = threading.Event()

            def stream() -> None:
                while not stop.is_set():
                    try:
                        response = client.get(models)
                        if response.status_code != 200:
                            failures.append(f"HTTP {response.status_code}")
                    except Exception as exc:  # noqa: BLE001 - every failure is what this test counts
                        failures.append(f"{type(exc).__name__}: {exc}")
                    finally:
                        sent[0] += 1

            def more(n: int) -> None:
                """Wait until ``n`` more requests were made (bounded: a stuck stream fails the test)."""
                target = sent[0] + n
                for _ in range(1200):
                    if sent[0] >= target:
                        return
                    worker.join(0.05)
                raise AssertionError(f"the request stream stalled at {sent[0]} ({failures[:3]})")

            worker = threading.Thread(target=stream, daemon=True)
            worker.start()
            more(10)
            assert host_main(["relay", "drain", r1.target, "--control", str(control), "--wait", "30"]) == 0
            after_drain = _connections(control)
            more(10)
            r1.stop()                                                     # drained, so it can go
            more(10)
            stop.set()
            worker.join(30)
            assert sent[0] >= 30 and failures == []
            final = _connections(control)
            assert final[r1.target] == after_drain[r1.target]             # nothing new went to the drained one
            assert final[r2.target] >= after_drain[r2.target] + 20
            assert host_main(["relay", "remove", r1.target, "--control", str(control)]) == 0
    finally:
        if relay is not None:
            relay.send_signal(signal.SIGTERM)
            relay.wait(30)
        for replica in replicas:
            replica.stop()
        shutil.rmtree(control_dir, ignore_errors=True)
