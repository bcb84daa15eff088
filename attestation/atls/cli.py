"""``cube-attest verify-url https://HOST:PORT [--policy FILE] [--json]``: verify a live enclave endpoint.

attestation.cli dispatches here with ``args.url``, ``args.policy`` (path or None) and ``args.json``.
Exit status: 0 accepted, 1 refused (or unreachable), 2 usage error (bad URL, unreadable policy).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from ..errors import PolicyError
from ..policy import DEFAULT_POLICY, Policy, load_policy
from .client import AttestedClient, AttestedTLSError, VerificationReport, _origin_of


def _print_human(report: VerificationReport, out: TextIO) -> None:
    doc = report.to_json()
    out.write(f"{report.origin}: {'ACCEPTED' if report.ok else 'REFUSED'}\n")
    for step in report.steps:
        out.write(f"  [{'ok' if step.ok else 'FAIL'}] {step.name}: {step.detail}\n")
    if doc["platform"]:
        out.write(f"  platform: {doc['platform']}  product: {doc['product']}  status: {doc['status']}\n")
    if report.spki_sha256:
        out.write(f"  spki_sha256: {report.spki_sha256}\n")
    if report.error:
        out.write(f"  error: {report.error}\n")


def verify_url_command(args: Any, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    url = str(getattr(args, "url", "") or "")
    try:
        scheme, host, _port = _origin_of(url)
    except Exception:
        scheme, host = "", ""
    if scheme != "https" or not host:
        err.write(f"verify-url: expected https://HOST:PORT, got {url!r}\n")
        return 2
    policy: Policy = DEFAULT_POLICY
    policy_path = getattr(args, "policy", None)
    if policy_path:
        try:
            policy = load_policy(Path(policy_path))
        except (PolicyError, OSError) as exc:
            err.write(f"verify-url: {exc}\n")
            return 2
    with AttestedClient(url, policy=policy, require_measurement=False) as client:  # inspects; sends no credential
        try:
            report = client.attest()
        except AttestedTLSError as exc:
            report = exc.report
        except Exception as exc:  # unreachable host, refused connection, TLS failure: a refusal, told plainly
            report = VerificationReport(client.attestor.origin_text)
            report.failed("connect", f"{type(exc).__name__}: {str(exc)[:200]}")
    if getattr(args, "json", False):
        out.write(json.dumps(report.to_json(), indent=2, sort_keys=False) + "\n")
    else:
        _print_human(report, out)
    return 0 if report.ok else 1
