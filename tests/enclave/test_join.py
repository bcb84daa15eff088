"""Replicas joining over attested TLS, as real `cube-enclave serve --simulate` processes on the test PostgreSQL.

One simulated platform (one sim root, as one machine's hardware) and one configuration file for every replica;
each test gets its own PostgreSQL schema. The second replica obtains the platform secrets only from the first,
through the host's relay (`cube-host relay`; nothing in its data_dir, nothing in its configuration), then a PAT
issued on either works on the other. A
replica claiming another launch measurement (``CUBE_SIM_MEASUREMENT``, the simulated launcher's choice) is
refused by the peer and fails to start; a replica whose own policy refuses the peer stops before sending
anything.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from attestation.sim import SimPlatform

from .test_main import free_port, wait_until_serving

OTHER_MEASUREMENT = hashlib.sha384(b"a replica of another image").hexdigest()
# The first replica's root, given to it alone (simulation only: settings.server_secret is the root there), so the
# tests can look for it where it must not be.
ROOT = "join-test-root-" + "r" * 40
FIRST = {"CUBE_ENCLAVE__SERVER_SECRET": ROOT}


@dataclass
class Replica:
    proc: subprocess.Popen
    port: int
    data: Path
    log: Path
    ctx: ssl.SSLContext

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def get(self, path: str, token: str) -> httpx.Response:
        return httpx.get(self.url + path, verify=self.ctx, headers={"Authorization": f"Bearer {token}"})

    def log_text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class Cluster:
    def __init__(self, root: Path, sim_dir: Path, pg: tuple[str, str]) -> None:
        self.root = root
        self.config = root / "enclave.yaml"
        self.config.write_text("log_json: true\nregistry_refresh_seconds: 3600\n")
        url, schema = pg
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("CUBE_ENCLAVE__") and k != "CUBE_SIM_MEASUREMENT"}
        self.env.update({"CUBE_ENCLAVE__DATABASE_URL": url, "CUBE_ENCLAVE__DATABASE_SCHEMA": schema,
                         "CUBE_ENCLAVE__ATTESTATION__SIM_DIR": str(sim_dir)})
        self.replicas: list[Replica] = []
        self.count = 0

    def _args(self, name: str, port: int, config: Path | None, extra: list[str]) -> list[str]:
        return [sys.executable, "-m", "enclave.main", "serve", "--simulate", "--config", str(config or self.config),
                "--data-dir", str(self.root / name), "--port", str(port), *extra]

    def start(self, *extra: str, config: Path | None = None, env: dict[str, str] | None = None) -> Replica:
        self.count += 1
        name, port = f"r{self.count}", free_port()
        log = self.root / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(self._args(name, port, config, list(extra)), stdout=out,
                                    stderr=subprocess.STDOUT, env={**self.env, **(env or {})})
        replica = Replica(proc, port, self.root / name, log, ssl.create_default_context())
        self.replicas.append(replica)
        replica.ctx = wait_until_serving(proc, replica.data / "server-cert.pem", port, log)
        return replica

    def run_failing(self, *extra: str, config: Path | None = None,
                    env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        self.count += 1
        name = f"r{self.count}"
        return subprocess.run(self._args(name, free_port(), config, list(extra)), capture_output=True, text=True,
                              env={**self.env, **(env or {})}, timeout=180)

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("join-sim") / "sim"
    SimPlatform.load_or_create(directory)
    return directory


@pytest.fixture
def cluster(tmp_path: Path, sim_dir: Path, pg_schema_url: tuple[str, str]) -> Iterator[Cluster]:
    c = Cluster(tmp_path, sim_dir, pg_schema_url)
    try:
        yield c
    finally:
        c.stop()


def _join_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "/internal/join/" in line or "join accepted" in line
            or "join refused" in line]


def _metric(replica: Replica, token: str, outcome: str, reason: str) -> float:
    text = replica.get("/metrics", token).text
    match = re.search(r'^cube_join_requests_total\{outcome="%s",reason="%s"\} (\S+)$' % (outcome, reason), text,
                      re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_second_replica_joins_and_pats_work_on_both(cluster: Cluster):
    pat_file = cluster.root / "admin.pat"
    first = cluster.start("--pat-file", str(pat_file), env=FIRST)
    admin = pat_file.read_text().strip()
    # through the host's relay: the host sees only TLS, and the secrets are sealed to the joiner's key besides
    relay = subprocess.Popen([sys.executable, "-m", "host.cli", "relay", "--listen", "127.0.0.1:0", "--target",
                              f"tcp:127.0.0.1:{first.port}", "--grace", "1"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=cluster.env)
    try:
        line = relay.stdout.readline()   # "cube-host relay: 127.0.0.1:PORT -> tcp:..."
        assert line.startswith("cube-host relay: "), line + relay.stderr.read()
        relay_port = int(line.split()[2].rsplit(":", 1)[1])
        second = cluster.start("--join", f"https://127.0.0.1:{relay_port}")
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.communicate(timeout=30)

    me = second.get("/users/me", admin)                      # issued on the first, accepted on the second
    assert me.status_code == 200, me.text
    assert me.json()["user"]["superadmin"] is True
    made = httpx.post(second.url + "/users/me/pats", verify=second.ctx, json={"name": "made-on-second"},
                      headers={"Authorization": f"Bearer {admin}"})
    assert made.status_code == 201, made.text
    token = made.json()["token"]
    assert first.get("/users/me", token).status_code == 200   # and the other way round
    assert first.get("/users/me", "cube_pat_" + "x" * 40).status_code == 401

    # the second replica holds the secrets in memory only: no secret file in its data dir, not the root's bytes
    assert not (second.data / "server_secret").exists()
    for path in second.data.rglob("*"):
        if path.is_file():
            assert ROOT.encode() not in path.read_bytes(), path
    assert ROOT not in second.log_text() and ROOT not in first.log_text()

    lines = _join_lines(first.log_text())
    assert any("join accepted" in line and "sim peer" in line for line in lines), lines
    assert any("/internal/join/v1/secrets" in line and "200" in line for line in lines), lines
    assert _metric(first, admin, "accepted", "appraised") == 1.0
    # the joined replica serves joins in turn: a third replica joins the second
    third = cluster.start("--join", f"https://127.0.0.1:{second.port}")
    assert third.get("/users/me", token).status_code == 200
    assert _metric(second, admin, "accepted", "appraised") == 1.0


def test_a_replica_with_another_measurement_is_refused_and_learns_nothing(cluster: Cluster):
    pat_file = cluster.root / "admin.pat"
    first = cluster.start("--pat-file", str(pat_file), env=FIRST)
    admin = pat_file.read_text().strip()
    fingerprint = SimPlatform.load_or_create(Path(cluster.env["CUBE_ENCLAVE__ATTESTATION__SIM_DIR"])).fingerprint
    # it would accept any peer on this simulated platform (as a modified image would): the peer must refuse it
    lax = cluster.root / "lax.yaml"
    lax.write_text("log_json: true\njoin:\n  policy:\n    name: any sim peer\n    platforms: [sim]\n"
                   f"    sim_root_fingerprint: '{fingerprint}'\n    allow_unmeasured: true\n")
    refused = cluster.run_failing("--join", f"https://127.0.0.1:{first.port}", config=lax,
                                  env={"CUBE_SIM_MEASUREMENT": OTHER_MEASUREMENT})
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "cube-enclave: join:" in refused.stderr and "refused this replica" in refused.stderr
    assert "measurement" in refused.stderr and OTHER_MEASUREMENT in refused.stderr
    assert ROOT not in refused.stdout + refused.stderr
    joiner_dir = cluster.root / f"r{cluster.count}"
    assert not (joiner_dir / "server_secret").exists()
    lines = _join_lines(first.log_text())
    assert any("join refused (policy)" in line and "measurement" in line for line in lines), lines
    assert not any("join accepted" in line for line in lines)
    assert _metric(first, admin, "refused", "policy") == 1.0
    assert _metric(first, admin, "accepted", "appraised") == 0.0


def test_a_peer_failing_the_joiners_policy_gets_nothing_sent(cluster: Cluster):
    pat_file = cluster.root / "admin.pat"
    first = cluster.start("--pat-file", str(pat_file), env=FIRST)
    admin = pat_file.read_text().strip()
    before = first.log_text()
    # default policy: the joiner wants a peer of its own (other) measurement, and the first is not one
    refused = cluster.run_failing("--join", f"https://127.0.0.1:{first.port}",
                                  env={"CUBE_SIM_MEASUREMENT": OTHER_MEASUREMENT})
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "failed this replica's join policy, nothing was sent" in refused.stderr
    assert "certificate_appraisal" in refused.stderr and "measurement" in refused.stderr   # judged on the
    after = first.log_text()[len(before):]                       # evidence in the peer's TLS certificate ...
    assert "HTTP/1.1" not in after and _join_lines(after) == []  # ... so not one request reached the peer
    assert _metric(first, admin, "refused", "policy") == 0.0


def test_join_needs_an_https_peer(cluster: Cluster):
    refused = cluster.run_failing("--join", "http://127.0.0.1:1")
    assert refused.returncode == 2 and "expected https://" in refused.stderr


def test_a_broken_join_policy_stops_the_replica(cluster: Cluster):
    broken = cluster.root / "broken.yaml"
    broken.write_text("log_json: true\njoin:\n  policy: {platforms: [nope]}\n")
    refused = cluster.run_failing("--pat-file", str(cluster.root / "pat"), config=broken)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "cube-enclave: join: join policy: invalid policy: platforms" in refused.stderr
    assert "join.accept: false turns the join routes off" in refused.stderr
