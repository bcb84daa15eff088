"""``cube-attest proxy``: check the arguments, verify the enclave once, print snippets, serve until a signal.

Exit status: 0 after SIGINT/SIGTERM, 1 when the enclave is refused (or unreachable) at start, 2 for usage
errors (a non-loopback --listen without --allow-non-loopback, a bad URL, policy or PAT file).
Everything is printed on stderr (the verdict, the snippets, one access line per request without query values).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

import httpx

from ..atls.client import AttestedTLSError, VerificationReport
from ..atls.openai_clients import APIKeyError, check_api_key
from ..errors import PolicyError
from ..keyfile import KeyFileError, read_private_file
from ..policy import Policy, load_policy
from .access import AccessRules
from .forward import DEFAULT_TIMEOUT, Upstream
from .server import Limits, ProxyServer
from .snippets import SnippetContext, render

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
MAX_PAT_FILE_BYTES = 4096


class UsageError(Exception):
    """Exit status 2, with this message."""


# -- argument checks --------------------------------------------------------------------------------
def parse_listen(text: str, allow_non_loopback: bool, err: TextIO) -> tuple[str, int]:
    """(host, port) for --listen; a non-loopback host needs the flag, and is warned about even then."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise UsageError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:11435")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False  # a name other than localhost: it may resolve anywhere
    if not loopback:
        if not allow_non_loopback:
            raise UsageError(f"--listen {text!r} is not a loopback address: the proxy speaks plain HTTP and (with "
                             "--pat-file) adds your PAT to every request; pass --allow-non-loopback to accept that")
        err.write(f"WARNING: listening on {host}, not loopback: anyone who can reach it talks to the enclave "
                  "through this proxy, in plain HTTP on that network, with the proxy's PAT if it has one\n")
    return host, int(port_text)


def upstream_origin(url: str) -> str:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise UsageError(f"--upstream {url!r}: not a URL") from None
    if parsed.scheme != "https" or not parsed.host:
        raise UsageError(f"--upstream {url!r}: expected https://HOST[:PORT] (attested TLS)")
    if parsed.raw_path not in (b"", b"/") or parsed.fragment:
        raise UsageError(f"--upstream {url!r}: give the origin only; request paths are kept as clients send them")
    return url.rstrip("/")


def read_pat(path: str) -> str:
    """The PAT in a private file (owner-only, checked on the opened file), trailing newline removed."""
    try:
        raw = read_private_file(Path(path), "PAT file")
    except KeyFileError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"--pat-file {path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_PAT_FILE_BYTES:
        raise UsageError(f"--pat-file {path}: larger than {MAX_PAT_FILE_BYTES} bytes, not a PAT")
    try:
        pat = raw.decode("utf-8").strip()
        check_api_key(pat)
    except (UnicodeDecodeError, APIKeyError) as exc:
        raise UsageError(f"--pat-file {path}: {exc}") from None
    return pat


def _policy(path: str) -> Policy:
    try:
        return load_policy(Path(path))
    except (PolicyError, OSError) as exc:
        raise UsageError(f"--policy: {exc}") from None


def access_rules(args: argparse.Namespace, listen_host: str) -> AccessRules:
    """The request checks from the flags; a specific non-loopback --listen address is a Host clients may use."""
    hosts = set(args.allow_host)
    if listen_host not in ("0.0.0.0", "::", "127.0.0.1", "::1"):
        hosts.add(f"[{listen_host}]" if ":" in listen_host else listen_host)
    return AccessRules(allow_hosts=frozenset(hosts), allow_origins=frozenset(args.allow_origin),
                       allow_all_paths=args.allow_all_paths, domain=args.domain)


# -- start ------------------------------------------------------------------------------------------
def verdict_summary(report: VerificationReport) -> str:
    doc = report.to_json()
    if report.ok:
        return (f"enclave {report.origin}: ACCEPTED (platform {doc['platform']}, product {doc['product']}, status "
                f"{doc['status']}); key pinned, SPKI SHA-256 {report.spki_sha256}")
    return f"enclave {report.origin}: REFUSED ({doc['status']}): {report.error}"


