"""attestation.audit alone: a chain and checkpoints made here (no enclave), every way of breaking them, and the
``cube-attest verify-audit`` exit codes and output (issue 11 item 5)."""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.audit import (CHECKPOINT_PURPOSE, EXPORT_FORMAT, GENESIS, AuditFormatError, checkpoint_statement,
                               entry_hash, parse_export, verify_export)
from attestation.cli import main
from attestation.evidence import encode_cmw
from attestation.policy import Policy, sim_policy_yaml
from attestation.providers.sim import SimProvider
from attestation.signing import (NONCE_SIZE, canonical_json, key_id, signed_message, signing_binding,
                                 signing_report_data)


@dataclasses.dataclass
class Key:
    private: ec.EllipticCurvePrivateKey
    spki: bytes
    evidence: bytes

    @property
    def id(self) -> str:
        return key_id(self.spki)

    def line(self) -> dict:
        return {"type": "signing_key", "key_id": self.id, "public_key": base64.b64encode(self.spki).decode(),
                "evidence": base64.b64encode(self.evidence).decode()}

    def checkpoint(self, seq: int, digest: str) -> dict:
        statement = checkpoint_statement(seq=seq, hash=digest, time="2026-12-01T00:00:00.000000Z",
                                         signer_key_id=self.id)
        signature = self.private.sign(signed_message(CHECKPOINT_PURPOSE, canonical_json(statement)),
                                      ec.ECDSA(hashes.SHA256()))
        return {"type": "checkpoint", "statement": statement, "signature": base64.b64encode(signature).decode()}


@pytest.fixture(scope="module")
def key(sim_dir: Path) -> Key:
    private = ec.generate_private_key(ec.SECP256R1())
    spki = private.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    nonce = secrets.token_bytes(NONCE_SIZE)
    evidence = SimProvider(sim_dir).get_evidence(signing_report_data(spki, nonce))
    return Key(private, spki, encode_cmw(dataclasses.replace(evidence, binding=signing_binding(nonce))))


def chain(n: int, start: int = 1, prev: str = GENESIS, extra: dict | None = None) -> list[dict]:
    out = []
    for seq in range(start, start + n):
        entry = {"v": 1, "seq": seq, "prev": prev, "time": "2026-12-01T00:00:00.000000Z", "kind": "admin",
                 "action": "GET /admin/users", "outcome": 200, **(extra or {})}
        prev = entry_hash(entry)
        out.append({"type": "entry", "hash": prev, "entry": entry})
    return out


def export_of(lines: list[dict], **header) -> bytes:
    head = {"type": "export", "format": EXPORT_FORMAT, "since": None, "until": None, **header}
    return "".join(json.dumps(x) + "\n" for x in [head, *lines]).encode()


def signed(key: Key, entries: list[dict]) -> list[dict]:
    return [*entries, key.line(), key.checkpoint(entries[-1]["entry"]["seq"], entries[-1]["hash"])]


def problems(data: bytes, policy: Policy, previous: bytes | None = None) -> list[str]:
    report = verify_export(parse_export(data), policy, previous=parse_export(previous) if previous else None)
    assert report.ok == (not report.problems)
    return [str(p) for p in report.problems]


def test_an_intact_chain_verifies(key: Key, sim_policy: Policy) -> None:
    assert problems(export_of(signed(key, chain(5))), sim_policy) == []


@pytest.mark.parametrize("breaking, expected", [
    (lambda e: e[2]["entry"].update(outcome=500), "seq 3: entry edited"),
    (lambda e: e.pop(2), "seq 4: entries out of order or missing"),
    (lambda e: e.insert(1, e.pop(2)), "out of order"),
    (lambda e: e.pop(0), "seq 2: the chain starts at seq 2 with no recorded prune"),
])
def test_every_break_is_found_where_it_is(key: Key, sim_policy: Policy, breaking, expected: str) -> None:
    entries = chain(5)
    lines = signed(key, entries)
    breaking(lines)
    found = problems(export_of(lines), sim_policy)
    assert any(expected in p for p in found), found


def test_a_relinked_forgery_fails_the_checkpoint(key: Key, sim_policy: Policy) -> None:
    good = chain(5)
    checkpoint = key.checkpoint(5, good[-1]["hash"])
    forged = chain(5, extra={"outcome": 204})   # a whole chain re-made: it links, but is not what was signed
    found = problems(export_of([*forged, key.line(), checkpoint]), sim_policy)
    assert found == ["seq 5: the signed checkpoint names another hash for this entry: the entry (or one before it) "
                     "was changed after it was signed"] + [f for f in found if "covered" in f]


