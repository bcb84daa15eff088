"""`cube-host` as operators run it: real processes, signals, exit codes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from host.cli import main
from tests.host.servers import LOOPBACK, ThreadedServer, echo, free_port

ROOT = Path(__file__).resolve().parents[2]


def _spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "host.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_relay_command_relays_and_exits_cleanly_on_sigterm() -> None:
    server = ThreadedServer(echo)
    proc = _spawn("relay", "--listen", f"{LOOPBACK}:0", "--target", f"tcp:{LOOPBACK}:{server.port}", "--grace", "2")
    try:
        line = proc.stdout.readline()  # "cube-host relay: 127.0.0.1:PORT -> tcp:... (splice pump, ...)"
        assert line.startswith("cube-host relay: "), line + proc.stderr.read()
        port = int(line.split()[2].rsplit(":", 1)[1])
        with socket.create_connection((LOOPBACK, port), timeout=5) as s:
            s.sendall(b"through the relay")
            s.shutdown(socket.SHUT_WR)
            assert s.recv(100) == b"through the relay"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        server.close()


def test_serve_command_health_ready_metrics_and_embedded_relay(tmp_path) -> None:
    port, relay_port = free_port(), free_port()
    enclave = ThreadedServer(echo)
    config = tmp_path / "host.yaml"
    config.write_text(f"data_dir: data\nlisten: {LOOPBACK}:{port}\ncollateral: {{offline: true}}\n"
                      f"relay: {{listen: '{LOOPBACK}:{relay_port}', target: 'tcp:{LOOPBACK}:{enclave.port}'}}\n")
    proc = _spawn("serve", "--config", str(config))
    url = f"http://{LOOPBACK}:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        else:
            raise AssertionError("cube-host serve did not come up: " + proc.stderr.read())
        assert httpx.get(url + "/ready").json()["status"] == "ready"
        assert "cube_host_verify_results_total" in httpx.get(url + "/metrics").text
        assert httpx.get(url + "/v1/policies").json()["data"][0]["name"] == "default"
        with socket.create_connection((LOOPBACK, relay_port), timeout=5) as s:
            s.sendall(b"x" * 1000)
            s.shutdown(socket.SHUT_WR)
            assert len(b"".join(iter(lambda: s.recv(4096), b""))) == 1000
        metrics = httpx.get(url + "/metrics").text
        assert 'cube_host_relay_bytes_total{direction="up"} 1000.0' in metrics
        assert 'cube_host_relay_connections_total{event="accepted"} 1.0' in metrics
        key = tmp_path / "data" / "ear-signing-key.pem"
        assert key.stat().st_mode & 0o777 == 0o600
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        enclave.close()


def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys) -> None:
    assert main(["relay", "--target", "udp:1.2.3.4:5"]) == 2
    assert "unknown target kind" in capsys.readouterr().err
    assert main(["relay", "--listen", "nope", "--target", "tcp:127.0.0.1:1"]) == 2
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: 127.0.0.1:1\nbogus: 1\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "bogus: unknown key" in capsys.readouterr().err
    policy_missing = tmp_path / "p.yaml"
    policy_missing.write_text("policies: {strict: nowhere.yaml}\nverify: {default_policy: strict}\n")
    assert main(["serve", "--config", str(policy_missing)]) == 2
