"""``cube-attest``: verify SEV-SNP reports, TDX quotes and evidence bundles from the command line.

Subcommands (a stable contract, relied on by scripts and other components):

  verify-report REPORT [--vek CERT] [--chain PEM] [--product NAME] [--at ISO8601] [--policy FILE] [--json]
  verify-quote QUOTE [--collateral DIR | --pcs URL] [--eventlog CCEL] [--at ISO8601] [--policy FILE] [--json]
  verify-evidence FILE [--pcs URL] [--at ISO8601] [--policy FILE] [--json]
  verify-url URL [--policy FILE] [--json]                (attested TLS; attestation.atls.cli)
  proxy --listen 127.0.0.1:PORT --upstream URL --policy FILE [--pat-file F] [--domain D] [--allow-non-loopback]
        [--allow-origin O] [--allow-host H] [--allow-all-paths]
                                                         (local verifying proxy; attestation.proxy.command)
  sim-init [--dir DIR] / sim-fingerprint [--dir DIR]     (simulated platform root + ready policy)
  verify-receipt RECEIPT --request F --response F --policy FILE [--at ISO8601] [--json]
                                                         (a signed receipt of a response; attestation.receipt_cli)
  verify-audit EXPORT --policy FILE [--previous OLD_EXPORT] [--json]
                                                         (audit trail export; attestation.audit)

With --json exactly one JSON object is printed:
  {"ok", "platform", "product", "status", "claims", "checks": [{"name","ok","detail"}], "error"}
Exit status: 0 accepted, 1 refused (verification or policy), 2 usage or input error (unreadable
file, unparseable report/quote/evidence, bad policy, missing certificates or collateral).
"status" is one of verifier.py's words ("verified", "refused", "invalid", "malformed",
"collateral_unavailable", "error", or a TDX TCB status such as "UpToDate"), or "input_error" when
the command could not get as far as verification.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from .errors import AttestationError, EvidenceError, ParseError, PolicyError
from .policy import DEFAULT_POLICY, Policy, load_policy, sim_policy_yaml
from .verdict import Check, Verdict

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_INPUT = 2
MAX_INPUT_BYTES = 4 * 1024 * 1024
_INPUT_STATUSES = {"malformed", "collateral_unavailable"}


class InputError(Exception):
    """A usage or input problem: exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 on usage errors already; keep the text short
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_INPUT)


# -- input helpers --------------------------------------------------------------------------------

def _read(path: str, what: str) -> bytes:
    try:
        p = Path(path)
        if p.stat().st_size > MAX_INPUT_BYTES:
            raise InputError(f"{what} {path}: larger than {MAX_INPUT_BYTES} bytes")
        return p.read_bytes()
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None


def _maybe_hex(data: bytes) -> bytes:
    """Reports may be given as hex text (e.g. virtee's report_milan.hex)."""
    text = data.strip()
    if text and all(chr(b) in string.hexdigits + " \n\r\t" for b in text):
        compact = b"".join(text.split())
        if len(compact) % 2 == 0:
            return bytes.fromhex(compact.decode("ascii"))
    return data


def _parse_at(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"--at {text!r}: not an ISO 8601 time (e.g. 2026-02-03T00:00:00Z)") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _policy(path: str | None) -> Policy:
    if path is None:
        return DEFAULT_POLICY
    try:
        return load_policy(Path(path))
    except PolicyError as exc:
        raise InputError(str(exc)) from None


def _certificates_der(data: bytes, what: str) -> list[bytes]:
    from .snp.certs import cert_der, load_certificates

    try:
        return [cert_der(c) for c in load_certificates(data)]
    except Exception as exc:  # ParseError, and cryptography's odd ones (InvalidVersion, ...)
        raise InputError(f"{what}: not a PEM or DER certificate ({exc})") from None


