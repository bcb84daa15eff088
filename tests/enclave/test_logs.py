"""Logs never contain a PAT: the redactor, and the service's real log output under requests carrying tokens."""

from __future__ import annotations

import io
import json
import logging
from urllib.parse import quote

from enclave.logs import REDACTED, configure_logging, redact
from enclave.tokens import generate_token

from tests.enclave.conftest import FakeClock, make_settings
from tests.enclave.test_service import start_service


def test_redact_patterns() -> None:
    token = generate_token()
    assert token not in redact(f"got {token} here")
    assert redact(f"Authorization: Bearer {token}") == f"Authorization: Bearer {REDACTED}"
    assert "sk-secret" not in redact("headers={'authorization': 'Bearer sk-secret'}")
    assert "opaque" not in redact('"Authorization": "opaque"')
    assert redact("nothing secret") == "nothing secret"


def test_filter_redacts_args_and_exceptions() -> None:
    token = generate_token()
    stream = io.StringIO()
    handler = configure_logging("DEBUG", json_format=True, stream=stream)
    try:
        log = logging.getLogger("test.redaction")
        log.info("user sent %s", token)
        try:
            raise ValueError(f"bad key {token}")
        except ValueError:
            log.exception("failed")
    finally:
        logging.getLogger().removeHandler(handler)
    out = stream.getvalue()
    assert token not in out and out.count(REDACTED) >= 2
    assert all(json.loads(line)["logger"] == "test.redaction" for line in out.splitlines())


def test_service_logs_never_contain_a_pat(tmp_path) -> None:
    stream = io.StringIO()
    handler = configure_logging("DEBUG", json_format=True, stream=stream)
    server, world = start_service(make_settings(tmp_path), FakeClock())
    try:
        token = world.tokens["superadmin"]
        a = world.domains["A"]
        with server.client(token) as c:
            c.get(f"/proxy/{a}/v1/models")
            c.get(f"/proxy/{a}/v1/models/{token}")                 # token in the path
            c.get(f"/nope?api_key={token}")                         # token in the query
            new = c.post("/users/me/pats", json={"name": "fresh"}).json()["token"]
            c.get("/health", headers={"Authorization": f"Bearer {new}x"})
    finally:
        server.stop()
        logging.getLogger().removeHandler(handler)
    out = stream.getvalue()
    assert "GET /proxy/" in out                                      # access logs were captured
    for secret in list(world.tokens.values()) + [new]:
        assert secret not in out
    for line in out.splitlines():
        json.loads(line)                                             # structured: one JSON object per line


def test_redact_keeps_the_credential_of_any_authorization_scheme_out() -> None:
    """Only the scheme word may survive: `Authorization: Basic <base64>` must not leak its credential."""
    for text in ("Authorization: Basic dXNlcjpzM2NyZXQ=", "authorization=Digest opaque-secret-value",
                 '{"Authorization": "Token tok-secret-123"}', "Authorization: Bearer sk-secret-456"):
        out = redact(text)
        assert REDACTED in out
        for secret in ("dXNlcjpzM2NyZXQ", "opaque-secret-value", "tok-secret-123", "sk-secret-456"):
            assert secret not in out, out
    assert redact("Authorization: Basic dXNlcjpzM2NyZXQ=") == f"Authorization: Basic {REDACTED}"


def _percent_encoded(text: str) -> str:
    return "".join(f"%{b:02X}" for b in text.encode())


def test_redact_encoded_upper_cased_and_named_credentials() -> None:
    """Every form a PAT or API key takes on its way into a log line: percent-encoded (once, twice, only the
    underscores), upper-cased, as an api_key=/token= query value, as an x-api-key header."""
    token = generate_token()
    forms = [token.upper(), token.lower(), _percent_encoded(token), quote(_percent_encoded(token)),
             token.replace("_", "%5F"), f"Bearer%20{token}", f"/v1/models?api_key={token}", f"?token={token}",
             f"x-api-key: {token}", f"{{'x-api-key': '{token}'}}", f'"X-Api-Key": "{token}"']
    for text in forms:
        out = redact(f"GET {text} HTTP/1.1")
        assert REDACTED in out and token[9:].lower() not in out.lower(), (text, out)
    assert redact("/p?api_key=sk-opaque&token=tok-opaque") == f"/p?api_key={REDACTED}&token={REDACTED}"
    assert redact("x-api-key: sk-opaque-1") == f"x-api-key: {REDACTED}"
    assert redact("max_tokens: 5, GET /proxy/d/v1/models%3Fx") == "max_tokens: 5, GET /proxy/d/v1/models%3Fx"


def test_access_log_drops_query_values() -> None:
    stream = io.StringIO()
    handler = configure_logging("INFO", json_format=False, stream=stream)
    try:
        logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET",
                                                 "/v1/models?key=opaque-value&flag", "1.1", 200)
    finally:
        logging.getLogger().removeHandler(handler)
    assert f'"GET /v1/models?key={REDACTED}&flag HTTP/1.1" 200' in stream.getvalue()
    assert "opaque-value" not in stream.getvalue()


def test_redaction_takes_linear_time_on_hostile_lines() -> None:
    """Log lines carry attacker-chosen paths: no input may make the redactor backtrack (quadratic time)."""
    import time

    hostile = ["a" * 200_000 + " %41", "%4" * 100_000, "cube_pat_" * 20_000, "authorization=" * 15_000,
               "bearer " * 30_000, "x%" * 100_000]
    start = time.perf_counter()
    for text in hostile:
        redact(text)
    assert time.perf_counter() - start < 2.0
