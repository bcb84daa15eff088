"""Canary: the real `cube-enclave serve` process, every route driven with PATs in every place a client or an
attacker puts them (bad requests included), and not one form of them in anything the process writes."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx

from enclave.tokens import generate_token

from tests.enclave.test_main import free_port, wait_until_serving


def _percent_encoded(text: str) -> str:
    return "".join(f"%{b:02X}" for b in text.encode())


def _routes(client: httpx.Client) -> list[tuple[str, str]]:
    """(method, path template) of every route the running service documents, and its documentation pages."""
    spec = client.get("/openapi.json").json()
    documented = {(m.upper(), path) for path, ops in spec["paths"].items() for m in ops}
    return sorted(documented | {("GET", p) for p in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")})


def _fill(template: str, ids: str, model: str) -> str:
    return re.sub(r"\{(\w+)(?::path)?\}", lambda m: model if m.group(1) == "model" else ids, template)


def test_no_log_line_ever_holds_a_pat(tmp_path: Path) -> None:
    port = free_port()
    pat_file = tmp_path / "admin.pat"
    config = tmp_path / "enclave.yaml"
    config.write_text("log_json: true\nlog_level: DEBUG\n")
    out_log, err_log = tmp_path / "stdout.log", tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUBE_ENCLAVE__")}
    with open(out_log, "w") as out, open(err_log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "enclave.main", "serve", "--simulate", "--config", str(config),
                                 "--data-dir", str(tmp_path / "data"), "--port", str(port),
                                 "--pat-file", str(pat_file)], stdout=out, stderr=err, env=env)
    try:
        ctx = wait_until_serving(proc, tmp_path / "data" / "server-cert.pem", port, err_log)
        valid = pat_file.read_text().strip()          # the bootstrap superadmin's: requests get all the way in
        unknown = generate_token()
        canaries = (valid, unknown)
        base = f"https://localhost:{port}"

        def placements(token: str) -> list[tuple[dict[str, str], str]]:
            """(headers, query) pairs: every place a token travels."""
            return [({"Authorization": f"Bearer {token}"}, ""),
                    ({"Authorization": f"Bearer {token}", "x-api-key": token}, ""),
                    ({"Authorization": f"Bearer {token.upper()}", "X-API-KEY": token.upper()}, ""),
                    ({"Authorization": f"Bearer {token}"},
                     f"?api_key={token}&token={quote(_percent_encoded(token))}&key={token.upper()}"),
                    ({"Authorization": _percent_encoded(f"Bearer {token}")}, f"?access_token={_percent_encoded(token)}")]

        body = {"name": valid, "token": valid, "model": valid, "backend": valid, "role": valid,
                "scopes": [valid], "model_allowlist": [unknown], "api_key": unknown}
        requests = 0
        with httpx.Client(base_url=base, verify=ctx, timeout=20) as c:
            domain = next(iter(c.get("/users/me", headers={"Authorization": f"Bearer {valid}"})
                               .json()["memberships"]))
            for method, template in _routes(c):
                if method == "DELETE" and template.startswith("/users/me/pats/"):
                    continue    # the placement with random ids below is harmless, but keep the canary key alive
                for ids, model in ((unknown, valid), (str(uuid.uuid4()), _percent_encoded(unknown)),
                                   (domain, valid.upper())):
                    path = _fill(template, ids, model).replace(f"/domains/{ids}/", f"/domains/{domain}/")
                    for token in canaries:
                        for headers, query in placements(token):
                            kw = {"json": body} if method in ("POST", "PUT", "PATCH") else {}
                            c.request(method, path + query, headers=headers, **kw)
                            requests += 1
                c.request("GET", f"/nope/{valid}?api_key={valid}", headers={"x-api-key": unknown})
            # bad requests at the HTTP layer: a malformed request line and an oversized header, both with a PAT
            for raw in (f"GET /{valid} HTTP/1.1 {unknown}\r\nhost: x\r\n\r\n",
                        f"GET /health?token={valid} HTTP/1.1\r\nhost: x\r\nx-big: {valid * 2000}\r\n\r\n",
                        f"{valid} / HTTP/1.1\r\nhost: x\r\n\r\n"):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s, \
                        ctx.wrap_socket(s, server_hostname="localhost") as tls:
                    tls.sendall(raw.encode())
                    try:
                        tls.recv(65536)
                    except (OSError, ssl.SSLError):
                        pass
        assert requests > 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    text = out_log.read_text() + err_log.read_text()
    assert text.count('"logger": "uvicorn.access"') > 200 and "GET /proxy/" in text   # the logs were captured
    low = text.lower()
    for token in canaries:
        secret = token[len("cube_pat_"):]
        for form in (secret, _percent_encoded(secret[:12]), quote(_percent_encoded(secret[:12]))):
            assert form.lower() not in low, f"a PAT leaked as {form[:20]}..."
