"""Structured JSON logging with a redactor that keeps PATs and Authorization values out of every record."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

from enclave.tokens import PAT_PATTERN

REDACTED = "[REDACTED]"
# The scheme word (kept) of the usual HTTP authentication schemes; whatever follows it is the credential.
_AUTH_SCHEMES = r"(?:bearer|basic|digest|token|negotiate|ntlm|apikey|aws4-hmac-sha256)"
_AUTH_HEADER = re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(" + _AUTH_SCHEMES + r"\s+)?[^\s\"',;}]+")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;}]+")


def redact(text: str) -> str:
    text = PAT_PATTERN.sub(REDACTED, text)
    text = _AUTH_HEADER.sub(lambda m: m.group(1) + (m.group(2) or "") + REDACTED, text)
    return _BEARER.sub(lambda m: m.group(1) + REDACTED, text)


class RedactingFilter(logging.Filter):
    """Renders the message, redacts it and freezes the result into the record (args dropped)."""

    def filter(self, record: logging.LogRecord) -> bool:
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
