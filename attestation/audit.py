"""The audit trail's format and its offline verifier (``cube-attest verify-audit``). Pure: no web framework.

An entry is a JSON object with at least ``v``, ``seq`` (1, 2, ...), ``prev`` (the hash of entry ``seq - 1``;
``GENESIS`` for entry 1), ``time`` and ``kind``; its hash is::

    hash = SHA-256(ENTRY_LABEL || canonical_json(entry))        ; hex

so each entry commits to everything before it. A checkpoint is a statement ``{"v", "seq", "hash", "time",
"key_id"}`` signed (``attestation.signing``, purpose ``CHECKPOINT_PURPOSE``) by a key bound to the enclave's
attestation evidence: the enclave vouches that entry ``seq`` has that hash, hence for the whole chain up to it.

An export is JSON lines, one object each with a ``type``: ``export`` (first line: format, since, until),
``entry`` (``hash``, ``entry``), ``signing_key`` (``key_id``, ``public_key`` and ``evidence`` in base64) and
``checkpoint`` (``statement``, ``signature`` in base64). ``verify_export`` recomputes the chain, checks every
checkpoint's signature and evidence under a policy, requires the last entry to be covered by a checkpoint and
reports every problem with the seq where it was found. A chain may start after seq 1 only where a ``prune``
entry records the removal (``through`` = the last pruned seq, ``anchor`` = its hash) or when the export was asked
for from that seq (``since``: then it is reported as partial).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .policy import Policy
from .signing import canonical_json, key_id, verify_signed

ENTRY_LABEL = b"cube-ai/audit-entry/v1"
CHECKPOINT_PURPOSE = "cube-ai/audit-checkpoint/v1"
EXPORT_FORMAT = "cube-ai/audit-export/v1"
GENESIS = "00" * 32
_HEX = frozenset("0123456789abcdef")


class AuditFormatError(ValueError):
    """An export that cannot be read at all (not JSON lines of the expected shapes)."""


def entry_hash(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(ENTRY_LABEL + canonical_json(dict(entry))).hexdigest()


def checkpoint_statement(*, seq: int, hash: str, time: str, signer_key_id: str) -> dict[str, Any]:
    return {"v": 1, "seq": seq, "hash": hash, "time": time, "key_id": signer_key_id}


def _is_hash(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _is_int(value: Any) -> bool:
    return type(value) is int


@dataclass(frozen=True)
class ExportedEntry:
    hash: str                 # as exported (the verifier recomputes its own)
    entry: dict[str, Any]

    @property
    def seq(self) -> int:
        return self.entry["seq"]


@dataclass(frozen=True)
class ExportedKey:
    key_id: str
    public_key: bytes
    evidence: bytes


@dataclass(frozen=True)
class ExportedCheckpoint:
    statement: dict[str, Any]
    signature: bytes

    @property
    def seq(self) -> int:
        return self.statement["seq"]


@dataclass
class AuditExport:
    since: int | None = None
    until: int | None = None
    entries: list[ExportedEntry] = field(default_factory=list)
    keys: dict[str, ExportedKey] = field(default_factory=dict)
    checkpoints: list[ExportedCheckpoint] = field(default_factory=list)


def _b64(value: Any, what: str, line: int) -> bytes:
    if not isinstance(value, str):
        raise AuditFormatError(f"line {line}: {what} must be base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AuditFormatError(f"line {line}: {what} is not valid base64") from None


def _optional_seq(value: Any, what: str) -> int | None:
    if value is not None and (not _is_int(value) or value < 1):
        raise AuditFormatError(f"header: {what} must be a positive integer or null")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers differ on a repeated key (Python keeps the last, others the first): an auditor's other tool
    # would read another entry than the one verified.
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("a key appears twice in one object")
    return found


def parse_export(data: bytes) -> AuditExport:
    """Read an export strictly (typed AuditFormatError for anything malformed)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AuditFormatError("the export is not UTF-8 text") from None
    export = AuditExport()
    header_seen = False
    # Lines end at "\n" only (JSON lines): str.splitlines would also cut at U+2028, U+0085, ... which JSON
    # text may hold unescaped, e.g. in a path parameter an entry records.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
            canonical_json(item)   # what is hashed and signed must have one byte form: no lone surrogate
        except (ValueError, RecursionError):
            raise AuditFormatError(f"line {number}: not JSON (or NaN, Infinity, a lone surrogate, a repeated "
                                   "key, too deep)") from None
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise AuditFormatError(f"line {number}: not an object with a type")
        kind = item["type"]
        if kind == "export":
            if header_seen or export.entries or export.checkpoints:
                raise AuditFormatError(f"line {number}: the export header must come first, once")
            if item.get("format") != EXPORT_FORMAT:
                raise AuditFormatError(f"line {number}: format must be {EXPORT_FORMAT!r}")
            export.since = _optional_seq(item.get("since"), "since")
            export.until = _optional_seq(item.get("until"), "until")
            header_seen = True
        elif kind == "entry":
            entry = item.get("entry")
            if not isinstance(entry, dict) or not _is_int(entry.get("seq")) or not _is_hash(entry.get("prev")) \
                    or not isinstance(entry.get("kind"), str) or not isinstance(entry.get("time"), str):
                raise AuditFormatError(f"line {number}: an entry needs seq, prev, kind and time")
            if not _is_hash(item.get("hash")):
                raise AuditFormatError(f"line {number}: an entry's hash must be 64 hex digits")
            export.entries.append(ExportedEntry(hash=item["hash"], entry=entry))
        elif kind == "signing_key":
            kid = item.get("key_id")
            if not _is_hash(kid):
                raise AuditFormatError(f"line {number}: key_id must be 64 hex digits")
            export.keys[kid] = ExportedKey(kid, _b64(item.get("public_key"), "public_key", number),
                                           _b64(item.get("evidence"), "evidence", number))
        elif kind == "checkpoint":
            statement = item.get("statement")
            if not isinstance(statement, dict) or not _is_int(statement.get("seq")) \
                    or not _is_hash(statement.get("hash")) or not _is_hash(statement.get("key_id")):
                raise AuditFormatError(f"line {number}: a checkpoint statement needs seq, hash and key_id")
            export.checkpoints.append(ExportedCheckpoint(statement, _b64(item.get("signature"), "signature", number)))
        else:
            raise AuditFormatError(f"line {number}: unknown type {kind!r}")
    if not header_seen:
        raise AuditFormatError("no export header (a first line of type 'export')")
    return export


