"""cube-attest proxy under attack: web pages, path tricks toward admin routes, smuggling, header injection,
resource exhaustion, and the PAT leaking into output. Each test also checks what the enclave side received."""

from __future__ import annotations

import json
import select
import shutil
import socket
import subprocess
import time
from typing import Any

import httpx
import pytest
from fastapi import Request
from fastapi.responses import JSONResponse

from attestation.proxy.access import AccessRules
from attestation.proxy.server import Limits

from .conftest import PAT, enclave_like_app
from .proxyrun import make_proxy  # noqa: F401 - fixture
from .test_openai import enclave  # noqa: F401 - fixture: the real enclave app over a fake Ollama
from .test_proxy import raw_exchange as exchange
from .test_proxy_cli import Running, private_file, sim_policy_file  # noqa: F401 - sim_policy_file is a fixture

DOMAIN = "d1"


def recording_app(tls: Any) -> Any:
    """The enclave-like app plus a catch-all route recording what reached the enclave (decoded path, headers)."""
    app = enclave_like_app(tls)
    app.state.seen = []

    @app.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
    async def anything(request: Request) -> JSONResponse:
        body = await request.body()
        seen = {"method": request.method, "path": request.scope["path"], "body_len": len(body),
                "headers": [[k.decode(), v.decode()] for k, v in request.scope["headers"]]}
        app.state.seen.append(seen)
        return JSONResponse(seen)

    return app


@pytest.fixture
def upstream(make_server):
    return make_server(recording_app)