def test_entries_after_the_last_checkpoint_are_refused(key: Key, sim_policy: Policy) -> None:
    entries = chain(5)
    lines = [*entries, key.line(), key.checkpoint(3, entries[2]["hash"])]
    assert any("seq 5: entries after seq 3 are covered by no verified checkpoint" in p
               for p in problems(export_of(lines), sim_policy))


def test_a_chain_after_a_recorded_prune_verifies_and_an_unrecorded_gap_does_not(key: Key, sim_policy: Policy) -> None:
    old = chain(4)
    anchor = old[-1]["hash"]
    prune = {"v": 1, "seq": 5, "prev": anchor, "time": "2026-12-02T00:00:00.000000Z", "kind": "prune",
             "from": 1, "through": 4, "anchor": anchor}
    rest = [{"type": "entry", "hash": entry_hash(prune), "entry": prune}, *chain(2, start=6, prev=entry_hash(prune))]
    assert problems(export_of(signed(key, rest)), sim_policy) == []
    assert any("no recorded prune" in p for p in problems(export_of(signed(key, rest[1:])), sim_policy))
    # a partial export asked for from seq 6 verifies, said to be partial
    report = verify_export(parse_export(export_of(signed(key, rest[1:]), since=6)), sim_policy)
    assert report.ok and report.partial


def test_previous_export_detects_a_rollback_and_a_rewrite(key: Key, sim_policy: Policy) -> None:
    long = export_of(signed(key, chain(6)))
    short = export_of(signed(key, chain(4)))
    assert problems(long, sim_policy, previous=short) == []
    assert any("ends before the previous one" in p for p in problems(short, sim_policy, previous=long))
    other = export_of(signed(key, chain(6, extra={"outcome": 403})))
    assert any("history was rewritten" in p for p in problems(other, sim_policy, previous=long))


def test_a_foreign_platform_policy_refuses_the_checkpoints(key: Key, tmp_path: Path) -> None:
    from attestation.policy import policy_from_yaml

    other = SimProvider(tmp_path / "other-sim")
    found = problems(export_of(signed(key, chain(2))), policy_from_yaml(sim_policy_yaml(other.fingerprint)))
    assert any("checkpoint does not verify: evidence of the signing key refused" in p for p in found), found


@pytest.mark.parametrize("text", ["", "not json\n", '{"type": "entry"}\n',
                                  json.dumps({"type": "export", "format": "other"}) + "\n"])
def test_malformed_exports_are_typed_errors(text: str) -> None:
    with pytest.raises(AuditFormatError):
        parse_export(text.encode())


