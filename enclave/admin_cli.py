"""``cube-admin``: the admin API from the command line (httpx), with ``--json`` output everywhere.

The token is only ever sent over attested TLS (``--policy``): the enclave is verified, and its key pinned,
before the first byte of the request. Plain WebPKI TLS is an explicit, warned opt-in
(``--insecure-no-attestation``). Proxies from the environment are never used.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import ssl
import sys
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Column, Table

from attestation.errors import AttestationError
from enclave import bootstrap_cli

DEFAULT_URL = "https://localhost:8443"


class CliError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cube-admin", description="Administer a Cube AI enclave over its HTTP API")
    p.add_argument("--url", default=os.environ.get("CUBE_URL", DEFAULT_URL), help="service URL (env CUBE_URL)")
    p.add_argument("--token", default=None, help="personal access token (default: env CUBE_TOKEN)")
    p.add_argument("--policy", help="attestation policy YAML: verify the enclave (attested TLS) before the token is "
                                    "sent, e.g. data_dir/sim-policy.yaml for the local simulated demo (required "
                                    "unless --insecure-no-attestation)")
    p.add_argument("--insecure-no-attestation", action="store_true",
                   help="send the token over plain WebPKI TLS without verifying the enclave (anyone holding a "
                        "certificate for the name receives the token); prints a warning")
    p.add_argument("--ca", help="with --insecure-no-attestation: a PEM file to trust instead of the system CAs")
    p.add_argument("--json", action="store_true", help="print raw JSON")
    sub = p.add_subparsers(dest="group", required=True)

    sub.add_parser("whoami", help="the user behind the token, its memberships and this PAT")
    bootstrap_cli.register(sub)   # offline: the operator key pair and the sealed bootstrap key

    g = sub.add_parser("backends", help="backends and health").add_subparsers(dest="action", required=True)
    g.add_parser("list")

    g = sub.add_parser("models", help="models").add_subparsers(dest="action", required=True)
    a = g.add_parser("list", help="every model with its backend (superadmin), or with --domain the models you "
                                  "may use there")
    a.add_argument("--domain", help="domain id or name: list what this key may use there (member view)")
    a = g.add_parser("pull", help="add a model to an Ollama backend (progress bar)")
    a.add_argument("backend")
    a.add_argument("model")
    a = g.add_parser("remove")
    a.add_argument("model")
    a.add_argument("--backend")

    g = sub.add_parser("domains").add_subparsers(dest="action", required=True)
    g.add_parser("list")
    a = g.add_parser("create")
    a.add_argument("name")
    a.add_argument("--allow", action="append", help="model id or pattern allowed in the domain (repeatable)")
    a = g.add_parser("show")
    a.add_argument("domain_id", help="domain id or name")
    a = g.add_parser("update")
    a.add_argument("domain_id", help="domain id or name")
    a.add_argument("--name")
    a.add_argument("--allow", action="append")
    a.add_argument("--clear-allowlist", action="store_true")
    a = g.add_parser("delete")
    a.add_argument("domain_id", help="domain id or name")

    g = sub.add_parser("users").add_subparsers(dest="action", required=True)
    g.add_parser("list")
    a = g.add_parser("create")
    a.add_argument("name")
    a.add_argument("--superadmin", action="store_true")
    a = g.add_parser("show")
    a.add_argument("user_id", help="user id or name")
    a = g.add_parser("update")
    a.add_argument("user_id", help="user id or name")
    a.add_argument("--name")
    a.add_argument("--superadmin", action=argparse.BooleanOptionalAction, default=None)
    a = g.add_parser("delete")
    a.add_argument("user_id", help="user id or name")

    g = sub.add_parser("members", help="domain memberships").add_subparsers(dest="action", required=True)
    a = g.add_parser("list")
    a.add_argument("domain_id", help="domain id or name")
    a = g.add_parser("set", help="add a user to a domain or change the role")
    a.add_argument("domain_id", help="domain id or name")
    a.add_argument("user_id", help="user id or name")
    a.add_argument("--role", choices=["admin", "member"], default="member")
    a = g.add_parser("remove")
    a.add_argument("domain_id", help="domain id or name")
    a.add_argument("user_id", help="user id or name")

    g = sub.add_parser("pats", help="personal access tokens").add_subparsers(dest="action", required=True)
    a = g.add_parser("list", help="yours, a user's (--user, superadmin) or a domain's (--domain)")
    _pat_target(a)
    a = g.add_parser("create", help="yours; a user's (--user); a domain member's (--domain D --member U)")
    a.add_argument("name")
    _pat_target(a)
    a.add_argument("--member", help="with --domain: the member (id or name) to issue a domain-bound PAT for")
    a.add_argument("--scope", action="append", choices=["models:read", "models:infer", "manage"])
    a.add_argument("--days", type=int, help="lifetime in days (default: server default)")
    a.add_argument("--allow", action="append", help="model id or pattern this PAT may use (repeatable)")
    a = g.add_parser("show", help="one key by id, wherever you may manage it")
    a.add_argument("pat_id")
    a = g.add_parser("revoke", help="revoke a key by id, wherever you may manage it")
    a.add_argument("pat_id")
    _pat_target(a)

    _usage_parser(sub)
    g = sub.add_parser("audit", help="the audit trail (superadmin)").add_subparsers(dest="action", required=True)
    a = g.add_parser("export", help="the export as JSON lines, for `cube-attest verify-audit EXPORT --policy P`")
    a.add_argument("--since", type=int, help="first seq")
    a.add_argument("--until", type=int, help="last seq (default: the head)")
    a.add_argument("-o", "--output", help="write to this file (default: standard output)")
    _limits_parser(sub)
    return p


USAGE_GROUPS = ("pat", "user", "model", "day", "domain")
USAGE_TOTALS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "estimated_requests")
USAGE_RECORD_COLUMNS = ("request_id", "created_at", "domain_id", "user_id", "pat_id", "model", "route", "stream",
                        "status", "outcome", "prompt_tokens", "completion_tokens", "total_tokens", "estimated",
                        "ttft_ms", "duration_ms")
_GROUP_FIELDS = {"pat": "pat_id", "user": "user_id", "model": "model", "day": "day", "domain": "domain_id"}


def _usage_parser(sub: Any) -> None:
    a = sub.add_parser("usage", help="token usage: the platform's (default, superadmin), a domain's (--domain) or "
                                     "your own (--me)")
    scope = a.add_mutually_exclusive_group()
    scope.add_argument("--domain", help="domain id or name: that domain's usage (its admins)")
    scope.add_argument("--me", action="store_true", help="your own usage (all your keys' with a manage key)")
    a.add_argument("--since", help="from (inclusive): YYYY-MM-DD (UTC) or an RFC 3339 time")
    a.add_argument("--until", help="to (exclusive): YYYY-MM-DD (UTC) or an RFC 3339 time")
    a.add_argument("--group-by", action="append", choices=USAGE_GROUPS,
                   help="totals per key, per user, per model, per day (UTC) or per domain; repeat to combine")
    a.add_argument("--model", help="only this model")
    a.add_argument("--user", help="only this user (id)")
    a.add_argument("--pat", help="only this key (id)")
    a.add_argument("--limit", type=int, help="without --group-by: at most this many records (default 100)")
    a.add_argument("--csv", action="store_true", help="print CSV (header line first)")


LIMIT_KINDS = ("rpm", "tpm", "concurrent", "tokens_per_day", "tokens_per_month")


def _limit_value(text: str) -> int | str:
    if text == "unlimited":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a whole number (0 or more) or 'unlimited'") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a whole number (0 or more) or 'unlimited'")
    return value


def _limits_parser(sub: Any) -> None:
    """``cube-admin limits show|set|clear``: a domain's ceiling (--domain), a member's (--domain --member), a
    domain-bound key's (--domain --pat), any key's (--pat, superadmin), or what binds you (show --mine)."""
    g = sub.add_parser("limits", help="limits and budgets (docs/limits.md)").add_subparsers(dest="action",
                                                                                          required=True)
    for action, text in (("show", "limits and current usage"), ("set", "replace the limits (kinds not given: "
                                                                    "the platform default)"),
                         ("clear", "remove the limits (the platform defaults apply)")):
        a = g.add_parser(action, help=text)
        a.add_argument("--domain", help="domain id or name")
        who = a.add_mutually_exclusive_group()
        who.add_argument("--member", help="with --domain: a member (id or name)")
        who.add_argument("--pat", help="a key id (with --domain: a key bound to it)")
        if action == "show":
            who.add_argument("--mine", action="store_true", help="what binds this token in --domain (or its own)")
        if action == "set":
            for kind in LIMIT_KINDS:
                a.add_argument(f"--{kind.replace('_', '-')}", dest=kind, type=_limit_value, metavar="N",
                               help=f"{kind}: a number or 'unlimited'")


def _limits_path(args: argparse.Namespace) -> str:
    domain, member, pat = args.domain, args.member, args.pat
    if member and not domain:
        raise CliError("--member needs --domain")
    if domain and member:
        return f"/domains/{_seg(domain)}/members/{_seg(member)}/limits"
    if domain and pat:
        return f"/domains/{_seg(domain)}/pats/{_seg(pat)}/limits"
    if pat:
        return f"/admin/pats/{_seg(pat)}/limits"
    if domain:
        # a domain's admins read its ceiling there; the platform sets it under /admin
        return f"/{'domains' if args.action == 'show' else 'admin/domains'}/{_seg(domain)}/limits"
    raise CliError("name what the limits are of: --domain D [--member U | --pat P], or --pat P")


def _limits_rows(doc: dict) -> list[dict]:
    usage = doc.get("usage") or {}
    return [{"subject": f"{doc['subject']['level']}", "kind": kind, "own": doc["own"].get(kind),
             "effective": doc["effective"].get(kind), "used": usage.get(kind, {}).get("used"),
             "resets_in_seconds": usage.get(kind, {}).get("resets_in_seconds")} for kind in LIMIT_KINDS]


def _limits(api: "Api", args: argparse.Namespace, console: Console) -> int:
    if args.action == "show" and args.mine:
        out: Any = api.call("GET", "/users/me/limits", params={"domain": args.domain})
        docs = [subject for entry in out for subject in entry["subjects"]]
    elif args.action == "set":
        body = {kind: getattr(args, kind) for kind in LIMIT_KINDS if getattr(args, kind) is not None}
        out = api.call("PUT", _limits_path(args), body)
        docs = [out]
    elif args.action == "clear":
        api.call("DELETE", _limits_path(args))
        out, docs = {"cleared": _limits_path(args)}, []
    else:
        out = api.call("GET", _limits_path(args))
        docs = [out]
    if args.json:
        print(json.dumps(out, indent=2))
    elif docs:
        _table(console, [row for doc in docs for row in _limits_rows(doc)],
               ("subject", "kind", "own", "effective", "used", "resets_in_seconds"))
    else:
        console.print_json(json.dumps(out))
    return 0


def _pat_target(a: argparse.ArgumentParser) -> None:
    t = a.add_mutually_exclusive_group()
    t.add_argument("--user", help="user id or name")
    t.add_argument("--domain", help="domain id or name")


def _seg(value: str) -> str:
    return quote(value, safe="")


def _attested_client(url: str, policy_file: str, **kwargs: Any) -> httpx.Client:
    """An httpx client that verifies the enclave's attestation (and pins its key) before sending anything."""
    from pathlib import Path

    from attestation.atls.client import AttestedClient
    from attestation.errors import PolicyError
    from attestation.policy import load_policy

    try:
        policy = load_policy(Path(policy_file))
    except PolicyError as e:
        raise CliError(f"--policy {policy_file}: {e}") from None
    return AttestedClient(url.rstrip("/"), policy=policy, **kwargs)


