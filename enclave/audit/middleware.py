"""Which requests the audit trail records, and the ASGI middleware that records them.

Audited: every route whose path template is not one of ``NOT_AUDITED_PATHS`` (the public and operational
routes) nor under one of ``NOT_AUDITED`` (inference and models under ``/proxy/``, attestation under
``/.well-known/``, the join routes). The rule reads the matched route's template, so a router added later is
audited without doing anything.

* An authenticated call of an audited route (allowed or refused: 403, 404, 409, ...) is one ``admin`` entry:
  actor (user id, PAT id), action (``METHOD template``), target (the path parameters, any that looks like a
  token redacted), outcome (the HTTP status), time, source (the TCP peer: behind the host's relay, the relay).
  It is written when the response starts, before the client sees the status; if it cannot be written the
  client gets 500 ``audit_unavailable`` instead (the action itself may have taken effect). A handler that
  fails (an exception, answered 500 by the outermost error handler) is recorded with outcome 500.
* An authentication refusal, on any route, is counted by class (``enclave.audit.refusals``: bounded entries,
  never the token). So is an unauthenticated call of an audited route that got no refusal class (e.g. refused
  for its size before its key was checked: class ``unauthenticated``).
"""

from __future__ import annotations

import contextvars
import logging
import re
import weakref
from typing import Any

from fastapi.routing import iter_route_contexts
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from enclave.errors import envelope
from enclave.tokens import CHECKSUM_LENGTH, PAT_PREFIX, SECRET_LENGTH, checksum

log = logging.getLogger("enclave.audit")

# Whole names, or prefixes ending in "/": a later route such as ``/metrics-settings`` or ``/readyz`` is audited.
NOT_AUDITED_PATHS = frozenset({"/health", "/ready", "/docs", "/redoc", "/openapi.json", "/metrics"})
NOT_AUDITED = ("/proxy/", "/docs/", "/.well-known/", "/internal/join/")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_TARGET_CHARS = 200
REDACTED = "[redacted]"


def is_audited(template: str) -> bool:
    """Whether calls of the route with this path template (or of this path) are admin entries."""
    return not (template in NOT_AUDITED_PATHS or template.startswith(NOT_AUDITED))


class _RequestNote:
    __slots__ = ("refusal",)

    def __init__(self) -> None:
        self.refusal: str | None = None


_current: contextvars.ContextVar[_RequestNote | None] = contextvars.ContextVar("audit_request", default=None)


def note_refusal(reason: str) -> None:
    """The Authenticator's ``on_failure``: remember this request's refusal class (the class only)."""
    note = _current.get()
    if note is not None:
        note.refusal = reason


_PAT_BODY = SECRET_LENGTH + CHECKSUM_LENGTH
_BASE62_RUN = re.compile(rf"[0-9A-Za-z]{{{_PAT_BODY},}}")


def _holds_pat(text: str) -> bool:
    """A PAT in ``text``, or what follows its prefix (the prefix is public: the rest is the whole secret), found
    by its checksum where a kept character begins it (the value is cut at MAX_TARGET_CHARS)."""
    if PAT_PREFIX in text.lower():
        return True
    for run in _BASE62_RUN.finditer(text[:MAX_TARGET_CHARS + _PAT_BODY]):
        chars = run.group()
        for i in range(len(chars) - _PAT_BODY + 1):
            if checksum(PAT_PREFIX + chars[i:i + SECRET_LENGTH]) == chars[i + SECRET_LENGTH:i + _PAT_BODY]:
                return True
    return False


def _redact(value: Any) -> str:
    text = str(value)
    if _holds_pat(text):
        return REDACTED
    return text if len(text) <= MAX_TARGET_CHARS else text[:MAX_TARGET_CHARS] + "..."


_TABLES: "weakref.WeakKeyDictionary[Any, list[tuple[Any, frozenset[str], str]]]" = weakref.WeakKeyDictionary()


