"""Who may use the proxy, and for what: checks on each request's head, before its body is read or anything is sent.

The proxy listens on loopback, but loopback is reachable from every web page in the user's browser (a simple
cross-site POST, a form, DNS rebinding of ``attacker.example`` to 127.0.0.1) and from every local process; with
``--pat-file`` each request it relays carries the user's PAT. So, by default:

- ``Host`` must name the proxy itself (127.0.0.1, localhost or [::1], with the bound port): a rebound name fails;
- no ``Origin`` header (browsers send one on cross-site and on non-GET requests; Node's and Bun's fetch, used by
  Continue and OpenCode, send none) unless ``--allow-origin`` lists it, and no ``Sec-Fetch-Site`` naming another
  site (a browser's no-cors GET);
- the decoded path (what the enclave's router matches: Starlette decodes percent escapes once) has no dot, empty
  or double-encoded segment, no backslash, ``;``, ``#`` or control character (httpx would resolve ``..`` before
  sending, so ``/proxy/x/../../admin`` would otherwise reach ``/admin``), and lies under ``/proxy/<domain>/v1/``
  or ``/proxy/<domain>/api/`` (of ``--domain`` only, when given) unless ``--allow-all-paths``: a PAT with
  ``manage`` scope must not turn the port into an admin console for every local process.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

import h11

from .envelope import ProxyError, bad_request

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
MODEL_API_ROOTS = frozenset({"v1", "api"})  # OpenAI-compatible and Ollama-native routes under /proxy/<domain>/
CROSS_SITE_FETCHES = frozenset({b"cross-site", b"same-site"})  # same-site: another port of localhost, say


@dataclass(frozen=True)
class AccessRules:
    """What the proxy accepts besides its own loopback names, and which paths it forwards."""

    allow_hosts: frozenset[str] = frozenset()    # extra host names (no port) clients may put in Host
    allow_origins: frozenset[str] = frozenset()  # exact Origin values (scheme://host[:port]) accepted
    allow_all_paths: bool = False
    domain: str | None = None                    # only /proxy/<domain>/... when set

    def check(self, request: h11.Request, port: int) -> None:
        """Raise a 403 ProxyError (connection closed, body unread) for a request the proxy must not relay."""
        self._check_host(request, port)
        self._check_origin(request)
        self._check_path(request.target)

    def _check_host(self, request: h11.Request, port: int) -> None:
        hosts = [value for name, value in request.headers if name == b"host"]
        value = hosts[0].decode("ascii", "replace").lower() if len(hosts) == 1 else ""
        if not host_matches(value, LOOPBACK_HOSTS | {h.lower() for h in self.allow_hosts}, port):
            raise _forbidden("bad_host", "the Host header does not name this proxy (expected 127.0.0.1:PORT, "
                             "localhost:PORT or [::1]:PORT): refused, as DNS rebinding would send it (--allow-host "
                             "adds a name)")

    def _check_origin(self, request: h11.Request) -> None:
        allowed = {origin.lower().rstrip("/") for origin in self.allow_origins}
        origins = [value.decode("ascii", "replace").lower().rstrip("/") for name, value in request.headers
                   if name == b"origin"]
        if origins and not all(origin in allowed for origin in origins):
            raise _forbidden("forbidden_origin", "requests from web pages (an Origin header) are refused: a site "
                             "open in your browser could otherwise use your PAT (--allow-origin lists trusted ones)")
        if not origins and any(name == b"sec-fetch-site" and value.strip().lower() in CROSS_SITE_FETCHES
                               for name, value in request.headers):
            raise _forbidden("forbidden_origin", "a browser request made by another site (Sec-Fetch-Site) is refused")

    def _check_path(self, target: bytes) -> None:
        problem = path_problem(target, allow_all_paths=self.allow_all_paths, domain=self.domain)
        if problem:
            raise _forbidden("forbidden_path", problem)


def host_matches(value: str, names: frozenset[str] | set[str], port: int) -> bool:
    """``value`` (lower-case Host) is one of ``names`` with ``port``, or without a port when ``port`` is 80."""
    if value.startswith("["):
        host, _, rest = value.partition("]")
        host, port_text = host + "]", rest[1:] if rest.startswith(":") else None
        if rest and port_text is None:
            return False
    else:
        host, sep, port_text_or_empty = value.rpartition(":")
        host, port_text = (host, port_text_or_empty) if sep else (value, None)
    if port_text is None:
        return host in names and port == 80
    return host in names and port_text.isdigit() and int(port_text) == port


def path_problem(target: bytes, *, allow_all_paths: bool, domain: str | None) -> str | None:
    """Why ``target`` (an origin-form request target) is refused, or None."""
    raw_path = target.split(b"?", 1)[0]
    if b"#" in target:
        return "a request target cannot carry a fragment ('#')"
    try:
        path = unquote(raw_path.decode("ascii"), errors="strict")
    except (UnicodeDecodeError, ValueError):
        return "the path is not valid percent-encoded UTF-8"
    if any(ch in path for ch in "\\;%") or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path):
        return "the path has a backslash, ';', a double-encoded '%' or a control character: refused"
    segments = path.split("/")[1:]
    inner = segments[:-1] if segments and segments[-1] == "" else segments  # one trailing '/' is harmless
    if any(segment in ("", ".", "..") for segment in inner):
        return "the path has an empty, '.' or '..' segment (also percent-encoded): refused, never resolved"
    if allow_all_paths:
        return None
    if len(inner) < 3 or inner[0] != "proxy" or inner[2] not in MODEL_API_ROOTS:
        return ("only the model APIs are relayed: /proxy/<domain>/v1/... and /proxy/<domain>/api/... (start the "
                "proxy with --allow-all-paths for other enclave routes)")
    if domain is not None and inner[1] != domain:
        return f"this proxy relays domain {domain!r} only (--domain)"
    return None


def _forbidden(code: str, message: str) -> ProxyError:
    return bad_request(message, status=403, code=code)