class Api:
    def __init__(self, args: argparse.Namespace) -> None:
        token = args.token or os.environ.get("CUBE_TOKEN")
        if not token:
            raise CliError("no token: pass --token or set CUBE_TOKEN")
        url = urlsplit(args.url)
        if url.scheme != "https":
            raise CliError("--url must be https://")
        timeout = httpx.Timeout(30.0, read=None)
        headers = {"Authorization": f"Bearer {token}"}
        if args.policy:
            if args.ca or args.insecure_no_attestation:
                raise CliError("--policy excludes --ca and --insecure-no-attestation: the attested key is the "
                               "trust root")
            self.client = _attested_client(args.url, args.policy, timeout=timeout, headers=headers)
            return
        if not args.insecure_no_attestation:
            raise CliError("refusing to send the token without verifying the enclave: pass --policy FILE "
                           "(attested TLS), or --insecure-no-attestation to accept plain TLS")
        if args.ca and not os.path.isfile(args.ca):
            raise CliError(f"--ca {args.ca}: no such file")
        print("cube-admin: WARNING: --insecure-no-attestation: the enclave is not verified; the token goes to "
              "whoever holds a TLS certificate for this name", file=sys.stderr)
        verify = ssl.create_default_context(cafile=args.ca) if args.ca else ssl.create_default_context()
        self.client = httpx.Client(base_url=args.url, verify=verify, timeout=timeout, headers=headers,
                                   trust_env=False)

    def _check(self, r: httpx.Response) -> None:
        if r.status_code < 400:
            return
        try:
            err = r.json()["error"]
            msg = f"{err.get('message')} ({r.status_code} {err.get('code')})"
        except Exception:
            msg = f"HTTP {r.status_code}"
        raise CliError(msg)

    def call(self, method: str, path: str, body: dict | None = None, params: dict | None = None) -> Any:
        r = self.client.request(method, path, json=body, params={k: v for k, v in (params or {}).items() if v is not None})
        self._check(r)
        return r.json() if r.content else None

    def stream(self, method: str, path: str, body: dict) -> Iterable[dict]:
        with self.client.stream(method, path, json=body) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            for line in r.iter_lines():
                if line.strip():
                    yield json.loads(line)