@dataclass(frozen=True)
class AuditProblem:
    seq: int | None
    message: str

    def __str__(self) -> str:
        return f"seq {self.seq}: {self.message}" if self.seq is not None else self.message


@dataclass
class AuditReport:
    ok: bool
    problems: list[AuditProblem]
    first_seq: int | None = None
    last_seq: int | None = None
    entries: int = 0
    checkpoints_verified: int = 0
    covered_seq: int | None = None     # the highest seq a verified checkpoint vouches for
    signed_at: str | None = None       # the latest time a verified checkpoint over it states: how fresh it is
    partial: bool = False              # starts at ``since``: nothing before it was checked
    pruned_through: int | None = None  # the chain starts after this recorded prune

    @property
    def error(self) -> str | None:
        return str(self.problems[0]) if self.problems else None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.error,
                "problems": [{"seq": p.seq, "message": p.message} for p in self.problems],
                "first_seq": self.first_seq, "last_seq": self.last_seq, "entries": self.entries,
                "checkpoints_verified": self.checkpoints_verified, "covered_seq": self.covered_seq,
                "signed_at": self.signed_at,
                "partial": self.partial, "pruned_through": self.pruned_through}


def _chain(export: AuditExport, report: AuditReport) -> dict[int, str]:
    """Recompute every hash and link; seq -> recomputed hash. Problems go into ``report``."""
    problem = report.problems.append
    hashes: dict[int, str] = {}
    prev_seq: int | None = None
    prev_hash: str | None = None
    for item in export.entries:
        seq = item.seq
        computed = entry_hash(item.entry)
        if computed != item.hash:
            problem(AuditProblem(seq, "entry edited: its content does not match its hash"))
        if prev_seq is not None:
            if seq != prev_seq + 1:
                problem(AuditProblem(seq, f"entries out of order or missing: seq {seq} follows seq {prev_seq}"))
            elif item.entry["prev"] != prev_hash:
                problem(AuditProblem(seq, "does not link to the entry before it (an entry was edited, dropped, "
                                          "inserted or reordered)"))
        if seq in hashes:
            problem(AuditProblem(seq, "seq appears twice"))
        hashes[seq] = computed
        prev_seq, prev_hash = seq, computed
        if item.entry["kind"] == "tamper":
            problem(AuditProblem(seq, f"the enclave recorded tampering: {item.entry.get('detail', '?')}"))
    return hashes


