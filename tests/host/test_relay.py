"""Relay behaviour on real loopback sockets: data integrity, half-close, limits, timeouts, shutdown."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import threading
import time

import pytest

from host.relay import Relay, RelayError, RelayLimits, parse_listen, parse_target, target_socket
from tests.host.servers import (LOOPBACK, TamperingProxy, ThreadedServer, echo, free_port, recv_all,
                                self_signed, tls_server_context)

PUMPS = ["splice", "copy", "streams"]


async def start_relay(target_port: int, pump: str | None = None, **limits) -> Relay:  # None: default pump
    relay = Relay((LOOPBACK, 0), ("tcp", LOOPBACK, target_port), RelayLimits(**limits), pump=pump)  # type: ignore[arg-type]
    await relay.start()
    return relay


def closed_by_peer(s: socket.socket) -> bytes:
    """b"" once the relay has closed the connection (a reset, when it closed with our bytes unread, counts)."""
    try:
        return s.recv(1)
    except ConnectionResetError:
        return b""


def connect(relay: Relay, timeout: float = 10.0) -> socket.socket:
    assert relay.address is not None
    return socket.create_connection(relay.address, timeout=timeout)


@pytest.mark.parametrize("pump", PUMPS)
async def test_bytes_pass_unchanged_both_ways(pump: str) -> None:
    server = ThreadedServer(echo)
    relay = await start_relay(server.port, pump, buffer_bytes=64 * 1024)
    payload = os.urandom(8 * 1024 * 1024 + 7)

    def client() -> bytes:
        with connect(relay) as s:
            sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
            sender.start()
            data = recv_all(s)
            sender.join()
            return data

    try:
        got = await asyncio.to_thread(client)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        assert relay.stats.bytes_up == len(payload) and relay.stats.bytes_down == len(payload)
    finally:
        await relay.stop(1)
        server.close()


@pytest.mark.parametrize("pump", PUMPS)
async def test_half_close_client_first(pump: str) -> None:
    """Client sends a request then SHUT_WR; the enclave sees EOF, still answers, and the client reads it."""

    def handler(conn: socket.socket) -> None:
        request = recv_all(conn)  # returns only once the client's half-close came through
        conn.sendall(b"len=%d" % len(request))

    server = ThreadedServer(handler)
    relay = await start_relay(server.port, pump)

    def client() -> bytes:
        with connect(relay) as s:
            s.sendall(b"x" * 100_000)
            s.shutdown(socket.SHUT_WR)
            return recv_all(s)

    try:
        assert await asyncio.to_thread(client) == b"len=100000"
    finally:
        await relay.stop(1)
        server.close()


@pytest.mark.parametrize("pump", PUMPS)
async def test_half_close_enclave_first(pump: str) -> None:
    """The enclave says its piece and SHUT_WRs; the client sees EOF yet can still send and be heard.
    (The client speaks first, as a TLS client does: the relay connects no enclave before that.)"""
    heard = threading.Event()

    def handler(conn: socket.socket) -> None:
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)
        if recv_all(conn) == b"> still here":
            heard.set()

    server = ThreadedServer(handler)
    relay = await start_relay(server.port, pump)

    def client() -> bytes:
        with connect(relay) as s:
            s.sendall(b"> ")
            first = recv_all(s)
            s.sendall(b"still here")
            s.shutdown(socket.SHUT_WR)
            assert heard.wait(5)
            return first

    try:
        assert await asyncio.to_thread(client) == b"hello"
    finally:
        await relay.stop(1)
        server.close()


async def test_connection_limit_closes_extra_clients_promptly() -> None:
    server = ThreadedServer(echo)
    relay = await start_relay(server.port, max_connections=2)

    def client() -> tuple[bytes, bytes]:
        first, second = connect(relay), connect(relay)
        first.sendall(b"a")
        second.sendall(b"b")
        assert first.recv(1) == b"a" and second.recv(1) == b"b"
        with connect(relay, timeout=5) as third:
            refused = third.recv(1)  # closed by the relay at once: EOF, not a hang
        first.close()
        second.close()
        return refused, b""

    try:
        refused, _ = await asyncio.to_thread(client)
        assert refused == b""
        assert relay.stats.rejected == 1
    finally:
        await relay.stop(1)
        server.close()


@pytest.mark.parametrize("pump", PUMPS)
async def test_idle_connection_is_closed(pump: str) -> None:
    server = ThreadedServer(echo)
    relay = await start_relay(server.port, pump, idle_timeout=0.3)

    def client() -> bytes:
        with connect(relay, timeout=10) as s:
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
            return s.recv(1)  # nothing more is sent: the relay must close us

    try:
        assert await asyncio.to_thread(client) == b""
        assert relay.stats.idle_closed == 1
    finally:
        await relay.stop(1)
        server.close()


async def test_refused_enclave_closes_client_promptly() -> None:
    relay = await start_relay(free_port())  # nothing listens there

    def client() -> bytes:
        with connect(relay, timeout=5) as s:
            s.sendall(b"x")  # a ClientHello's first byte: only now does the relay connect the enclave
            return closed_by_peer(s)

    try:
        assert await asyncio.to_thread(client) == b""
        assert relay.stats.connect_failed == 1
        assert relay.stats.active == 0
    finally:
        await relay.stop(1)


async def test_unresponsive_enclave_hits_connect_timeout() -> None:
    """An enclave whose accept queue is full never completes the handshake; the client is closed
    after connect_timeout instead of waiting forever."""
    silent = socket.socket()
    silent.bind((LOOPBACK, 0))
    silent.listen(0)
    fillers = []
    for _ in range(8):  # fill the accept queue so further SYNs are dropped
        f = socket.socket()
        f.setblocking(False)
        try:
            f.connect(silent.getsockname())
        except BlockingIOError:
            pass
        fillers.append(f)
    relay = await start_relay(silent.getsockname()[1], connect_timeout=0.3)

    def client() -> bytes:
        with connect(relay, timeout=10) as s:
            s.sendall(b"x")
            return closed_by_peer(s)

    try:
        assert await asyncio.to_thread(client) == b""
        assert relay.stats.connect_failed == 1
    finally:
        await relay.stop(1)
        for f in fillers:
            f.close()
        silent.close()


@pytest.mark.parametrize("pump", PUMPS)
async def test_backpressure_bounds_buffering(pump: str) -> None:
    """An enclave that stops reading makes the client's sends block; the relay keeps only a bounded
    amount in flight instead of reading everything into memory."""
    release = threading.Event()
    received = []

    def slow_reader(conn: socket.socket) -> None:
        release.wait(10)
        received.append(len(recv_all(conn)))

    server = ThreadedServer(slow_reader)
    relay = await start_relay(server.port, pump, buffer_bytes=256 * 1024)

    def client() -> int:
        s = connect(relay)
        s.setblocking(False)
        chunk = b"z" * 65536
        sent, stalls = 0, 0
        while stalls < 20 and sent < 512 * 1024 * 1024:
            try:
                sent += s.send(chunk)
                stalls = 0
            except BlockingIOError:
                stalls += 1
                time.sleep(0.02)
        release.set()
        s.setblocking(True)
        s.shutdown(socket.SHUT_WR)
        recv_all(s)
        s.close()
        return sent

    try:
        sent = await asyncio.to_thread(client)
        # kernel socket buffers on three sockets plus the relay's bounded buffer: a few tens of MiB at most
        assert sent < 96 * 1024 * 1024
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.05)
        assert received == [sent]
    finally:
        await relay.stop(1)
        server.close()


async def test_shutdown_stops_accepting_and_drains_open_connections() -> None:
    server = ThreadedServer(echo)
    relay = await start_relay(server.port)
    address = relay.address
    s = await asyncio.to_thread(connect, relay)
    await asyncio.to_thread(s.sendall, b"before")
    assert await asyncio.to_thread(s.recv, 6) == b"before"

    stopping = asyncio.ensure_future(relay.stop(grace=10))
    await asyncio.sleep(0.1)
    with pytest.raises(OSError):  # listener closed: new clients are refused
        await asyncio.to_thread(socket.create_connection, address, 2)
    assert not stopping.done()
    await asyncio.to_thread(s.sendall, b"during")  # the open connection keeps working
    assert await asyncio.to_thread(s.recv, 6) == b"during"
    s.shutdown(socket.SHUT_WR)
    assert await asyncio.to_thread(recv_all, s) == b""
    s.close()
    await asyncio.wait_for(stopping, 5)  # finished as soon as the last connection ended
    server.close()


@pytest.mark.parametrize("pump", PUMPS)
async def test_shutdown_grace_expiry_aborts_lingering_connections(pump: str) -> None:
    server = ThreadedServer(echo)
    relay = await start_relay(server.port, pump)
    s = await asyncio.to_thread(connect, relay)
    await asyncio.to_thread(s.sendall, b"x")
    assert await asyncio.to_thread(s.recv, 1) == b"x"
    started = time.monotonic()
    await relay.stop(grace=0.3)
    assert time.monotonic() - started < 5
    assert await asyncio.to_thread(s.recv, 1) == b""
    s.close()
    server.close()


# --- TLS through the relay -----------------------------------------------------------------------

def _tls_server(tmp_path, response: bytes) -> tuple[ThreadedServer, ssl.SSLContext]:
    cert, key = self_signed(tmp_path)
    server_ctx = tls_server_context(cert, key)

    def handler(conn: socket.socket) -> None:
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                request = tls.recv(1024)
                tls.sendall(response + request)
        except (ssl.SSLError, OSError):
            pass

    client_ctx = ssl.create_default_context(cafile=str(cert))
    return ThreadedServer(handler), client_ctx


def _tls_fetch(address, client_ctx: ssl.SSLContext) -> bytes:
    with socket.create_connection(address, timeout=10) as raw:
        with client_ctx.wrap_socket(raw, server_hostname="enclave.test") as tls:
            tls.sendall(b"GET")
            chunks = []
            while True:
                data = tls.recv(65536)
                if not data:
                    break
                chunks.append(data)
            return b"".join(chunks)


async def test_tls_end_to_end_through_relay(tmp_path) -> None:
    response = os.urandom(200_000)
    server, client_ctx = _tls_server(tmp_path, response)
    relay = await start_relay(server.port)
    try:
        got = await asyncio.to_thread(_tls_fetch, relay.address, client_ctx)
        assert got == response + b"GET"
    finally:
        await relay.stop(1)
        server.close()


async def test_byte_flipped_in_transit_is_detected_by_tls(tmp_path) -> None:
    """A lying hop flips one bit deep inside the application data: the TLS client raises, it never
    returns altered bytes."""
    response = os.urandom(200_000)
    server, client_ctx = _tls_server(tmp_path, response)
    liar = TamperingProxy(server.port, offset=100_000)
    relay = await start_relay(liar.port)
    try:
        with pytest.raises(ssl.SSLError):
            await asyncio.to_thread(_tls_fetch, relay.address, client_ctx)
        assert liar.flipped.is_set()
    finally:
        await relay.stop(1)
        liar.close()
        server.close()


# --- addresses -------------------------------------------------------------------------------------

def test_parse_addresses() -> None:
    assert parse_listen("0.0.0.0:8443") == ("0.0.0.0", 8443)
    assert parse_listen("[::1]:443") == ("::1", 443)
    assert parse_target("tcp:10.0.0.2:9443") == ("tcp", "10.0.0.2", 9443)
    assert parse_target("vsock:3:8443") == ("vsock", 3, 8443)
    for bad in ("8443", "tcp:host", "vsock:x:1", "udp:1.2.3.4:5", "vsock:3", "tcp:h:99999"):
        with pytest.raises(RelayError):
            parse_target(bad) if ":" in bad and not bad[0].isdigit() else parse_listen(bad)


def test_vsock_target_socket_is_constructed() -> None:
    """AF_VSOCK: only construction can be checked here (no vsock transport on this machine)."""
    sock, address = target_socket(("vsock", 3, 8443))
    try:
        assert sock.family == socket.AF_VSOCK
        assert address == (3, 8443)
        assert sock.getblocking() is False
    finally:
        sock.close()


def _connect_from(relay: Relay, source: str, timeout: float = 5.0) -> socket.socket:
    assert relay.address is not None
    return socket.create_connection(relay.address, timeout=timeout, source_address=(source, 0))


async def test_one_source_cannot_take_every_slot() -> None:
    """Connections from one address beyond max_per_source are closed at once; other addresses still get in."""
    server = ThreadedServer(echo)
    relay = await start_relay(server.port, max_connections=100, max_per_source=2)

    def client() -> tuple[bytes, bytes]:
        held = [_connect_from(relay, "127.0.0.1") for _ in range(2)]
        for s in held:
            s.sendall(b"a")
            assert s.recv(1) == b"a"
        with _connect_from(relay, "127.0.0.1") as extra:
            refused = closed_by_peer(extra)
        with _connect_from(relay, "127.0.0.2") as other:
            other.sendall(b"b")
            served = other.recv(1)
        for s in held:
            s.close()
        return refused, served

    try:
        assert await asyncio.to_thread(client) == (b"", b"b")
        assert relay.stats.source_rejected == 1
    finally:
        await relay.stop(1)
        server.close()


async def test_a_client_that_sends_nothing_is_closed_at_the_first_byte_deadline() -> None:
    server = ThreadedServer(echo)
    relay = await start_relay(server.port, first_byte_timeout=0.3)

    def client() -> tuple[bytes, float]:
        start = time.monotonic()
        with connect(relay, timeout=5) as s:
            return closed_by_peer(s), time.monotonic() - start

    try:
        closed, elapsed = await asyncio.to_thread(client)
        assert closed == b"" and elapsed < 3
        assert relay.stats.first_byte_timeouts == 1 and relay.stats.active == 0
        assert server.connections == []  # no enclave connection was spent on it
    finally:
        await relay.stop(1)
        server.close()


@pytest.mark.parametrize("pump", PUMPS)
async def test_a_half_closed_connection_does_not_keep_its_slot(pump: str) -> None:
    """The client half-closes, the enclave side never ends: closed after half_close_timeout, not idle_timeout."""
    release = threading.Event()

    def holder(conn: socket.socket) -> None:
        recv_all(conn)        # until the client's EOF
        release.wait(10)      # then never answer nor close (bounded: the test releases it)

    server = ThreadedServer(holder)
    relay = await start_relay(server.port, pump, idle_timeout=300, half_close_timeout=0.3)

    def client() -> tuple[bytes, float]:
        with connect(relay, timeout=5) as s:
            s.sendall(b"request")
            s.shutdown(socket.SHUT_WR)
            start = time.monotonic()
            return closed_by_peer(s), time.monotonic() - start

    try:
        closed, elapsed = await asyncio.to_thread(client)
        assert closed == b"" and elapsed < 3
        assert relay.stats.half_close_closed == 1 and relay.stats.active == 0
    finally:
        release.set()
        await relay.stop(1)
        server.close()


async def test_hopping_across_ipv6_64s_of_one_48_cannot_take_every_slot() -> None:
    """One customer's /48 holds 65536 /64s: counted per /64 alone, it filled the whole relay 64 connections
    per /64 (16 of them for the default 1024). Its /48 is capped too; another network still gets in, and
    IPv4 (mapped or not) is counted per address as before."""
    relay = Relay((LOOPBACK, 0), ("tcp", LOOPBACK, 1), RelayLimits(max_per_source=2, max_per_network=5))
    admitted = [relay._admit(f"2001:db8:1:{n:x}::1") for n in range(10)]           # ten /64s of one /48
    assert sum(groups is not None for groups in admitted) == 5
    assert relay._admit("2001:db8:1:ff::2") is None
    assert relay._admit("2001:db8:2::1") is not None                                 # another /48
    assert relay._admit("192.0.2.1") is not None and relay._admit("::ffff:192.0.2.1") is not None
    assert relay._admit("192.0.2.1") is None                                        # its per-address cap
    for groups in admitted:
        if groups is not None:
            relay._release(groups)
    assert relay._admit("2001:db8:1:ff::2") is not None                              # slots come back