def _crl_der(data: bytes, what: str) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    from .x509parse import load_pem_or_der_crl

    try:
        return load_pem_or_der_crl(data, "CRL").public_bytes(Encoding.DER)
    except ParseError as exc:
        raise InputError(f"{what}: not a PEM or DER CRL ({exc})") from None


# -- commands ---------------------------------------------------------------------------------------

def _cmd_verify_report(args: argparse.Namespace) -> Verdict:
    from .evidence import Evidence
    from .sim import SIM_ORGANIZATION
    from .snp.report import parse_report
    from .verifier import verify_evidence

    raw = _maybe_hex(_read(args.report, "report"))
    try:
        parse_report(raw)
    except Exception as exc:  # ParseError (anything else is a parser fault; still an input problem)
        raise InputError(f"report {args.report}: {exc}") from None
    certs: list[bytes] = []
    if args.vek:
        certs += _certificates_der(_read(args.vek, "--vek"), f"--vek {args.vek}")
    if args.chain:
        certs += _certificates_der(_read(args.chain, "--chain"), f"--chain {args.chain}")
    policy = _policy(args.policy)
    platform = "snp"
    if certs and _organization_of(certs[-1]) == SIM_ORGANIZATION:
        platform = "sim"  # verified only against the policy's sim root (verify_evidence enforces it)
    collateral = {}
    if args.crl:
        from .evidence import SNP_CRL_FILE

        collateral[SNP_CRL_FILE] = _crl_der(_read(args.crl, "--crl"), f"--crl {args.crl}")
    kds = None
    if args.kds:
        from .snp.kds import KdsClient

        kds = KdsClient(base_url=args.kds)
    try:
        evidence = Evidence(platform=platform, report=raw, certificates=tuple(certs), product=args.product,
                            collateral=collateral)
    except EvidenceError as exc:
        raise InputError(str(exc)) from None
    return verify_evidence(evidence, policy=policy, at=_parse_at(args.at), kds=kds)


def _organization_of(der: bytes) -> str | None:
    from cryptography.x509.oid import NameOID

    from .snp.certs import load_certificate

    try:
        attrs = load_certificate(der).subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    except ParseError:
        return None
    return str(attrs[0].value) if attrs else None


def _cmd_verify_quote(args: argparse.Namespace) -> Verdict:
    from .evidence import TDX_CCEL_FILE, Evidence
    from .tdx.quote import parse_quote
    from .verifier import verify_evidence

    raw = _read(args.quote, "quote")
    try:
        quote = parse_quote(raw)
    except Exception as exc:  # ParseError, and cryptography's odd ones from the embedded PCK chain
        raise InputError(f"quote {args.quote}: {exc}") from None
    policy = _policy(args.policy)
    at = _parse_at(args.at)
    files: dict[str, bytes] = {}
    if args.collateral:
        from .tdx.collateral import collateral_to_files, load_collateral_dir

        directory = Path(args.collateral)
        if not directory.is_dir():
            raise InputError(f"--collateral {args.collateral}: not a directory")
        try:
            fmspc = quote.pck_extension.fmspc.hex()
            files = collateral_to_files(load_collateral_dir(directory, fmspc=fmspc))
        except Exception as exc:  # CollateralError, ParseError, and anything a damaged file provokes
            raise InputError(f"--collateral {args.collateral}: {exc}") from None
    if args.eventlog:
        files[TDX_CCEL_FILE] = _event_log(args.eventlog)
    try:
        evidence = Evidence(platform="tdx", report=raw, collateral=files)
    except EvidenceError as exc:
        raise InputError(str(exc)) from None
    # The verifier replays a CCEL against the quote's RTMRs (a mismatch is refused) and the policy's boot
    # event pins are appraised against the boot state it records.
    return verify_evidence(evidence, policy=policy, at=at, pcs=_pcs_client(args))


def _event_log(path: str) -> bytes:
    """The CCEL file without its trailing padding (as the enclave's evidence carries it)."""
    from .tdx.eventlog import parse_event_log

    raw = _read(path, "--eventlog")
    try:
        return raw[:parse_event_log(raw).length]
    except ParseError as exc:
        raise InputError(f"--eventlog {path}: {exc}") from None