def responses(raw: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in ``raw`` (bodies framed by Content-Length or chunked)."""
    found = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        headers = {line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip()
                   for line in head.split(b"\r\n")[1:]}
        if b"content-length" in headers:
            size = int(headers[b"content-length"])
            body, raw = rest[:size], rest[size:]
        else:  # chunked
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                body, rest = body + rest[:size], rest[size + 2:]
                if size == 0:
                    break
            raw = rest
        found.append((status, body))
    return found


def refused_code(raw: bytes) -> tuple[int, str]:
    (status, body), = responses(raw)
    return status, json.loads(body)["error"]["code"]


def request(port: int, target: bytes, *headers: bytes, method: bytes = b"GET", body: bytes = b"",
            host: bytes | None = None) -> bytes:
    host_line = [b"Host: " + (host if host is not None else f"127.0.0.1:{port}".encode())]
    lines = [method + b" " + target + b" HTTP/1.1", *host_line, *headers, b"Connection: close"]
    if body:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return exchange(port, b"\r\n".join(lines) + b"\r\n\r\n" + body)


CHAT = f"/proxy/{DOMAIN}/v1/chat/completions".encode()


# -- 1. web pages in the user's browser ---------------------------------------------------------------
def test_web_pages_and_rebound_names_are_refused_before_anything_is_sent(upstream, make_proxy, sim_policy):
    proxy = make_proxy(upstream.url, sim_policy, pat=PAT)
    port = proxy.port
    body = b'{"model": "m", "messages": [{"role": "user", "content": "burn quota"}]}'
    attacks = {
        "simple CORS POST, text/plain": request(port, CHAT, b"Origin: https://evil.example",
                                                b"Content-Type: text/plain", method=b"POST", body=body),
        "form post from a sandboxed frame": request(port, CHAT, b"Origin: null",
                                                    b"Content-Type: application/x-www-form-urlencoded",
                                                    method=b"POST", body=b"a=b"),
        "no-cors GET by another site": request(port, f"/proxy/{DOMAIN}/v1/models".encode(),
                                               b"Sec-Fetch-Site: cross-site"),
        "another port of localhost": request(port, CHAT, b"Sec-Fetch-Site: same-site", method=b"POST", body=body),
        "two Origin headers, one allowed-looking": request(port, CHAT, b"Origin: http://127.0.0.1:1",
                                                           b"Origin: https://evil.example", method=b"POST", body=body),
    }
    for name, raw in attacks.items():
        assert refused_code(raw) == (403, "forbidden_origin"), name
    rebinding = {
        "DNS rebinding": f"attacker.example:{port}".encode(),
        "a loopback name with another port": f"127.0.0.1:{port + 1}".encode(),
        "no port": b"127.0.0.1",
        "suffix trick": f"127.0.0.1.attacker.example:{port}".encode(),
        "empty": b"",
    }
    for name, host in rebinding.items():
        assert refused_code(request(port, CHAT, method=b"POST", body=body, host=host)) == (403, "bad_host"), name
    no_host = exchange(port, b"GET /proxy/d1/v1/models HTTP/1.0\r\n\r\n")
    assert refused_code(no_host) == (403, "bad_host")
    assert upstream.app.state.seen == [] and upstream.app.state.seen_authorization == []

    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}", f"[::1]:{port}"):
        (status, _), = responses(request(port, CHAT, b"Sec-Fetch-Mode: cors", b"User-Agent: node",
                                         method=b"POST", body=body, host=host.encode()))
        assert status == 200, host  # what Node's fetch (Continue, OpenCode) sends: no Origin, no Sec-Fetch-Site
    assert [seen["path"] for seen in upstream.app.state.seen] == [CHAT.decode()] * 4


def test_allow_origin_admits_exactly_the_listed_origins(upstream, make_proxy, sim_policy):
    proxy = make_proxy(upstream.url, sim_policy, pat=PAT,
                       access=AccessRules(allow_origins=frozenset({"vscode-webview://abc"})))
    ok = responses(request(proxy.port, CHAT, b"Origin: vscode-webview://ABC", b"Sec-Fetch-Site: cross-site",
                           method=b"POST", body=b"{}"))
    assert ok[0][0] == 200
    assert refused_code(request(proxy.port, CHAT, b"Origin: vscode-webview://abcd", method=b"POST",
                                body=b"{}")) == (403, "forbidden_origin")
    assert len(upstream.app.state.seen) == 1


def test_nodes_fetch_as_continue_and_opencode_use_it_passes(upstream, make_proxy, sim_policy):
    node = shutil.which("node")
    assert node, "node is not installed: this test needs Node's fetch (the runtime of Continue's core and OpenCode)"
    proxy = make_proxy(upstream.url, sim_policy, pat=PAT)
    script = ("fetch(process.argv[1], {method: 'POST', headers: {'content-type': 'application/json', "
              "authorization: 'Bearer '}, body: '{\"model\": \"m\"}'}).then(async r => "
              "console.log(r.status, await r.text())).catch(e => { console.error(e); process.exit(1) })")
    result = subprocess.run([node, "-e", script, f"{proxy.url}{CHAT.decode()}"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("200 ")
    sent = dict(upstream.app.state.seen[0]["headers"])
    assert sent["authorization"] == f"Bearer {PAT}" and "origin" not in sent


# -- 2. least privilege: model APIs only, no path tricks ----------------------------------------------
PATH_ATTACKS = [
    b"/admin/users", b"/users/me", b"/proxy/x/admin/users", b"/proxy/x/../../admin/users",
    b"/proxy/x/%2e%2e/%2E%2E/admin/users", b"//admin/users", b"/proxy/x/v1/../../../admin/users",
    b"/proxy/x/v1/%2e%2e%2f%2e%2e%2f..%2fadmin/users", b"/proxy/x/v1%2f..%2f..%2f..%2fadmin/users",
    b"/proxy/x/v1\\..\\..\\..\\admin\\users", b"/proxy/x/v1/..;/..;/..;/admin/users",
    b"/proxy/x/v1;/../../admin/users", b"/proxy/x/v1/%252e%252e/%252e%252e/admin", b"/proxy/x/./v1/models",
    b"/proxy//v1/models", b"/proxy/x/v1/models#x", b"/proxy/x/v1/%00", b"/proxy/x/v1/%ff", b"/proxy/x/V1/models",
    b"/PROXY/x/v1/models", b"/proxy/x/v1/./models", b"/proxy/x/v1/.%2e/.%2E/admin",
]


def test_only_model_api_paths_are_relayed_and_no_path_trick_reaches_another_route(upstream, make_proxy, sim_policy):
    proxy = make_proxy(upstream.url, sim_policy, pat=PAT)
    for target in PATH_ATTACKS:
        status, code = refused_code(request(proxy.port, target, method=b"POST", body=b"{}"))
        assert (status, code) == (403, "forbidden_path"), target
    for target in (f"http://127.0.0.1:{upstream.port}/admin/users".encode(), b"127.0.0.1:443", b"*"):
        method = b"CONNECT" if target == b"127.0.0.1:443" else b"OPTIONS" if target == b"*" else b"GET"
        status, code = refused_code(request(proxy.port, target, method=method))
        assert status == 400 and code == "invalid_request", target  # absolute-, authority-, asterisk-form
    assert upstream.app.state.seen == [] and upstream.app.state.seen_authorization == []
    allowed = [b"/proxy/x/v1/models", b"/proxy/x/v1/models/org%2Fmodel:7b", b"/proxy/x/api/tags",
               b"/proxy/x/v1/chat/completions?x=../../admin"]
    for target in allowed:
        assert responses(request(proxy.port, target))[0][0] == 200, target
    assert [seen["path"] for seen in upstream.app.state.seen] == [
        "/proxy/x/v1/models", "/proxy/x/v1/models/org/model:7b", "/proxy/x/api/tags", "/proxy/x/v1/chat/completions"]


def test_domain_restricts_to_that_domain_and_allow_all_paths_still_refuses_dot_segments(upstream, make_proxy,
                                                                                        sim_policy):
    only = make_proxy(upstream.url, sim_policy, pat=PAT, access=AccessRules(domain=DOMAIN))
    assert refused_code(request(only.port, b"/proxy/other/v1/models")) == (403, "forbidden_path")
    assert refused_code(request(only.port, b"/proxy/d1%2f..%2fother/v1/models")) == (403, "forbidden_path")
    assert responses(request(only.port, f"/proxy/{DOMAIN}/api/chat".encode(), method=b"POST", body=b"{}"))[0][0] \
        == 200
    everything = make_proxy(upstream.url, sim_policy, pat=PAT, access=AccessRules(allow_all_paths=True))
    assert responses(request(everything.port, b"/admin/users"))[0][0] == 200
    for target in (b"/proxy/x/../../admin/users", b"/x/%2e%2e/admin", b"//admin"):
        assert refused_code(request(everything.port, target)) == (403, "forbidden_path"), target
    assert [seen["path"] for seen in upstream.app.state.seen] == [f"/proxy/{DOMAIN}/api/chat", "/admin/users"]


# -- 3. request smuggling between client and proxy ----------------------------------------------------
def test_ambiguous_framing_is_refused_and_the_upstream_sees_only_requests_the_proxy_parsed(upstream, make_proxy,
                                                                                          sim_policy):
    proxy = make_proxy(upstream.url, sim_policy, pat=PAT, access=AccessRules(allow_all_paths=True))
    host = f"Host: 127.0.0.1:{proxy.port}\r\n".encode()
    smuggled = b"GET /admin/users HTTP/1.1\r\n" + host + b"\r\n"
    cl_te = (b"POST " + CHAT + b" HTTP/1.1\r\n" + host + b"Content-Length: " + str(5 + len(smuggled)).encode()
             + b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled)
    assert refused_code(exchange(proxy.port, cl_te)) == (400, "invalid_request")
    te_cl = (b"POST " + CHAT + b" HTTP/1.1\r\n" + host + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
             b"0\r\n\r\n" + smuggled)
    assert refused_code(exchange(proxy.port, te_cl)) == (400, "invalid_request")
    two_lengths = b"POST " + CHAT + b" HTTP/1.1\r\n" + host + b"Content-Length: 2\r\nContent-Length: 40\r\n\r\n{}"
    assert refused_code(exchange(proxy.port, two_lengths)) == (400, "invalid_request")
    gzip_chunked = b"POST " + CHAT + b" HTTP/1.1\r\n" + host + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
    assert refused_code(exchange(proxy.port, gzip_chunked))[0] in (400, 501)
    assert upstream.app.state.seen == []

    # a request inside a body stays body; one pipelined behind a body is a request of its own, checked as one
    inner = b"POST " + CHAT + b" HTTP/1.1\r\n" + host + b"Content-Length: " + str(len(smuggled)).encode() \
        + b"\r\n\r\n" + smuggled
    forbidden = b"GET /proxy/x/../../admin/users HTTP/1.1\r\n" + host + b"Connection: close\r\n\r\n"
    folded = b"GET " + CHAT + b" HTTP/1.1\r\n" + host + b"X-A: a\r\n Authorization: Bearer evil\r\n\r\n"
    statuses = [status for status, _ in responses(exchange(proxy.port, inner + folded + forbidden))]
    assert statuses == [200, 200, 403]
    first, second = upstream.app.state.seen
    assert (first["path"], first["body_len"]) == (CHAT.decode(), len(smuggled))
    assert second["path"] == CHAT.decode()
    names = [name for name, _ in second["headers"]]
    assert names.count("authorization") == 1 and dict(second["headers"])["authorization"] == f"Bearer {PAT}"
    assert dict(second["headers"])["x-a"] == "a Authorization: Bearer evil"  # obs-fold unfolded into one value


# -- 4. header injection toward the enclave ----------------------------------------------------------
def test_the_enclave_sees_exactly_one_authorization_the_pats_and_no_forwarding_claims(upstream, make_proxy,
                                                                                     sim_policy):
    proxy = make_proxy(upstream.url, sim_policy, pat=PAT)
    raw = request(proxy.port, CHAT, b"authorization: Bearer lower", b"AUTHORIZATION: Bearer upper",
                  b"Proxy-Authorization: Bearer proxy", b"Connection: Authorization, X-Keep",
                  b"X-Forwarded-For: 203.0.113.9", b"X-Forwarded-Host: admin.example", b"X-Forwarded-Proto: https",
                  b"Forwarded: for=203.0.113.9", b"X-Real-IP: 203.0.113.9", b"X-Keep: hop", b"X-Custom: kept",
                  method=b"POST", body=b"{}")
    assert responses(raw)[0][0] == 200
    headers = upstream.app.state.seen[0]["headers"]
    names = [name for name, _ in headers]
    sent = dict(headers)
    assert names.count("authorization") == 1 and sent["authorization"] == f"Bearer {PAT}"
    assert names.count("host") == 1 and sent["host"] == f"127.0.0.1:{upstream.port}"
    assert not {"proxy-authorization", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "forwarded",
                "x-real-ip", "x-keep", "connection"} & set(names)
    assert sent["x-custom"] == "kept"


# -- 5. resource exhaustion --------------------------------------------------------------------------
def closed_within(conn: socket.socket, seconds: float, *, trickle: bytes = b"") -> bool:
    """True when the proxy closes ``conn`` within ``seconds`` while we keep sending ``trickle`` every 0.2 s."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if trickle:
            try:
                conn.sendall(trickle)
            except OSError:
                return True
        readable, _, _ = select.select([conn], [], [], 0.2)
        if readable:
            try:
                if not conn.recv(65536):
                    return True
            except OSError:
                return True
    return False


def test_idle_connections_are_capped_and_slow_heads_and_bodies_have_total_deadlines(upstream, make_proxy,
                                                                                   sim_policy):
    limits = Limits(max_connections=4, header_timeout=1.0, body_timeout=1.0, max_body_bytes=1000)
    proxy = make_proxy(upstream.url, sim_policy, pat=PAT, limits=limits)
    idle = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10) for _ in range(4)]
    try:
        time.sleep(0.2)
        assert refused_code(exchange(proxy.port, b"")) == (503, "too_many_connections")
    finally:
        for conn in idle:
            conn.close()
    deadline = time.monotonic() + 2
    while (status := responses(request(proxy.port, b"/proxy/x/v1/models"))[0][0]) == 503 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status == 200  # slots come back once those connections are gone

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as slow:  # slowloris: a byte at a time
        slow.sendall(b"GET /proxy/x/v1/models HTTP/1.1\r\n")
        assert closed_within(slow, 3.0, trickle=b"X"), "a head trickling in kept its connection past the deadline"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as slow:
        slow.sendall(b"POST " + CHAT + f" HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\nTransfer-Encoding: chunked"
                     "\r\n\r\n".encode())
        assert closed_within(slow, 3.0, trickle=b"1\r\nx\r\n"), "a body trickling in outlived body_timeout"
    head = f"POST {CHAT.decode()} HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\nTransfer-Encoding: chunked\r\n\r\n"
    endless = head.encode() + (b"64\r\n" + b"x" * 100 + b"\r\n") * 11  # 1100 bytes in 100-byte chunks, no end
    assert refused_code(exchange(proxy.port, endless)) == (413, "request_too_large")
    assert [seen["path"] for seen in upstream.app.state.seen] == ["/proxy/x/v1/models"]