def _route_table(app: Any) -> list[tuple[Any, frozenset[str], str]]:
    """(path regex, methods, template) of every route of ``app``, compiled once per app."""
    table = _TABLES.get(app)
    if table is None:
        table = []
        for route in iter_route_contexts(getattr(app, "routes", ())):
            path = route.path
            if path:
                table.append((compile_path(path)[0], frozenset(route.methods or ()), path))
        _TABLES[app] = table
    return table


def _route_of(scope: Scope) -> tuple[str | None, dict[str, Any]]:
    """The matched route's template and path parameters; matched here when the request was answered before
    routing (e.g. refused before its body was read). A path that matches with another method counts (405)."""
    route = scope.get("route")
    if route is not None and getattr(route, "path", None):
        return route.path, dict(scope.get("path_params") or {})
    app = scope.get("app")
    if app is None:
        return None, {}
    partial: tuple[str | None, dict[str, Any]] = (None, {})
    for regex, methods, path in _route_table(app):
        found = regex.match(scope.get("path", ""))
        if found is None:
            continue
        if not methods or scope.get("method") in methods:
            return path, found.groupdict()
        if partial[0] is None:
            partial = (path, found.groupdict())
    return partial


def _action(scope: Scope, template: str | None) -> str:
    method = scope.get("method", "")
    method = method if method in _METHODS else "OTHER"
    return f"{method} {template or 'unmatched'}"


def _source(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _trail(scope: Scope) -> Any:
    state = getattr(getattr(scope.get("app"), "state", None), "_state", {})
    ctx = state.get("ctx")
    return getattr(ctx, "audit", None)


_UNAVAILABLE = envelope("The action could not be recorded in the audit trail; it may have taken effect.",
                        type="api_error", code="audit_unavailable")


class AuditMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        note = _RequestNote()
        token = _current.set(note)
        try:
            if not is_audited(scope["path"]):
                try:
                    await self.app(scope, receive, send)
                finally:
                    if note.refusal is not None:
                        self._count_refusal(scope, note.refusal)
                return
            await self._audited(scope, receive, send, note)
        finally:
            _current.reset(token)

    def _count_refusal(self, scope: Scope, refusal: str) -> None:
        trail = _trail(scope)
        if trail is not None:
            template, _ = _route_of(scope)
            trail.count_refusal(refusal, _source(scope), _action(scope, template))

    async def _audited(self, scope: Scope, receive: Receive, send: Send, note: _RequestNote) -> None:
        replaced = started = False

        async def send_recorded(message: Message) -> None:
            nonlocal replaced, started
            if replaced:
                return
            if message["type"] == "http.response.start":
                started = True
                if not await self._record(scope, message["status"], note):
                    replaced = True
                    body = _json(_UNAVAILABLE)
                    await send({"type": "http.response.start", "status": 500,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode())]})
                    await send({"type": "http.response.body", "body": body})
                    return
            await send(message)

        try:
            await self.app(scope, receive, send_recorded)
        except Exception:
            if not started:   # the outermost error handler answers 500 past this middleware: record that
                await self._record(scope, 500, note)
            raise

    async def _record(self, scope: Scope, status: int, note: _RequestNote) -> bool:
        """Write this request's entry (or count its refusal); False when an entry was due and failed."""
        trail = _trail(scope)
        if trail is None:
            return True
        template, params = _route_of(scope)
        if note.refusal is not None:
            trail.count_refusal(note.refusal, _source(scope), _action(scope, template))
            return True
        if template is None or not is_audited(template):
            return True
        principal = (scope.get("state") or {}).get("principal")
        if principal is None:
            trail.count_refusal("unauthenticated", _source(scope), _action(scope, template))
            return True
        fields = {"actor": {"user_id": principal.user.id, "pat_id": principal.pat.id},
                  "action": _action(scope, template),
                  "target": {name: _redact(value) for name, value in sorted(params.items())},
                  "outcome": status, "source": _source(scope)}
        try:
            await trail.record_admin(fields)
        except Exception as e:
            log.error("audit: could not record %s (%d): %s", fields["action"], status, type(e).__name__)
            return False
        return True


def _json(value: Any) -> bytes:
    import json

    return json.dumps(value).encode()
