"""Slow and greedy clients against the enclave's HTTP protocol (real TLS on 127.0.0.1): a connection that
handshakes and stays silent, headers or a body trickled a byte at a time, and more connections than allowed."""

from __future__ import annotations

import json
import socket
import ssl
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from enclave.limits import limited_httptools_protocol

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.5


def _app(_tls) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"size": len(await request.body())})

    @app.get("/ping")
    async def ping() -> JSONResponse:
        return JSONResponse({"ok": True})

    return app


def _serve(make_server, **limits):
    protocol = limited_httptools_protocol(16_384, **{"header_timeout": HEADER_TIMEOUT, "body_timeout": BODY_TIMEOUT,
                                                     **limits})
    return make_server(_app, http=protocol)


def _connect(port: int) -> ssl.SSLSocket:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the adversary's own socket; what is attacked is the server's patience
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")
    sock.settimeout(10)
    return sock


def _read_until_closed(sock: ssl.SSLSocket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, ssl.SSLError, TimeoutError):
        pass
    return data


def _response(sock: ssl.SSLSocket) -> bytes:
    """One whole response (headers and Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _trickle(sock: ssl.SSLSocket, payload: bytes, every: float, limit: float) -> float:
    """Send ``payload`` one byte per ``every`` seconds until the server closes; seconds it took."""
    start = time.monotonic()
    sock.settimeout(every)
    for byte in payload:
        assert time.monotonic() - start < limit, "the server kept a trickling connection open"
        try:
            sock.sendall(bytes([byte]))
            if sock.recv(65536) == b"":
                break
        except TimeoutError:
            continue
        except (OSError, ssl.SSLError):
            break
    return time.monotonic() - start


def test_a_handshaken_but_silent_connection_is_closed_with_408(make_server) -> None:
    server = _serve(make_server)
    sock = _connect(server.port)
    start = time.monotonic()
    reply = _read_until_closed(sock)
    elapsed = time.monotonic() - start
    assert HEADER_TIMEOUT * 0.8 <= elapsed < HEADER_TIMEOUT + 3
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "request_timeout"


def test_headers_trickled_a_byte_at_a_time_do_not_extend_the_deadline(make_server) -> None:
    server = _serve(make_server)
    sock = _connect(server.port)
    request = b"GET /ping HTTP/1.1\r\nHost: localhost\r\n" + b"X-Pad: " + b"a" * 200 + b"\r\n\r\n"
    elapsed = _trickle(sock, request, 0.2, HEADER_TIMEOUT + 4)
    assert elapsed < HEADER_TIMEOUT + 3


def test_a_body_trickled_a_byte_at_a_time_is_cut_at_the_body_deadline(make_server) -> None:
    server = _serve(make_server)
    sock = _connect(server.port)
    sock.sendall(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\nContent-Length: 200\r\n\r\n")
    elapsed = _trickle(sock, b"b" * 200, 0.2, BODY_TIMEOUT + 4)
    assert BODY_TIMEOUT * 0.8 <= elapsed < BODY_TIMEOUT + 3


def test_prompt_clients_are_unaffected_and_keep_alive_restarts_the_deadline(make_server) -> None:
    server = _serve(make_server)
    sock = _connect(server.port)
    for _ in range(3):  # each request well within the deadlines, together longer than them
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello")
        reply = _response(sock)
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'{"size":5}')
        time.sleep(HEADER_TIMEOUT * 0.6)


def test_connections_beyond_the_cap_get_503_and_are_closed(make_server) -> None:
    server = _serve(make_server, max_connections=2)
    held = [_connect(server.port) for _ in range(2)]
    extra = _connect(server.port)
    head, _, body = _read_until_closed(extra).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and json.loads(body)["error"]["code"] == "server_busy"
    held[0].sendall(b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert _response(held[0]).startswith(b"HTTP/1.1 200")  # those within the cap are served
    for sock in held:
        sock.close()
