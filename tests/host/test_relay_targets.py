"""The relay over several enclave targets, on real loopback sockets: least connections, retry on a failed
connect, health probes (TCP and TLS), draining, the control socket and per-target metrics."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from host.metrics import RelayCollector
from host.relay import HealthCheck, Relay, RelayError, RelayLimits, format_target
from host.relay_control import MAX_WAIT_SECONDS, ControlServer, control_request
from tests.host.servers import LOOPBACK, ThreadedServer, echo, free_port, self_signed, tls_server_context

FAST = HealthCheck(interval=0.05, timeout=0.5, unhealthy_after=2, healthy_after=2)


class Tagged(ThreadedServer):
    """A target that answers every connection with its tag, then echoes until EOF."""

    def __init__(self, tag: bytes, port: int = 0) -> None:
        self.tag = tag
        super().__init__(self._serve, port=port)

    def _serve(self, conn: socket.socket) -> None:
        conn.sendall(self.tag)
        echo(conn)


def tcp(port: int) -> tuple[str, str, int]:
    return ("tcp", LOOPBACK, port)


def hold(relay: Relay) -> tuple[socket.socket, bytes]:
    """A client connection through the relay, kept open; the tag of the target it reached."""
    assert relay.address is not None
    s = socket.create_connection(relay.address, timeout=5)
    s.sendall(b"x")  # the relay connects upstream only after the first byte
    tag = s.recv(2)
    assert s.recv(1) == b"x"
    return s, tag


def closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:  # closed with our byte unread
        return True


def roundtrip(s: socket.socket, data: bytes) -> bytes:
    s.sendall(data)
    return s.recv(len(data))


async def held(relay: Relay, n: int) -> list[tuple[socket.socket, bytes]]:
    return [await asyncio.to_thread(hold, relay) for _ in range(n)]


async def wait_for(condition, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_least_connections_with_round_robin_ties() -> None:
    servers = [Tagged(b"A1"), Tagged(b"B2"), Tagged(b"C3")]
    relay = Relay((LOOPBACK, 0), [tcp(s.port) for s in servers], RelayLimits())
    await relay.start()
    try:
        first = await held(relay, 6)
        assert sorted(tag for _, tag in first) == [b"A1", b"A1", b"B2", b"B2", b"C3", b"C3"]
        assert [t.open for t in relay.pool.targets] == [2, 2, 2]
        for s, tag in first:  # close both of B's: B now has the fewest and takes the next two
            if tag == b"B2":
                s.close()
        await wait_for(lambda: relay.pool.targets[1].open == 0)
        more = await held(relay, 2)
        assert [tag for _, tag in more] == [b"B2", b"B2"]
        for s, _ in first + more:
            s.close()
    finally:
        await relay.stop(1)
        for s in servers:
            s.close()


async def test_a_refused_target_is_retried_on_the_next_before_the_client_sees_an_error() -> None:
    dead = free_port()
    live = Tagged(b"OK")
    relay = Relay((LOOPBACK, 0), [tcp(dead), tcp(live.port)], RelayLimits())
    await relay.start()
    try:
        conns = await held(relay, 3)
        assert [tag for _, tag in conns] == [b"OK"] * 3
        dead_entry = relay.pool.targets[0]
        assert dead_entry.connect_failures >= 1 and relay.stats.connect_retried == dead_entry.connect_failures
        assert relay.stats.connect_failed == 0
        for s, _ in conns:
            s.close()
    finally:
        await relay.stop(1)
        live.close()


async def test_every_target_refusing_closes_the_client() -> None:
    relay = Relay((LOOPBACK, 0), [tcp(free_port()), tcp(free_port())], RelayLimits())
    await relay.start()

    def client() -> bytes:
        assert relay.address is not None
        with socket.create_connection(relay.address, timeout=5) as s:
            s.sendall(b"hello")
            try:
                return s.recv(1)
            except ConnectionResetError:
                return b""

    try:
        assert await asyncio.to_thread(client) == b""
        assert relay.stats.connect_failed == 1 and relay.stats.connect_retried == 1
        assert [t.connect_failures for t in relay.pool.targets] == [1, 1]
    finally:
        await relay.stop(1)


async def test_a_failing_target_leaves_the_rotation_and_comes_back_after_good_probes() -> None:
    a = Tagged(b"AA")
    b = Tagged(b"BB")
    b_port = b.port
    relay = Relay((LOOPBACK, 0), [tcp(a.port), tcp(b_port)], RelayLimits(), health=FAST)
    await relay.start()
    try:
        b.close()
        entry = relay.pool.targets[1]
        await wait_for(lambda: entry.state == "unhealthy")
        failures_then = entry.connect_failures
        conns = await held(relay, 4)
        assert [tag for _, tag in conns] == [b"AA"] * 4      # never tried on the unhealthy one
        assert entry.connect_failures == failures_then and relay.stats.connect_retried == 0
        back = Tagged(b"BB", port=b_port)                  # the replica is back on its port
        await wait_for(lambda: entry.state == "healthy")
        again = await held(relay, 1)
        assert again[0][1] == b"BB"                          # fewest connections: it gets the next client
        for s, _ in conns + again:
            s.close()
        back.close()
    finally:
        await relay.stop(1)
        a.close()


async def test_failed_client_connects_count_as_probes_only_when_health_is_checked() -> None:
    a = Tagged(b"AA")
    b_port = free_port()
    slow = HealthCheck(interval=3600, timeout=0.5, unhealthy_after=2, healthy_after=1)  # one probe round, at start
    checked = Relay((LOOPBACK, 0), [tcp(a.port), tcp(b_port)], RelayLimits(), health=slow)
    unchecked = Relay((LOOPBACK, 0), [tcp(a.port), tcp(b_port)], RelayLimits())
    for relay in (checked, unchecked):
        await relay.start()
    try:
        await wait_for(lambda: checked.pool.targets[1].probe_failures == 1)
        for relay in (checked, unchecked):
            for s, tag in await held(relay, 4):
                assert tag == b"AA"
                s.close()
        assert checked.pool.targets[1].state == "unhealthy"      # one probe + one client connect: out
        assert checked.pool.targets[1].connect_failures == 1
        assert unchecked.pool.targets[1].state == "healthy"      # no probes would ever bring it back: stays in
        # Fewest open connections, so tried first for clients 2-4 (A holds the others), retried on A each time.
        assert unchecked.pool.targets[1].connect_failures == 3
        back = Tagged(b"BB", port=b_port)
        tags = [tag for s, tag in await held(unchecked, 2)]
        assert b"BB" in tags
        back.close()
    finally:
        for relay in (checked, unchecked):
            await relay.stop(1)
        a.close()


async def test_tls_probe_needs_a_completed_handshake(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server_ctx = tls_server_context(cert, key)

    def tls_echo(conn: socket.socket) -> None:
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)

    not_tls = ThreadedServer(lambda c: c.recv(1 << 16))  # accepts TCP, never completes a handshake
    real_tls = ThreadedServer(tls_echo)
    relay = Relay((LOOPBACK, 0), [tcp(not_tls.port), tcp(real_tls.port)], RelayLimits(),
                  health=HealthCheck(probe="tls", interval=0.05, timeout=0.3, unhealthy_after=2, healthy_after=1))
    await relay.start()
    try:
        await wait_for(lambda: relay.pool.targets[0].state == "unhealthy")
        await asyncio.sleep(0.3)
        assert relay.pool.targets[1].state == "healthy" and relay.pool.targets[1].probe_failures == 0
    finally:
        await relay.stop(1)
        not_tls.close()
        real_tls.close()


async def test_draining_sends_new_clients_elsewhere_while_open_ones_finish() -> None:
    a, b = Tagged(b"AA"), Tagged(b"BB")
    relay = Relay((LOOPBACK, 0), [tcp(a.port), tcp(b.port)], RelayLimits())
    await relay.start()
    try:
        (on_a, tag), = await held(relay, 1)
        assert tag == b"AA"
        name = format_target(tcp(a.port))
        with pytest.raises(RelayError, match="drained first"):
            relay.remove_target(name)
        relay.drain(name)
        assert relay.pool.targets[0].state == "draining"
        fresh = await held(relay, 4)
        assert [t for _, t in fresh] == [b"BB"] * 4
        assert await asyncio.to_thread(roundtrip, on_a, b"still served") == b"still served"  # still working
        assert await relay.wait_drained(name, 0.2) == 1
        on_a.close()
        assert await relay.wait_drained(name, 5) == 0
        relay.remove_target(name)
        assert [t.name for t in relay.pool.targets] == [format_target(tcp(b.port))]
        with pytest.raises(RelayError, match="last target"):
            relay.drain(relay.pool.targets[0].name)
            relay.remove_target(relay.pool.targets[0].name)
        for s, _ in fresh:
            s.close()
    finally:
        await relay.stop(1)
        a.close()
        b.close()


async def test_every_target_draining_refuses_new_clients() -> None:
    a = Tagged(b"AA")
    relay = Relay((LOOPBACK, 0), [tcp(a.port)], RelayLimits())
    await relay.start()
    try:
        relay.drain(relay.pool.targets[0].name)
        assert relay.address is not None
        with socket.create_connection(relay.address, timeout=5) as s:
            s.sendall(b"x")
            assert await asyncio.to_thread(closed_by_peer, s)
        assert relay.stats.connect_failed == 1 and relay.pool.targets[0].connect_failures == 0
        relay.resume(relay.pool.targets[0].name)
        (s2, tag), = await held(relay, 1)
        assert tag == b"AA"
        s2.close()
    finally:
        await relay.stop(1)
        a.close()


def test_unknown_and_duplicate_targets_are_refused() -> None:
    with pytest.raises(RelayError, match="at least one target"):
        Relay((LOOPBACK, 0), [], RelayLimits())
    with pytest.raises(RelayError, match="already listed"):
        Relay((LOOPBACK, 0), [tcp(1), tcp(1)], RelayLimits())
    relay = Relay((LOOPBACK, 0), [tcp(1)], RelayLimits())
    with pytest.raises(RelayError, match="no target"):
        relay.drain("tcp:127.0.0.1:2")
    assert format_target(("tcp", "::1", 8443)) == "tcp:[::1]:8443"
    assert relay.pool.find("tcp:127.0.0.1:1").name == "tcp:127.0.0.1:1"


async def test_per_target_metrics() -> None:
    a = Tagged(b"AA")
    relay = Relay((LOOPBACK, 0), [tcp(a.port), tcp(free_port())], RelayLimits())
    await relay.start()
    collector = RelayCollector()
    collector.relays.append(relay)
    try:
        conns = await held(relay, 2)
        relay.drain(relay.pool.targets[1].name)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for m in collector.collect() for s in m.samples}
        a_name = relay.pool.targets[0].name
        dead = relay.pool.targets[1].name
        assert samples[("cube_host_relay_target_open_connections", (("target", a_name),))] == 2
        assert samples[("cube_host_relay_target_state", (("state", "healthy"), ("target", a_name)))] == 1
        assert samples[("cube_host_relay_target_state", (("state", "draining"), ("target", dead)))] == 1
        assert samples[("cube_host_relay_target_connections_total", (("target", a_name),))] == 2
        assert samples[("cube_host_relay_target_failures_total", (("kind", "connect"), ("target", dead)))] >= 1
        for s, _ in conns:
            s.close()
    finally:
        await relay.stop(1)
        a.close()


@pytest.fixture
def short_dir():
    path = Path(tempfile.mkdtemp(prefix="crc"))  # Unix socket paths must stay under ~108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_control_socket_is_owner_only_and_drives_the_relay(short_dir: Path) -> None:
    a, b = Tagged(b"AA"), Tagged(b"BB")
    relay = Relay((LOOPBACK, 0), [tcp(a.port)], RelayLimits())
    await relay.start()
    path = short_dir / "relay.sock"
    control = ControlServer(relay, path)
    await control.start()
    ask = lambda request: asyncio.to_thread(control_request, path, request)  # noqa: E731
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        status = await ask({"op": "status"})
        assert status["ok"] and [t["target"] for t in status["targets"]] == [f"tcp:{LOOPBACK}:{a.port}"]
        b_name = f"tcp:{LOOPBACK}:{b.port}"
        assert (await ask({"op": "add", "target": b_name}))["ok"]
        (held_a, tag), = await held(relay, 1)
        assert tag == b"AA"
        answer = await ask({"op": "drain", "target": f"tcp:{LOOPBACK}:{a.port}", "wait": 0.2})
        assert answer["ok"] and answer["open"] == 1 and answer["targets"][0]["state"] == "draining"
        refused = await ask({"op": "remove", "target": f"tcp:{LOOPBACK}:{a.port}"})
        assert not refused["ok"] and "drained first" in refused["error"]
        held_a.close()
        answer = await ask({"op": "drain", "target": f"tcp:{LOOPBACK}:{a.port}", "wait": 5})
        assert answer["ok"] and answer["open"] == 0
        assert (await ask({"op": "remove", "target": f"tcp:{LOOPBACK}:{a.port}"}))["ok"]
        assert [t.name for t in relay.pool.targets] == [b_name]
        assert not (await ask({"op": "explode"}))["ok"]
        assert "needs a target" in (await ask({"op": "drain"}))["error"]
        assert "no target" in (await ask({"op": "resume", "target": "tcp:127.0.0.1:1"}))["error"]
        assert not (await control.handle(b"not json\n"))["ok"]
    finally:
        await control.stop()
        await relay.stop(1)
        a.close()
        b.close()
    assert not path.exists()


async def test_control_socket_refuses_another_user(short_dir: Path) -> None:
    runuser = shutil.which("runuser")
    system_python = shutil.which("python3", path=os.defpath)  # readable by nobody, unlike a venv in a private tree
    assert runuser is not None and system_python and os.geteuid() == 0, "this test runs as root with runuser"
    relay = Relay((LOOPBACK, 0), [tcp(1)], RelayLimits())
    path = short_dir / "relay.sock"
    control = ControlServer(relay, path)
    await control.start()
    try:
        # Widen the file and directory on purpose: the peer-credential check must still refuse.
        os.chmod(short_dir, 0o755)
        os.chmod(path, 0o666)
        code = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
                "s.sendall(b'{\"op\": \"status\"}\\n'); print(s.recv(4096).decode())")
        proc = await asyncio.to_thread(subprocess.run, [runuser, "-u", "nobody", "--", system_python, "-c", code,
                                                        str(path)], capture_output=True, text=True, timeout=30)
        assert '"not allowed"' in proc.stdout, proc.stderr
        assert "targets" not in proc.stdout
    finally:
        await control.stop()


async def test_a_stale_socket_is_replaced_but_a_live_one_or_a_file_is_not(short_dir: Path) -> None:
    from host.relay_control import ControlError

    relay = Relay((LOOPBACK, 0), [tcp(1)], RelayLimits())
    path = short_dir / "relay.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()                                  # a socket file nobody listens on
    first = ControlServer(relay, path)
    await first.start()
    try:
        with pytest.raises(ControlError, match="another relay"):
            await ControlServer(relay, path).start()
    finally:
        await first.stop()
    path.write_text("not a socket")
    with pytest.raises(ControlError, match="not a socket"):
        await ControlServer(relay, path).start()


def test_relay_command_with_several_targets_and_its_control_socket(short_dir: Path, capsys) -> None:
    from host.cli import main
    from tests.host.test_cli import _spawn

    a, b = Tagged(b"AA"), Tagged(b"BB")
    sock = short_dir / "relay.sock"
    a_name, b_name = f"tcp:{LOOPBACK}:{a.port}", f"tcp:{LOOPBACK}:{b.port}"
    proc = _spawn("relay", "--listen", f"{LOOPBACK}:0", "--target", a_name, "--target", b_name,
                  "--control", str(sock), "--health-interval", "0.1", "--grace", "2")

    def reach(port: int) -> bytes:
        with socket.create_connection((LOOPBACK, port), timeout=5) as s:
            s.sendall(b"x")
            s.shutdown(socket.SHUT_WR)
            return s.recv(2)

    try:
        line = proc.stdout.readline()
        assert line.startswith("cube-host relay: ") and f"{a_name}, {b_name}" in line, line + proc.stderr.read()
        port = int(line.split()[2].rsplit(":", 1)[1])
        assert sorted(reach(port) for _ in range(2)) == [b"AA", b"BB"]
        capsys.readouterr()
        assert main(["relay", "drain", a_name, "--control", str(sock), "--wait", "5"]) == 0
        assert f"{a_name}\tdraining\t0 open" in capsys.readouterr().out
        assert [reach(port) for _ in range(3)] == [b"BB"] * 3
        assert main(["relay", "status", "--control", str(sock), "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert [(t["target"], t["state"]) for t in status["targets"]] == [(a_name, "draining"), (b_name, "healthy")]
        assert main(["relay", "remove", b_name, "--control", str(sock)]) == 1
        assert "must be drained first" in capsys.readouterr().err
        assert main(["relay", "resume", a_name, "--control", str(sock)]) == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not sock.exists()
        assert main(["relay", "status", "--control", str(sock)]) == 1
        assert "relay control socket" in capsys.readouterr().err
    finally:
        proc.kill()
        a.close()
        b.close()


def test_relay_settings_take_one_target_or_a_list(tmp_path: Path) -> None:
    from host.config import ConfigError
    from tests.host.conftest import host_config

    both = {"listen": "127.0.0.1:0", "target": "tcp:127.0.0.1:1", "targets": ["tcp:127.0.0.1:2"]}
    with pytest.raises(ConfigError, match="either target"):
        host_config(tmp_path, relay=both)
    with pytest.raises(ConfigError, match="either target"):
        host_config(tmp_path, relay={"listen": "127.0.0.1:0"})
    config = host_config(tmp_path, relay={"targets": ["tcp:127.0.0.1:2", "tcp:127.0.0.1:3"],
                                          "control_socket": "run/relay.sock", "health": {"probe": "tls"}})
    assert config.relay is not None and config.relay.all_targets() == ["tcp:127.0.0.1:2", "tcp:127.0.0.1:3"]
    assert config.relay.control_socket == tmp_path / "run" / "relay.sock" and config.relay.health.probe == "tls"


def test_serve_runs_the_configured_replicas_relay_with_its_control_socket(tmp_path: Path, short_dir: Path) -> None:
    from tests.host.test_cli import _spawn

    a, b = Tagged(b"AA"), Tagged(b"BB")
    port, relay_port = free_port(), free_port()
    sock = short_dir / "relay.sock"
    config = tmp_path / "host.yaml"
    config.write_text(f"data_dir: data\nlisten: {LOOPBACK}:{port}\ncollateral: {{offline: true}}\n"
                      f"relay: {{listen: '{LOOPBACK}:{relay_port}', control_socket: '{sock}', "
                      f"targets: ['tcp:{LOOPBACK}:{a.port}', 'tcp:{LOOPBACK}:{b.port}'], "
                      f"health: {{probe: tcp, interval: 0.1}}}}\n")
    proc = _spawn("serve", "--config", str(config))
    try:
        line = ""
        while not line.startswith("cube-host relay: "):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
        assert sock.exists() and stat.S_IMODE(sock.stat().st_mode) == 0o600
        status = control_request(sock, {"op": "status"})
        assert [t["state"] for t in status["targets"]] == ["healthy", "healthy"]
        tags = []
        for _ in range(2):
            with socket.create_connection((LOOPBACK, relay_port), timeout=5) as s:
                s.sendall(b"x")
                tags.append(s.recv(2))
        assert sorted(tags) == [b"AA", b"BB"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not sock.exists()
    finally:
        proc.kill()
        a.close()
        b.close()


async def test_a_refused_drain_request_drains_nothing(short_dir: Path) -> None:
    """A drain with a bad ``wait`` is answered with an error, and the target stays in the rotation (it was
    drained before the check, so an operator's typo took a replica out while saying it had failed)."""
    a = Tagged(b"AA")
    relay = Relay((LOOPBACK, 0), [tcp(a.port)], RelayLimits())
    await relay.start()
    control = ControlServer(relay, short_dir / "relay.sock")
    try:
        name = f"tcp:{LOOPBACK}:{a.port}"
        for wait in (-1, MAX_WAIT_SECONDS + 1, "5", True, float("nan")):
            line = json.dumps({"op": "drain", "target": name, "wait": wait}).encode() + b"\n"
            answer = await control.handle(line)
            assert not answer["ok"] and "wait must be" in answer["error"], wait
        assert [t["state"] for t in relay.targets_status()] != ["draining"]
        (sock, tag), = await held(relay, 1)
        sock.close()
        assert tag == b"AA"   # new clients still reach it
    finally:
        await relay.stop(1)
        a.close()
