"""``cube-admin``: the admin API from the command line (httpx), with ``--json`` output everywhere."""

from __future__ import annotations

import argparse
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
from rich.table import Table

from attestation.errors import AttestationError

DEFAULT_URL = "https://localhost:8443"


class CliError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cube-admin", description="Administer a Cube AI enclave over its HTTP API")
    p.add_argument("--url", default=os.environ.get("CUBE_URL", DEFAULT_URL), help="service URL (env CUBE_URL)")
    p.add_argument("--token", default=None, help="personal access token (default: env CUBE_TOKEN)")
    p.add_argument("--ca", help="PEM file to trust for the server certificate (e.g. data_dir/server-cert.pem)")
    p.add_argument("--policy", help="attestation policy YAML: verify the enclave (attested TLS) before the token is "
                                    "sent, e.g. data_dir/sim-policy.yaml for the local simulated demo")
    p.add_argument("--json", action="store_true", help="print raw JSON")
    sub = p.add_subparsers(dest="group", required=True)

    sub.add_parser("whoami", help="the user behind the token, its memberships and this PAT")

    g = sub.add_parser("backends", help="backends and health").add_subparsers(dest="action", required=True)
    g.add_parser("list")

    g = sub.add_parser("models", help="platform models").add_subparsers(dest="action", required=True)
    g.add_parser("list")
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
    a.add_argument("domain_id")
    a = g.add_parser("update")
    a.add_argument("domain_id")
    a.add_argument("--name")
    a.add_argument("--allow", action="append")
    a.add_argument("--clear-allowlist", action="store_true")
    a = g.add_parser("delete")
    a.add_argument("domain_id")

    g = sub.add_parser("users").add_subparsers(dest="action", required=True)
    g.add_parser("list")
    a = g.add_parser("create")
    a.add_argument("name")
    a.add_argument("--superadmin", action="store_true")
    a = g.add_parser("show")
    a.add_argument("user_id")
    a = g.add_parser("update")
    a.add_argument("user_id")
    a.add_argument("--name")
    a.add_argument("--superadmin", action=argparse.BooleanOptionalAction, default=None)
    a = g.add_parser("delete")
    a.add_argument("user_id")

    g = sub.add_parser("members", help="domain memberships").add_subparsers(dest="action", required=True)
    a = g.add_parser("list")
    a.add_argument("domain_id")
    a = g.add_parser("set", help="add a user to a domain or change the role")
    a.add_argument("domain_id")
    a.add_argument("user_id")
    a.add_argument("--role", choices=["admin", "member"], default="member")
    a = g.add_parser("remove")
    a.add_argument("domain_id")
    a.add_argument("user_id")

    g = sub.add_parser("pats", help="personal access tokens").add_subparsers(dest="action", required=True)
    a = g.add_parser("list", help="yours, a user's (--user, superadmin) or a domain's (--domain)")
    _pat_target(a)
    a = g.add_parser("create", help="yours; a user's (--user); a domain member's (--domain D --member U)")
    a.add_argument("name")
    _pat_target(a)
    a.add_argument("--member", help="with --domain: the member to issue a domain-bound PAT for")
    a.add_argument("--scope", action="append", choices=["models:read", "models:infer", "manage"])
    a.add_argument("--days", type=int, help="lifetime in days (default: server default)")
    a.add_argument("--allow", action="append", help="model id or pattern this PAT may use (repeatable)")
    a = g.add_parser("revoke")
    a.add_argument("pat_id")
    _pat_target(a)
    return p


def _pat_target(a: argparse.ArgumentParser) -> None:
    t = a.add_mutually_exclusive_group()
    t.add_argument("--user")
    t.add_argument("--domain")


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
            if args.ca:
                raise CliError("--policy and --ca exclude each other: the attested key is the trust root")
            self.client = _attested_client(args.url, args.policy, timeout=timeout, headers=headers)
            return
        verify = ssl.create_default_context(cafile=args.ca) if args.ca else ssl.create_default_context()
        self.client = httpx.Client(base_url=args.url, verify=verify, timeout=timeout, headers=headers)

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
        r = self.client.request(method, path, json=body, params={k: v for k, v in (params or {}).items() if v})
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


def _table(console: Console, rows: Sequence[dict], columns: Sequence[str]) -> None:
    table = Table(*columns)
    for row in rows:
        table.add_row(*[_cell(row.get(c)) for c in columns])
    console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


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


def run(args: argparse.Namespace, console: Console) -> int:
    api = Api(args)
    g, a = args.group, getattr(args, "action", None)
    out: Any
    columns: Sequence[str] = ()
    if g == "whoami":
        out = api.call("GET", "/users/me")
    elif g == "backends":
        out, columns = api.call("GET", "/admin/backends"), ("name", "kind", "up", "models", "error", "last_ok")
    elif g == "models":
        if a == "pull":
            return _pull(api, args, console)
        if a == "remove":
            api.call("DELETE", f"/admin/models/{quote(args.model, safe='/:')}", params={"backend": args.backend})
            out = {"removed": args.model}
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
        if args.domain:
            base = f"/domains/{_seg(args.domain)}"
        elif args.user:
            base = f"/admin/users/{_seg(args.user)}"
        else:
            base = "/users/me"
        if a == "create":
            body = {"name": args.name, "expires_in_days": args.days, "model_allowlist": args.allow}
            if args.scope:
                body["scopes"] = args.scope
            if args.domain:
                if not args.member:
                    raise CliError("--domain needs --member USER_ID")
                path = f"{base}/members/{_seg(args.member)}/pats"
            else:
                path = f"{base}/pats"
            out = api.call("POST", path, {k: v for k, v in body.items() if v is not None})
            if not args.json:
                console.print("New API key (shown once, store it now):")
                print(out["token"])
                return 0
        elif a == "revoke":
            api.call("DELETE", f"{base}/pats/{_seg(args.pat_id)}")
            out = {"revoked": args.pat_id}
        else:
            out = api.call("GET", f"{base}/pats")
            columns = ("id", "name", "display", "scopes", "domain_id", "state", "expires_at", "last_used_at")
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