def _pcs_client(args: argparse.Namespace):
    """A PcsClient for --pcs (Intel PCS or a mirror such as the host agent's /pcs), else None."""
    if not getattr(args, "pcs", None):
        return None
    from .tdx.pcs import PcsClient

    return PcsClient(base_url=args.pcs)


def _cmd_verify_evidence(args: argparse.Namespace) -> Verdict:
    from .evidence import decode_cmw, evidence_from_json
    from .verifier import verify_evidence

    raw = _read(args.file, "evidence")
    policy = _policy(args.policy)
    at = _parse_at(args.at)
    try:
        if raw.lstrip()[:1] == b"{":
            try:
                doc = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                raise EvidenceError(f"not valid JSON ({exc})") from None
            evidence = evidence_from_json(doc)
        else:
            evidence = decode_cmw(raw)
    except EvidenceError as exc:
        raise InputError(f"evidence {args.file}: {exc}") from None
    return verify_evidence(evidence, policy=policy, at=at, pcs=_pcs_client(args))


def _cmd_sim(args: argparse.Namespace, create: bool) -> int:
    from .sim import SimPlatform, default_sim_dir

    directory = Path(args.dir) if args.dir else default_sim_dir()
    if not create and not (directory / "platform.json").is_file():
        raise InputError(f"no simulated platform in {directory}; create one with `cube-attest sim-init`")
    try:
        sim = SimPlatform.load_or_create(directory)
    except AttestationError as exc:
        raise InputError(str(exc)) from None
    policy_yaml = sim_policy_yaml(sim.fingerprint)
    if args.json:
        print(json.dumps({"fingerprint": sim.fingerprint, "directory": str(directory), "policy_yaml": policy_yaml}))
    else:
        print(f"# sim root fingerprint: {sim.fingerprint}")
        print(f"# platform directory:   {directory}")
        print(policy_yaml, end="")
    return EXIT_OK


MAX_AUDIT_EXPORT_BYTES = 1024 * 1024 * 1024


def _cmd_verify_audit(args: argparse.Namespace) -> int:
    """Exit 0 only when the export's chain, checkpoints and evidence all hold (and it extends --previous)."""
    from .audit import AuditFormatError, parse_export, verify_export

    def load(path: str, what: str):
        try:
            p = Path(path)
            if p.stat().st_size > MAX_AUDIT_EXPORT_BYTES:
                raise InputError(f"{what} {path}: larger than {MAX_AUDIT_EXPORT_BYTES} bytes")
            data = p.read_bytes()
        except OSError as exc:
            raise InputError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None
        try:
            return parse_export(data)
        except AuditFormatError as exc:
            raise InputError(f"{what} {path}: {exc}") from None

    policy = _policy(args.policy)
    export = load(args.export, "export")
    previous = load(args.previous, "previous export") if args.previous else None
    report = verify_export(export, policy, previous=previous)
    if args.json:
        print(json.dumps(report.to_json()))
    elif report.ok:
        span = f"seq {report.first_seq}..{report.last_seq}"
        notes = [f"starts after a recorded prune of seq 1..{report.pruned_through}"] if report.pruned_through else []
        if report.partial:
            notes.append(f"partial: nothing before seq {report.first_seq} was checked")
        print(f"INTACT: {report.entries} entries ({span}), {report.checkpoints_verified} verified checkpoint(s), "
              f"the last at seq {report.covered_seq}, signed at {report.signed_at or '?'}"
              + "".join(f"; {n}" for n in notes))
    else:
        print(f"TAMPERED or incomplete: {len(report.problems)} problem(s)")
        for problem in report.problems:
            print(f"  {problem}")
    return EXIT_OK if report.ok else EXIT_REFUSED


def _cmd_verify_url(args: argparse.Namespace) -> int:
    try:
        from .atls.cli import verify_url_command
    except ImportError as exc:
        raise InputError(f"verify-url is unavailable: {exc}") from None
    return int(verify_url_command(args))


