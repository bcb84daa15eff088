"""Structured JSON logging with a redactor that keeps PATs and Authorization values out of every record."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from urllib.parse import unquote_plus

from enclave.tokens import PAT_PATTERN

REDACTED = "[REDACTED]"
# A token in any letter case (CUBE_PAT_..., an upper-casing proxy or client).
_PAT_ANY_CASE = re.compile(PAT_PATTERN.pattern, re.IGNORECASE)
# The scheme word (kept) of the usual HTTP authentication schemes; whatever follows it is the credential.
_AUTH_SCHEMES = r"(?:bearer|basic|digest|token|negotiate|ntlm|apikey|aws4-hmac-sha256)"
# Names whose value is a credential, as a header (``x-api-key: v``), a query or form field (``api_key=v``) or a
# JSON/repr key (``"token": "v"``).
_CREDENTIAL_NAMES = (r"(?:proxy-)?authorization|x-api-key|api[-_]?key|access[-_]?token|refresh[-_]?token|"
                     r"id[-_]?token|token|secret|password|passwd|cookie|set-cookie")
_CREDENTIAL = re.compile(r"(?i)((?:" + _CREDENTIAL_NAMES + r")[\"']?\s*[:=]\s*[\"']?)(" + _AUTH_SCHEMES
                         + r"\s+)?[^\s\"',;}&]+")
_BEARER = re.compile(r"(?i)(bearer(?:\s+|%20|\+))[^\s\"',;}&]+")
# A maximal run of URL characters; one holding a percent escape is decoded (twice-encoded too) and checked for a
# PAT. A plain character class: linear time on any input (log lines can carry attacker-chosen paths).
_URL_RUN = re.compile(r"[A-Za-z0-9_.~+%-]+")


def _decoded(run: str) -> str:
    for _ in range(3):
        decoded = unquote_plus(run)
        if decoded == run:
            break
        run = decoded
    return run


def _redact_percent_run(match: re.Match[str]) -> str:
    run = match.group(0)
    return REDACTED if "%" in run and _PAT_ANY_CASE.search(_decoded(run)) else run


def redact(text: str) -> str:
    """Text with every PAT (any case, percent-encoded or not) and every credential value replaced."""
    if "%" in text:
        text = _URL_RUN.sub(_redact_percent_run, text)
    text = _PAT_ANY_CASE.sub(REDACTED, text)
    text = _CREDENTIAL.sub(lambda m: m.group(1) + (m.group(2) or "") + REDACTED, text)
    return _BEARER.sub(lambda m: m.group(1) + REDACTED, text)


def redact_query(target: str) -> str:
    """A request target with every query value replaced (names kept): ``/p?a=[REDACTED]&b=[REDACTED]``."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    fields = (f.partition("=") for f in query.split("&"))
    return path + "?" + "&".join(name + (f"={REDACTED}" if eq else "") for name, eq, _ in fields)


class RedactingFilter(logging.Filter):
    """Renders the message, redacts it and freezes the result into the record (args dropped)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) >= 3:
            # uvicorn's access line is (client, method, target, http version, status): no query values in logs
            record.args = (*record.args[:2], redact_query(str(record.args[2])), *record.args[3:])
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not break logging
            message = f"{record.msg!r} {record.args!r}"
        record.msg = redact(message)
        record.args = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("method", "path", "status", "duration_ms", "request_id", "client"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str))


class RedactingTextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure_logging(level: str = "INFO", *, json_format: bool = True, stream=None) -> logging.Handler:
    """Install one redacting handler on the root logger (uvicorn's loggers propagate into it)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else
                         RedactingTextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_cube_handler", False):
            root.removeHandler(old)
    handler._cube_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
        lg.disabled = False
        lg.setLevel(logging.NOTSET)
    return handler


def uvicorn_log_config() -> dict:
    """Let uvicorn's loggers propagate to our root handler instead of installing its own."""
    return {"version": 1, "disable_existing_loggers": False,
            "loggers": {n: {"handlers": [], "propagate": True} for n in ("uvicorn", "uvicorn.error", "uvicorn.access")}}