def test_the_command_exit_codes(key: Key, sim_platform, tmp_path: Path, capsys) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(sim_policy_yaml(sim_platform.fingerprint))
    good = tmp_path / "good.jsonl"
    good.write_bytes(export_of(signed(key, chain(3))))
    bad_lines = signed(key, chain(3))
    bad_lines[1]["entry"]["outcome"] = 418
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(export_of(bad_lines))
    assert main(["verify-audit", str(good), "--policy", str(policy)]) == 0
    assert "INTACT: 3 entries" in capsys.readouterr().out
    assert main(["verify-audit", str(bad), "--policy", str(policy)]) == 1
    assert "seq 2: entry edited" in capsys.readouterr().out
    assert main(["verify-audit", str(good), "--policy", str(policy), "--previous", str(bad), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False
    assert main(["verify-audit", str(tmp_path / "missing"), "--policy", str(policy)]) == 2


# -- found in review (revaudit): each an attack that worked before its fix -------------------------------------

def test_an_unmeasured_policy_is_refused_unless_allowed(key: Key, sim_platform) -> None:
    """As verify-receipt: a policy pinning no boot chain would accept checkpoints signed by any image."""
    from attestation.policy import policy_from_yaml

    strict = "".join(line + "\n" for line in sim_policy_yaml(sim_platform.fingerprint).splitlines()
                     if not line.startswith("allow_unmeasured"))
    found = problems(export_of(signed(key, chain(3))), policy_from_yaml(strict))
    assert len(found) == 1 and "does not pin the boot chain" in found[0] and "allow_unmeasured" in found[0], found
    assert problems(export_of(signed(key, chain(3))), policy_from_yaml(sim_policy_yaml(sim_platform.fingerprint))) == []


_GENESIS_ENTRY = '{"type":"entry","hash":"%s","entry":{"v":1,"seq":1,"prev":"%s","time":"t","kind":"admin","x":%%s}}' \
    % (GENESIS, GENESIS)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", '"\\ud800"', "[" * 100_000 + "]" * 100_000])
def test_json_without_one_byte_form_is_a_format_error(value: str, sim_platform, tmp_path: Path, capsys) -> None:
    """NaN, Infinity, a lone surrogate (no canonical byte form to hash) and nesting too deep for the parser were
    'internal error' crashes; they are typed format errors (exit 2, saying which line)."""
    data = (json.dumps({"type": "export", "format": EXPORT_FORMAT}) + "\n" + _GENESIS_ENTRY % value + "\n").encode()
    with pytest.raises(AuditFormatError, match="line 2"):
        parse_export(data)
    path, policy = tmp_path / "x.jsonl", tmp_path / "policy.yaml"
    path.write_bytes(data)
    policy.write_text(sim_policy_yaml(sim_platform.fingerprint))
    assert main(["verify-audit", str(path), "--policy", str(policy)]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "internal error" not in err, err


def test_an_older_export_relabelled_until_does_not_pass_as_extending_the_previous(key: Key, sim_policy: Policy) -> None:
    """The header is not signed: an older export given ``until`` passed --previous as if it were the newer one."""
    long = export_of(signed(key, chain(6)))
    replayed = export_of(signed(key, chain(4)), until=4)
    assert any("ends before the previous one" in p for p in problems(replayed, sim_policy, previous=long))


def test_line_separators_inside_strings_do_not_break_lines(key: Key, sim_policy: Policy) -> None:
    """U+2028, U+2029 and U+0085 are legal unescaped in JSON strings (and an entry's target holds whatever a
    caller put in a path): the reader split lines at them, so one refused admin call made every later export
    unreadable."""
    lines = signed(key, chain(3, extra={"target": {"user_id": "a\u2028b\u2029c\x85d"}}))
    data = "".join(json.dumps(x, ensure_ascii=False) + "\r\n" for x in
                   [{"type": "export", "format": EXPORT_FORMAT}, *lines]).encode()
    assert "\u2028".encode() in data
    assert problems(data, sim_policy) == []


def test_a_repeated_key_is_a_format_error(key: Key, sim_policy: Policy) -> None:
    """Python keeps a repeated key's last value, other parsers the first: an auditor's other tool would read
    another entry than the one verified (outcome 500 shown, 200 hashed)."""
    lines = signed(key, chain(2))
    text = json.dumps(lines[1]).replace('"outcome": 200', '"outcome": 500, "outcome": 200')
    data = export_of(lines).decode().replace(json.dumps(lines[1]), text).encode()
    assert b'"outcome": 500' in data
    with pytest.raises(AuditFormatError, match="line 3"):
        parse_export(data)


def test_the_report_says_when_the_covering_checkpoint_was_signed(key: Key, sim_policy: Policy, sim_platform,
                                                                 tmp_path: Path, capsys) -> None:
    """An older export replayed as a new one verifies on its own; the signed time of its last checkpoint is what
    tells the auditor (without --previous) how fresh it is."""
    entries = chain(3)
    later = key.checkpoint(3, entries[-1]["hash"])
    later["statement"]["time"] = "2026-12-02T00:00:00.000000Z"
    statement = later["statement"]
    later["signature"] = base64.b64encode(key.private.sign(
        signed_message(CHECKPOINT_PURPOSE, canonical_json(statement)), ec.ECDSA(hashes.SHA256()))).decode()
    lines = [*signed(key, entries), later]
    report = verify_export(parse_export(export_of(lines)), sim_policy)
    assert report.ok and report.signed_at == "2026-12-02T00:00:00.000000Z"
    path, policy = tmp_path / "x.jsonl", tmp_path / "policy.yaml"
    path.write_bytes(export_of(lines))
    policy.write_text(sim_policy_yaml(sim_platform.fingerprint))
    assert main(["verify-audit", str(path), "--policy", str(policy)]) == 0
    assert "signed at 2026-12-02T00:00:00.000000Z" in capsys.readouterr().out
