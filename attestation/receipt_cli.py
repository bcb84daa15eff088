"""``cube-attest verify-receipt RECEIPT --request F --response F --policy P [--at T] [--json]``.

Exit status: 0 when the receipt holds for these bytes under the policy, 1 when it does not (a hash differs, the
signature or the key's evidence is refused), 2 on a usage or input error (unreadable file, malformed receipt, bad
policy). With ``--json`` exactly one object is printed: ``{"ok", "error", "checks": [{"name","ok","detail"}],
"statement", "key_id", "verdict"}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .receipt import ReceiptCheck, ReceiptError, parse_receipt, verify_receipt
from .verdict import Check

EXIT_OK, EXIT_REFUSED, EXIT_INPUT = 0, 1, 2


def add_parser(sub: Any) -> None:
    p = sub.add_parser("verify-receipt", help="verify a Cube AI receipt against the request and response bytes")
    p.add_argument("receipt", metavar="RECEIPT", help="the receipt JSON (GET /proxy/<domain>/v1/receipts/<id>)")
    p.add_argument("--request", metavar="FILE", required=True, help="the request body exactly as sent")
    p.add_argument("--response", metavar="FILE", required=True,
                   help="the response body exactly as received (a stream: every byte of it, in order)")
    p.add_argument("--policy", metavar="FILE", required=True, help="appraisal policy YAML for the enclave")
    p.add_argument("--at", metavar="ISO8601", help="verify the signing key's evidence at this time (default: now)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def verify_receipt_command(args: argparse.Namespace) -> int:
    from .cli import InputError, _parse_at, _policy, _read   # the other commands' input rules, shared

    try:
        raw = _read(args.receipt, "receipt")
        request, response = _read(args.request, "--request"), _read(args.response, "--response")
        policy = _policy(args.policy)
        at = _parse_at(args.at)
        try:
            receipt = parse_receipt(raw)
        except ReceiptError as exc:
            raise InputError(f"receipt {args.receipt}: {exc}") from None
    except InputError as exc:
        _report(ReceiptCheck(ok=False, error=str(exc), checks=[Check("input", False, str(exc))]), args.json)
        return EXIT_INPUT
    result = verify_receipt(receipt, request=request, response=response, policy=policy, at=at)
    _report(result, args.json)
    return EXIT_OK if result.ok else EXIT_REFUSED


def _report(result: ReceiptCheck, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_json(), default=str))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False, soft_wrap=False)
    if result.statement:
        s = result.statement
        console.print(Text(f"receipt of request {s['request_id']} at {s['time']}: {s['route']} on {s['model']} "
                           f"({s['backend']}), domain {s['domain_id']}, {'streamed' if s['stream'] else 'whole'}"))
    table = Table(show_lines=False)
    table.add_column("check", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for check in result.checks:   # Text(): details quote receipt contents, never to be read as markup
        table.add_row(Text(check.name), Text("ok", style="green") if check.ok else Text("FAIL", style="red"),
                      Text(check.detail))
    console.print(table)
    if result.ok:
        console.print(Text("RECEIPT HOLDS", style="bold green"))
    else:
        console.print(Text("REFUSED", style="bold red"))
        console.print(f"reason: {result.error}", markup=False)
    sys.stdout.flush()