def _start(export: AuditExport, report: AuditReport) -> None:
    first = export.entries[0]
    if first.seq == 1 and first.entry["prev"] == GENESIS:
        return
    for item in export.entries:
        e = item.entry
        if e["kind"] == "prune" and e.get("through") == first.seq - 1 and e.get("anchor") == first.entry["prev"]:
            report.pruned_through = first.seq - 1
            return
    if export.since is not None and first.seq == export.since:
        report.partial = True
        return
    report.problems.append(AuditProblem(first.seq, f"the chain starts at seq {first.seq} with no recorded prune: "
                                                   "the entries before it were removed"))


def _checkpoints(export: AuditExport, hashes: dict[int, str], report: AuditReport, policy: Policy,
                 kds: Any, pcs: Any) -> None:
    problem = report.problems.append
    verdicts: dict = {}
    for cp in export.checkpoints:
        seq, kid = cp.seq, cp.statement["key_id"]
        key = export.keys.get(kid)
        if key is None:
            problem(AuditProblem(seq, f"checkpoint signed by key {kid[:16]}..., which the export does not carry"))
            continue
        if key_id(key.public_key) != kid:
            problem(AuditProblem(seq, f"signing key {kid[:16]}...: its public key does not have this key id"))
            continue
        check = verify_signed(purpose=CHECKPOINT_PURPOSE, message=canonical_json(cp.statement),
                              signature=cp.signature, public_key_der=key.public_key, evidence=key.evidence,
                              policy=policy, kds=kds, pcs=pcs, verdicts=verdicts)
        if not check.ok:
            problem(AuditProblem(seq, f"checkpoint does not verify: {check.error}"))
            continue
        report.checkpoints_verified += 1
        if seq in hashes:
            if hashes[seq] != cp.statement["hash"]:
                problem(AuditProblem(seq, "the signed checkpoint names another hash for this entry: the entry "
                                          "(or one before it) was changed after it was signed"))
            else:
                when = cp.statement.get("time") if isinstance(cp.statement.get("time"), str) else None
                if seq > (report.covered_seq or 0):
                    report.covered_seq, report.signed_at = seq, when
                elif seq == report.covered_seq and when is not None and when > (report.signed_at or ""):
                    report.signed_at = when
    last = export.entries[-1].seq
    if report.covered_seq != last:
        after = f"after seq {report.covered_seq}" if report.covered_seq else "in the export"
        problem(AuditProblem(last, f"entries {after} are covered by no verified checkpoint (inserted, or the "
                                   "export is incomplete)"))


def _extends(export: AuditExport, hashes: dict[int, str], previous: AuditExport, report: AuditReport) -> None:
    """The new export must agree with an older one wherever both hold an entry, and must not end earlier."""
    problem = report.problems.append
    old = {item.seq: entry_hash(item.entry) for item in previous.entries}
    if not old:
        return
    for seq in sorted(old.keys() & hashes.keys()):
        if old[seq] != hashes[seq]:
            problem(AuditProblem(seq, "differs from the previous export: history was rewritten"))
            return
    old_last = max(old)
    first, last = export.entries[0].seq, export.entries[-1].seq
    if last < old_last:   # whatever the (unsigned) header's until says: this export does not extend the old one
        problem(AuditProblem(last, f"the export ends before the previous one did (seq {old_last}): entries were "
                                   "truncated or the database was rolled back"))
    elif first == old_last + 1 and export.entries[0].entry["prev"] != old[old_last]:
        problem(AuditProblem(first, "does not continue the previous export's last entry"))
    elif first > old_last + 1 and report.pruned_through is None:
        problem(AuditProblem(first, f"cannot be linked to the previous export (it ended at seq {old_last})"))


def verify_export(export: AuditExport, policy: Policy, *, previous: AuditExport | None = None,
                  kds: Any = None, pcs: Any = None) -> AuditReport:
    """Everything ``cube-attest verify-audit`` checks; ok only when no problem was found."""
    report = AuditReport(ok=False, problems=[])
    if not export.entries:
        report.problems.append(AuditProblem(None, "the export holds no entry"))
        return report
    gaps = policy.measurement_gaps()
    if gaps and not policy.allow_unmeasured:   # as verify-receipt: any image on genuine hardware could have signed
        report.problems.append(AuditProblem(None, "the policy does not pin the boot chain (" + "; ".join(
            f"{p}: {why}" for p, why in gaps.items()) + "): any image on genuine hardware could have signed the "
            "checkpoints; list the measurements, or set allow_unmeasured: true to accept that"))
    report.entries = len(export.entries)
    report.first_seq, report.last_seq = export.entries[0].seq, export.entries[-1].seq
    hashes = _chain(export, report)
    _start(export, report)
    _checkpoints(export, hashes, report, policy, kds, pcs)
    if previous is not None:
        _extends(export, hashes, previous, report)
    report.ok = not report.problems
    return report