# -- 6. the PAT never in output or in the proxy's own error bodies ------------------------------------
def test_the_real_command_never_prints_or_echoes_the_pat(enclave, sim_policy_file, tmp_path):  # noqa: F811
    server, domain, token = enclave
    pat_file = private_file(tmp_path / "cube.pat", token + "\n")
    running = Running("--listen", "127.0.0.1:0", "--upstream", server.url, "--policy", str(sim_policy_file),
                      "--pat-file", str(pat_file), "--domain", domain)
    bodies: list[bytes] = []
    try:
        lines = running.until("listening on http://127.0.0.1:")
        url = lines[-1].split("listening on ", 1)[1].split(" ", 1)[0]
        port = int(url.rsplit(":", 1)[1])
        with httpx.Client(trust_env=False, timeout=10) as client:
            ok = client.get(f"{url}/proxy/{domain}/v1/models?api_key={token}")
            assert ok.status_code == 200
            for target, headers in ((f"/proxy/{domain}/v1/models", {"Origin": "https://evil.example"}),
                                    ("/admin/users", {}), (f"/proxy/other/v1/models?k={token}", {}),
                                    (f"/proxy/{domain}/v1/nothing-here", {"Authorization": f"Bearer {token}x"})):
                response = client.get(url + target, headers=headers)
                assert response.status_code in (403, 404), target
                bodies.append(response.content)
        bodies.append(exchange(port, b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:" + str(port).encode()
                               + b"\r\nAuthorization: Bearer " + token.encode() + b"\r\nBad Header\r\n\r\n"))
    finally:
        code = running.stop()
    assert code == 0
    output = "".join(lines) + "".join(running.until("stopped"))
    assert "/admin/users -> 403 forbidden_path" in output  # the access lines are there, without the PAT
    assert token not in output
    assert not any(token.encode() in body for body in bodies)