_ID_COLUMNS = frozenset({"id", "user_id", "domain_id", "issued_by", "pat_id", "request_id"})
_FOLDED_MIN_WIDTH = 10


def _table(console: Console, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """A table whose id columns always show whole (never cut or wrapped: they are meant to be copied); other
    columns fold. When the ids alone exceed the terminal, the table is wider than it rather than cropped."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = {c: max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)}
    mins = {c: widths[c] if c in _ID_COLUMNS else min(_FOLDED_MIN_WIDTH, widths[c]) for c in columns}
    table = Table(*[Column(c, no_wrap=c in _ID_COLUMNS, overflow="fold", min_width=mins[c]) for c in columns])
    for r in cells:
        table.add_row(*r)
    needed = sum(mins.values()) + 3 * len(columns) + 1      # cells plus borders and padding
    width = console.width
    console.width = max(width, needed)
    try:
        console.print(table, crop=False)
    finally:
        console.width = width


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _audit_export(api: Api, args: argparse.Namespace) -> int:
    """The export's bytes exactly as the enclave sent them (the verifier recomputes hashes over its content)."""
    params = {k: v for k, v in (("since", args.since), ("until", args.until)) if v is not None}
    with api.client.stream("GET", "/admin/audit/export", params=params) as r:
        if r.status_code >= 400:
            r.read()
            api._check(r)
        out = open(args.output, "wb") if args.output else sys.stdout.buffer
        try:
            for chunk in r.iter_bytes():
                out.write(chunk)
        finally:
            if args.output:
                out.close()
            else:
                out.flush()
    return 0


def _pull(api: Api, args: argparse.Namespace, console: Console) -> int:
    lines = api.stream("POST", "/admin/models", {"backend": args.backend, "model": args.model})
    failed = None
    if args.json:
        for item in lines:
            print(json.dumps(item), flush=True)
            if "error" in item:
                failed = item
        return 1 if failed else 0
    tasks: dict[str, Any] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        for item in lines:
            if "error" in item:
                failed = item
                break
            digest = item.get("digest")
            if digest and item.get("total"):
                if digest not in tasks:
                    tasks[digest] = progress.add_task(item.get("status", digest), total=item["total"])
                progress.update(tasks[digest], completed=item.get("completed", 0))
            else:
                progress.console.print(item.get("status", json.dumps(item)))
    if failed:
        err = failed["error"]
        console.print(f"[red]pull failed:[/red] {err.get('message') if isinstance(err, dict) else err}")
        return 1
    return 0


def _usage(api: Api, args: argparse.Namespace, console: Console) -> int:
    """``cube-admin usage``: with --json a JSON list (the groups, or the records), with --csv CSV, else a table
    and the totals. Rows the enclave left out (failed MAC) are reported on stderr."""
    if args.json and args.csv:
        raise CliError("--json and --csv exclude each other")
    if args.domain:
        path = f"/domains/{_seg(args.domain)}/usage"
    else:
        path = "/users/me/usage" if args.me else "/admin/usage"
    params = {"since": args.since, "until": args.until, "model": args.model, "user_id": args.user,
              "pat_id": args.pat, "limit": args.limit,
              "group_by": ",".join(args.group_by) if args.group_by else None}
    out = api.call("GET", path, params=params)
    rows = out["data"]
    columns = ((*(_GROUP_FIELDS[g] for g in args.group_by), *USAGE_TOTALS) if args.group_by
               else USAGE_RECORD_COLUMNS)
    if out.get("integrity_failures"):
        print(f"cube-admin: WARNING: {out['integrity_failures']} usage row(s) failed their integrity check (edited "
              "or inserted outside the enclave) and are not counted", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        _table(console, rows, columns)
        totals = out["totals"]
        console.print("total: " + ", ".join(f"{k} {totals[k]}" for k in USAGE_TOTALS)
                      + (" (more records than shown: --limit)" if out.get("has_more") else ""))
    return 0


def run(args: argparse.Namespace, console: Console) -> int:
    api = Api(args)
    g, a = args.group, getattr(args, "action", None)
    out: Any
    columns: Sequence[str] = ()
    if g == "usage":
        return _usage(api, args, console)
    if g == "limits":
        return _limits(api, args, console)
    if g == "whoami":
        out = api.call("GET", "/users/me")
    elif g == "backends":
        out, columns = api.call("GET", "/admin/backends"), ("name", "kind", "up", "models", "error", "last_ok")
    elif g == "audit":
        return _audit_export(api, args)
    elif g == "models":
        if a == "pull":
            return _pull(api, args, console)
        if a == "remove":
            api.call("DELETE", f"/admin/models/{quote(args.model, safe='/:')}", params={"backend": args.backend})
            out = {"removed": args.model}
        elif args.domain:
            out = api.call("GET", f"/proxy/{_seg(args.domain)}/v1/models")["data"]
            columns = ("id", "owned_by", "created")
        else:
            out, columns = api.call("GET", "/admin/models"), ("id", "backend", "kind", "owned_by", "created")
    elif g == "domains":
        if a == "create":
            out = api.call("POST", "/admin/domains", {"name": args.name, "model_allowlist": args.allow})
        elif a == "show":
            out = api.call("GET", f"/admin/domains/{_seg(args.domain_id)}")
        elif a == "update":
            body = {"name": args.name, "model_allowlist": args.allow, "clear_model_allowlist": args.clear_allowlist}
            out = api.call("PATCH", f"/admin/domains/{_seg(args.domain_id)}", body)
        elif a == "delete":
            api.call("DELETE", f"/admin/domains/{_seg(args.domain_id)}")
            out = {"deleted": args.domain_id}
        else:
            out, columns = api.call("GET", "/admin/domains"), ("id", "name", "model_allowlist", "created_at")
    elif g == "users":
        if a == "create":
            out = api.call("POST", "/admin/users", {"name": args.name, "superadmin": args.superadmin})
        elif a == "show":
            out = api.call("GET", f"/admin/users/{_seg(args.user_id)}")
        elif a == "update":
            out = api.call("PATCH", f"/admin/users/{_seg(args.user_id)}",
                           {"name": args.name, "superadmin": args.superadmin})
        elif a == "delete":
            api.call("DELETE", f"/admin/users/{_seg(args.user_id)}")
            out = {"deleted": args.user_id}
        else:
            out, columns = api.call("GET", "/admin/users"), ("id", "name", "superadmin", "created_at")
    elif g == "members":
        base = f"/domains/{_seg(args.domain_id)}/members"
        if a == "set":
            out = api.call("PUT", f"{base}/{_seg(args.user_id)}", {"role": args.role})
        elif a == "remove":
            api.call("DELETE", f"{base}/{_seg(args.user_id)}")
            out = {"removed": args.user_id}
        else:
            rows = api.call("GET", base)
            out = rows
            columns = ("user_id", "name", "role", "created_at")
            if not args.json:
                rows = [{"user_id": m["user"]["id"], "name": m["user"]["name"], "role": m["role"],
                         "created_at": m["created_at"]} for m in rows]
                _table(console, rows, columns)
                return 0
    elif g == "pats":
        domain, user = getattr(args, "domain", None), getattr(args, "user", None)
        if domain:
            base = f"/domains/{_seg(domain)}"
        elif user:
            base = f"/admin/users/{_seg(user)}"
        else:
            base = "/users/me"
        if a == "create":
            body = {"name": args.name, "expires_in_days": args.days, "model_allowlist": args.allow}
            if args.scope:
                body["scopes"] = args.scope
            if domain:
                if not args.member:
                    raise CliError("--domain needs --member USER (id or name)")
                path = f"{base}/members/{_seg(args.member)}/pats"
            else:
                path = f"{base}/pats"
            out = api.call("POST", path, {k: v for k, v in body.items() if v is not None})
            if not args.json:
                console.print(f"New API key {out['id']} for user {out['user_id']} (issued by {out['issued_by']}, "
                              f"expires {out['expires_at']}); the secret is shown once, store it now:",
                              soft_wrap=True)
                print(out["token"])
                return 0
        elif a == "show":
            out = api.call("GET", f"/pats/{_seg(args.pat_id)}")
        elif a == "revoke":
            # With neither --user nor --domain the key is found wherever the caller may manage it.
            prefix = base if domain or user else ""
            api.call("DELETE", f"{prefix}/pats/{_seg(args.pat_id)}")
            out = {"revoked": args.pat_id}
        else:
            out = api.call("GET", f"{base}/pats")
            columns = ("id", "name", "display", "scopes", "domain_id", "issued_by", "state", "expires_at",
                       "last_used_at")
    else:  # pragma: no cover - argparse guarantees a group
        raise CliError(f"unknown command {g}")
    if args.json:
        print(json.dumps(out, indent=2))
    elif columns and isinstance(out, list):
        _table(console, out, columns)
    else:
        console.print_json(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.group == "bootstrap":   # works on local files only: no URL, token or attestation involved
        return bootstrap_cli.run(args)
    console = Console(stderr=False)
    try:
        return run(args, console)
    except CliError as e:
        print(f"cube-admin: {e}", file=sys.stderr)
        return 1
    except AttestationError as e:
        print(f"cube-admin: enclave not verified, nothing was sent: {e}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:
        print(f"cube-admin: cannot reach {args.url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except (OSError, ssl.SSLError) as e:
        print(f"cube-admin: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