# -- output -------------------------------------------------------------------------------------------

def _exit_code(verdict: Verdict) -> int:
    if verdict.ok:
        return EXIT_OK
    return EXIT_INPUT if verdict.status in _INPUT_STATUSES else EXIT_REFUSED


def _error_verdict(message: str) -> Verdict:
    return Verdict(ok=False, platform=None, product=None, status="input_error", claims={},
                   checks=[Check("input", False, message)], error=message)


def _print_json(verdict: Verdict) -> None:
    print(json.dumps(verdict.to_json(), sort_keys=False, default=str))


def _print_human(verdict: Verdict) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False, soft_wrap=False)
    table = Table(title=Text(f"{verdict.platform or '?'} {verdict.product or ''}".strip()), show_lines=False)
    table.add_column("check", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for check in verdict.checks:
        # Text(): details may quote evidence contents, which must never be read as rich markup.
        table.add_row(Text(check.name), Text("ok", style="green") if check.ok else Text("FAIL", style="red"),
                      Text(check.detail))
    console.print(table)
    if verdict.ok:
        console.print(Text("ACCEPTED", style="bold green") + Text(f" status: {verdict.status}"))
    else:
        console.print(Text("REFUSED", style="bold red") + Text(f" status: {verdict.status}"))
        if verdict.error:
            console.print(f"reason: {verdict.error}", markup=False)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cube-attest", description="Verify SEV-SNP reports, TDX quotes and Cube AI evidence.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser, at: bool = True) -> None:
        if at:
            p.add_argument("--at", metavar="ISO8601", help="verification time (default: now)")
        p.add_argument("--policy", metavar="FILE", help="appraisal policy YAML (default: evidence only)")
        p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("verify-report", help="verify an SEV-SNP attestation report")
    p.add_argument("report", metavar="REPORT", help="report file (binary or hex text)")
    p.add_argument("--vek", metavar="CERT", help="VCEK/VLEK certificate (PEM or DER)")
    p.add_argument("--chain", metavar="PEM", help="ASK or ASVK, then ARK (PEM or DER)")
    p.add_argument("--product", metavar="NAME", help="product (Milan, Genoa, Turin) when the report cannot say")
    p.add_argument("--kds", metavar="URL", help="fetch missing certificates from this AMD KDS (or host agent) URL")
    p.add_argument("--crl", metavar="FILE", help="AMD KDS CRL (PEM or DER) to check the ASK/ASVK against")
    common(p)

    p = sub.add_parser("verify-quote", help="verify an Intel TDX quote")
    p.add_argument("quote", metavar="QUOTE", help="quote file")
    p.add_argument("--collateral", metavar="DIR", help="Intel PCS collateral directory (enables the TCB status)")
    p.add_argument("--pcs", metavar="URL", help="fetch the collateral from this Intel PCS (or host agent /pcs) URL")
    p.add_argument("--eventlog", metavar="CCEL", help="TDX CC event log (as read from the ACPI CCEL area): it must "
                   "replay to the quote's RTMR0-3; its events join the claims")
    common(p)

    p = sub.add_parser("verify-evidence", help="verify a Cube AI evidence bundle (CBOR CMW or JSON)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--pcs", metavar="URL", help="fetch TDX collateral the evidence lacks from this PCS (or mirror) URL")
    common(p)

    p = sub.add_parser("verify-url", help="connect to an attested-TLS endpoint and verify its evidence")
    p.add_argument("url", metavar="URL")
    common(p, at=False)

    p = sub.add_parser("proxy", help="serve a loopback HTTP proxy that relays every request over attested TLS")
    p.add_argument("--listen", metavar="HOST:PORT", required=True,
                   help="where local clients connect, plain HTTP (loopback only, e.g. 127.0.0.1:11435; port 0: any)")
    p.add_argument("--upstream", metavar="URL", required=True, help="the enclave's origin, https://HOST[:PORT]")
    p.add_argument("--policy", metavar="FILE", required=True, help="appraisal policy YAML for the enclave")
    p.add_argument("--pat-file", metavar="FILE", help="a 0600 file holding the PAT: the proxy sets Authorization "
                   "itself, replacing the client's (client configs then hold no key)")
    p.add_argument("--domain", metavar="D", help="relay this domain's routes only, and use it in the printed snippets "
                   "(default: any domain; snippets for the PAT's)")
    p.add_argument("--allow-non-loopback", action="store_true", help="allow a --listen address other than "
                   "loopback (plain HTTP: whoever reaches it uses the enclave with the proxy's PAT)")
    p.add_argument("--allow-origin", metavar="ORIGIN", action="append", default=[],
                   help="accept browser requests from this Origin (scheme://host[:port]; repeatable); by default "
                   "any request with an Origin header is refused, so web pages cannot use the proxy's PAT")
    p.add_argument("--allow-host", metavar="NAME", action="append", default=[],
                   help="accept this name in Host besides 127.0.0.1, localhost, [::1] (repeatable; DNS rebinding guard)")
    p.add_argument("--allow-all-paths", action="store_true", help="relay every enclave route, not only the model "
                   "APIs /proxy/<domain>/v1/... and /proxy/<domain>/api/... (admin routes with a manage-scope PAT)")
    p.add_argument("--max-body-bytes", metavar="N", type=int, default=32 * 1024 * 1024,
                   help="largest request body accepted (default 32 MiB; beyond: 413)")
    p.add_argument("--read-timeout", metavar="SECONDS", type=float, default=600.0,
                   help="longest silence from the enclave within a response (default 600)")

    from .receipt_cli import add_parser as add_verify_receipt
    add_verify_receipt(sub)
    p = sub.add_parser("verify-audit", help="verify an audit trail export (GET /admin/audit/export)")
    p.add_argument("export", metavar="EXPORT", help="the export (JSON lines)")
    p.add_argument("--policy", metavar="FILE", required=True, help="appraisal policy YAML for the checkpoints' keys")
    p.add_argument("--previous", metavar="OLD_EXPORT", help="an older export this one must extend (detects "
                   "truncation and rollback across restarts)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    for name, help_text in (("sim-init", "create (once) the simulated platform and print its policy"),
                            ("sim-fingerprint", "print the simulated platform's root fingerprint and policy")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--dir", metavar="DIR", help="platform directory (default $CUBE_SIM_DIR or ~/.local/share/cube-ai/sim)")
        p.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_INPUT
    as_json = bool(getattr(args, "json", False))
    try:
        if args.command == "sim-init":
            return _cmd_sim(args, create=True)
        if args.command == "sim-fingerprint":
            return _cmd_sim(args, create=False)
        if args.command == "verify-url":
            return _cmd_verify_url(args)
        if args.command == "verify-receipt":
            from .receipt_cli import verify_receipt_command

            return verify_receipt_command(args)
        if args.command == "verify-audit":
            return _cmd_verify_audit(args)
        if args.command == "proxy":
            from .proxy.command import proxy_command

            return proxy_command(args)
        handler = {"verify-report": _cmd_verify_report, "verify-quote": _cmd_verify_quote,
                   "verify-evidence": _cmd_verify_evidence}[args.command]
        verdict = handler(args)
    except InputError as exc:
        if as_json:
            _print_json(_error_verdict(str(exc)))
        else:
            print(f"cube-attest: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as exc:  # noqa: BLE001 - never a traceback; fail closed
        message = f"internal error: {type(exc).__name__}: {exc}"
        if as_json:
            _print_json(_error_verdict(message))
        else:
            print(f"cube-attest: {message}", file=sys.stderr)
        return EXIT_INPUT
    if as_json:
        _print_json(verdict)
    else:
        _print_human(verdict)
    return _exit_code(verdict)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