async def discover(upstream: Upstream, domain: str | None, err: TextIO) -> tuple[str | None, list[str]]:
    """With the proxy's PAT: the domain (given, else the PAT's, else its only membership) and its model ids."""
    if not upstream.sets_authorization:
        return domain, []
    try:
        if domain is None:
            me = await _get_json(upstream, "/users/me")
            memberships = sorted(me.get("memberships") or {})
            domain = (me.get("pat") or {}).get("domain_id") or (memberships[0] if len(memberships) == 1 else None)
        if domain is None:
            err.write("note: the PAT is in several domains (or none): pass --domain to fill the snippets in\n")
            return None, []
        listing = await _get_json(upstream, f"/proxy/{domain}/v1/models")
        return domain, [str(m["id"]) for m in listing.get("data", []) if isinstance(m, dict) and "id" in m]
    except Exception as exc:  # snippets still print, with placeholders
        err.write(f"note: could not list the models ({str(exc)[:200]}); the snippets use placeholders\n")
        return domain, []


async def _get_json(upstream: Upstream, path: str) -> dict[str, Any]:
    response = await upstream.open(b"GET", path.encode(), [(b"accept", b"application/json")], None)
    try:
        await response.aread()
    finally:
        await response.aclose()
    if response.status_code != 200:
        raise RuntimeError(f"GET {path}: HTTP {response.status_code}")
    doc = response.json()
    if not isinstance(doc, dict):
        raise RuntimeError(f"GET {path}: not a JSON object")
    return doc


async def serve(args: argparse.Namespace, err: TextIO) -> int:
    host, port = parse_listen(args.listen, args.allow_non_loopback, err)
    origin = upstream_origin(args.upstream)
    policy = _policy(args.policy)
    pat = read_pat(args.pat_file) if args.pat_file else None
    if args.max_body_bytes < 1 or args.read_timeout <= 0:
        raise UsageError("--max-body-bytes and --read-timeout must be positive")
    timeout = httpx.Timeout(**{**DEFAULT_TIMEOUT.as_dict(), "read": args.read_timeout})
    try:
        upstream = Upstream(origin, policy, pat=pat, timeout=timeout)
    except PolicyError as exc:
        raise UsageError(f"--policy: {exc}") from None
    try:
        try:
            report = await upstream.attest()
        except AttestedTLSError as exc:
            report = exc.report
        except Exception as exc:  # unreachable, refused connection, TLS failure: a refusal, told plainly
            report = VerificationReport(upstream.origin)
            report.failed("connect", f"{type(exc).__name__}: {str(exc)[:200]}")
        err.write(verdict_summary(report) + "\n")
        if not report.ok:
            err.write("cube-attest proxy: not starting: nothing was sent to that enclave\n")
            return EXIT_REFUSED
        server = ProxyServer(upstream, Limits(max_body_bytes=args.max_body_bytes), access_rules(args, host))
        try:
            bound_host, bound_port = await server.start(host, port)
        except OSError as exc:
            raise UsageError(f"--listen {args.listen}: cannot listen ({exc.strerror or exc})") from None
        try:
            url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
            proxy_url = f"http://{url_host}:{bound_port}"
            domain, models = await discover(upstream, args.domain, err)
            err.write(render(SnippetContext(proxy_url, domain, models, proxy_sets_pat=pat is not None)))
            err.write(f"listening on {proxy_url} (every request relayed to {upstream.origin} over attested TLS; "
                      "Ctrl-C to stop)\n")
            err.flush()
            await _until_signalled()
        finally:
            await server.close()
        err.write("cube-attest proxy: stopped\n")
        return EXIT_OK
    finally:
        await upstream.aclose()


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def proxy_command(args: argparse.Namespace, *, err: TextIO | None = None) -> int:
    err = err or sys.stderr
    logging.basicConfig(level=logging.INFO, stream=err, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its request lines carry full URLs (query values)
    try:
        return asyncio.run(serve(args, err))
    except UsageError as exc:
        err.write(f"cube-attest proxy: {exc}\n")
        return EXIT_USAGE
