"""Receipts verified offline (attestation.receipt, cube-attest verify-receipt): a receipt holds for exactly the bytes
and the statement that were signed, by a key whose evidence binds it and passes the policy; any one-byte change of
the request, the response or the receipt fails, and so does a key whose evidence the policy refuses."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from attestation.cli import main
from attestation.policy import Policy, policy_from_yaml, sim_policy_yaml
from attestation.providers import SimProvider
from attestation.receipt import (
    RECEIPT_PURPOSE,
    STATEMENT_FIELDS,
    Receipt,
    ReceiptError,
    parse_receipt,
    receipt_path,
    verify_receipt,
)
from attestation.signing import canonical_json
from enclave.receipts.issuer import issue_receipt, statement_of
from enclave.signer import AttestedSigner

REQUEST = b'{"model": "llama3.2:3b", "messages": [{"role": "user", "content": "hello"}]}'
RESPONSE = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'


@dataclass(frozen=True)
class Entry:
    request_id: str = "0f" * 16
    created_at: datetime = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=timezone.utc)
    domain_id: str = "6f1c2a4e-0000-4000-8000-000000000001"
    pat_id: str = "6f1c2a4e-0000-4000-8000-0000000000aa"
    model: str = "llama3.2:3b"
    backend: str = "ollama"
    route: str = "chat/completions"
    stream: bool = True
    status: int = 200
    request_sha256: str | None = hashlib.sha256(REQUEST).hexdigest()
    response_sha256: str | None = hashlib.sha256(RESPONSE).hexdigest()


@pytest.fixture(scope="module")
def signer(sim_dir: Path) -> AttestedSigner:
    return AttestedSigner(SimProvider(sim_dir))


@pytest.fixture(scope="module")
def document(signer: AttestedSigner) -> dict[str, Any]:
    return issue_receipt(Entry(), signer)


def _verify(doc: dict[str, Any], policy: Policy, request: bytes = REQUEST, response: bytes = RESPONSE):
    return verify_receipt(parse_receipt(json.dumps(doc)), request=request, response=response, policy=policy)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def _with_blob(doc: dict[str, Any], where: tuple[str, ...], change) -> dict[str, Any]:
    """``doc`` with the base64 field at ``where`` decoded, changed and encoded again (canonically)."""
    out = json.loads(json.dumps(doc))
    parent = out
    for name in where[:-1]:
        parent = parent[name]
    parent[where[-1]] = base64.b64encode(change(base64.b64decode(parent[where[-1]]))).decode()
    return out


def test_a_receipt_holds_for_its_bytes(document: dict[str, Any], sim_policy: Policy, signer: AttestedSigner) -> None:
    result = _verify(document, sim_policy)
    assert result.ok, result.error
    assert [c.name for c in result.checks] == ["request_sha256", "response_sha256", "key_id", "signature_and_evidence"]
    assert result.statement == {"v": 1, "request_id": "0f" * 16, "time": "2026-03-04T05:06:07.890123Z",
                                "domain_id": Entry.domain_id, "model": "llama3.2:3b", "backend": "ollama",
                                "route": "chat/completions", "stream": True, "status": 200,
                                "request_sha256": hashlib.sha256(REQUEST).hexdigest(),
                                "response_sha256": hashlib.sha256(RESPONSE).hexdigest()}
    assert result.to_json()["key_id"] == signer.identity.key_id == document["signing_key"]["key_id"]
    assert result.signature is not None and result.signature.verdict is not None and result.signature.verdict.ok


@pytest.mark.parametrize("which", ["request", "response"])
def test_a_one_byte_change_of_the_request_or_response_fails(document: dict[str, Any], sim_policy: Policy,
                                                            which: str) -> None:
    data = REQUEST if which == "request" else RESPONSE
    for at in (0, len(data) // 2, len(data) - 1):
        changed = _flip(data, at)
        result = (_verify(document, sim_policy, request=changed) if which == "request"
                  else _verify(document, sim_policy, response=changed))
        assert not result.ok
        assert [c.name for c in result.checks if not c.ok] == [f"{which}_sha256"]
    dropped = _verify(document, sim_policy, response=RESPONSE[:-1])   # a stream whose last byte is missing
    assert not dropped.ok and dropped.error.startswith("response_sha256")


def _changed_value(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    return ("0" if value[0] != "0" else "1") + value[1:]   # still well formed (a time stays a time)


@pytest.mark.parametrize("name", [n for n in STATEMENT_FIELDS if n != "v"])
def test_a_change_of_any_statement_field_fails(document: dict[str, Any], sim_policy: Policy, name: str) -> None:
    doc = json.loads(json.dumps(document))
    doc["statement"][name] = _changed_value(doc["statement"][name])
    result = _verify(doc, sim_policy)
    assert not result.ok
    failed = [c.name for c in result.checks if not c.ok]
    assert "signature_and_evidence" in failed
    assert "does not verify" in next(c.detail for c in result.checks if c.name == "signature_and_evidence")


def test_another_statement_version_is_refused_as_malformed(document: dict[str, Any]) -> None:
    doc = json.loads(json.dumps(document))
    doc["statement"]["v"] = 2
    with pytest.raises(ReceiptError, match="statement.v"):
        parse_receipt(json.dumps(doc))


def test_a_one_byte_change_of_the_signature_fails(document: dict[str, Any], sim_policy: Policy) -> None:
    signature = base64.b64decode(document["signature"])
    for at in range(0, len(signature), 7):
        result = _verify(_with_blob(document, ("signature",), lambda s: _flip(s, at)), sim_policy)
        assert not result.ok and result.error.startswith("signature_and_evidence"), at


def test_a_one_byte_change_of_the_public_key_fails(document: dict[str, Any], sim_policy: Policy) -> None:
    spki = base64.b64decode(document["signing_key"]["public_key"])
    for at in (0, len(spki) // 2, len(spki) - 1):
        doc = _with_blob(document, ("signing_key", "public_key"), lambda k: _flip(k, at))
        result = _verify(doc, sim_policy)
        assert not result.ok
        assert {c.name for c in result.checks if not c.ok} >= {"key_id", "signature_and_evidence"}


def test_another_key_with_its_own_evidence_fails(document: dict[str, Any], sim_policy: Policy, sim_dir: Path) -> None:
    """The host swaps in a key it controls, with genuine evidence for *that* key: the signature is not its."""
    other = AttestedSigner(SimProvider(sim_dir)).identity
    doc = json.loads(json.dumps(document))
    doc["signing_key"] = {"key_id": other.key_id, "public_key": base64.b64encode(other.public_key_der).decode(),
                          "evidence": base64.b64encode(other.evidence_cbor).decode()}
    result = _verify(doc, sim_policy)
    assert not result.ok and "does not verify" in result.error


def test_evidence_of_another_key_fails(document: dict[str, Any], sim_policy: Policy, sim_dir: Path) -> None:
    """The right key and signature, but evidence made for another key: the evidence does not bind this one."""
    other = AttestedSigner(SimProvider(sim_dir)).identity
    doc = json.loads(json.dumps(document))
    doc["signing_key"]["evidence"] = base64.b64encode(other.evidence_cbor).decode()
    result = _verify(doc, sim_policy)
    assert not result.ok and result.error.startswith("signature_and_evidence: evidence of the signing key")


def test_a_one_byte_change_of_the_evidence_fails(document: dict[str, Any], sim_policy: Policy) -> None:
    evidence = base64.b64decode(document["signing_key"]["evidence"])
    for at in (0, 40, len(evidence) // 3, len(evidence) // 2, len(evidence) - 1):
        result = _verify(_with_blob(document, ("signing_key", "evidence"), lambda e: _flip(e, at)), sim_policy)
        assert not result.ok and result.error.startswith("signature_and_evidence: evidence"), at


def test_a_key_whose_evidence_fails_the_policy_fails(document: dict[str, Any]) -> None:
    other_root = policy_from_yaml(sim_policy_yaml("ab" * 32))
    result = _verify(document, other_root)
    assert not result.ok and result.error.startswith("signature_and_evidence: evidence of the signing key refused")
    assert result.signature is not None and result.signature.verdict is not None
    assert not result.signature.verdict.ok


def test_an_unmeasured_policy_is_refused(document: dict[str, Any], sim_platform) -> None:
    yaml_text = "\n".join(line for line in sim_policy_yaml(sim_platform.fingerprint).splitlines()
                          if not line.startswith("allow_unmeasured"))
    result = _verify(document, policy_from_yaml(yaml_text))
    assert not result.ok and [c.name for c in result.checks if not c.ok] == ["policy_measured"]


def test_a_signature_made_for_another_purpose_fails(signer: AttestedSigner, sim_policy: Policy) -> None:
    statement = statement_of(Entry())
    forged = Receipt(statement=statement, signature=signer.sign("cube-ai/audit-checkpoint/v1", canonical_json(statement)),
                     key_id=signer.identity.key_id, public_key_der=signer.identity.public_key_der,
                     evidence_cbor=signer.identity.evidence_cbor)
    assert not verify_receipt(forged, request=REQUEST, response=RESPONSE, policy=sim_policy).ok
    genuine = replace(forged, signature=signer.sign(RECEIPT_PURPOSE, canonical_json(statement)))
    assert verify_receipt(genuine, request=REQUEST, response=RESPONSE, policy=sim_policy).ok


def test_missing_bytes_never_pass(document: dict[str, Any], sim_policy: Policy) -> None:
    receipt = parse_receipt(json.dumps(document))
    result = verify_receipt(receipt, request=None, response=RESPONSE, policy=sim_policy)
    assert not result.ok and result.error.startswith("request_sha256: not given")


def _mutations(doc: dict[str, Any]) -> dict[str, str]:
    """Malformed receipts, each as its JSON text."""
    def edited(change) -> str:
        copy = json.loads(json.dumps(doc))
        change(copy)
        return json.dumps(copy)

    text = json.dumps(doc)
    signature = doc["signature"]
    return {
        "not json": text[:-1],
        "not an object": json.dumps([doc]),
        "missing field": edited(lambda d: d.pop("signature")),
        "extra field": edited(lambda d: d.update(note="x")),
        "extra statement field": edited(lambda d: d["statement"].update(user="x")),
        "missing statement field": edited(lambda d: d["statement"].pop("model")),
        "wrong object": edited(lambda d: d.update(object="receipts")),
        "stream as text": edited(lambda d: d["statement"].update(stream="true")),
        "status as bool": edited(lambda d: d["statement"].update(status=True)),
        "uppercase hash": edited(lambda d: d["statement"].update(request_sha256=d["statement"]["request_sha256"].upper())),
        "time without microseconds": edited(lambda d: d["statement"].update(time="2026-03-04T05:06:07Z")),
        "time not UTC": edited(lambda d: d["statement"].update(time="2026-03-04T05:06:07.890123+01:00")),
        "impossible date": edited(lambda d: d["statement"].update(time="2026-02-30T05:06:07.890123Z")),
        "empty model": edited(lambda d: d["statement"].update(model="")),
        # a lone surrogate has no UTF-8 form: verify_receipt raised UnicodeEncodeError (a traceback, not exit 2)
        "lone surrogate": text.replace('"model": "llama3.2:3b"', '"model": "\\ud800"'),
        "duplicate field": text[:-1] + ', "object": "receipt"}',
        "base64 with a newline": edited(lambda d: d.update(signature=signature[:8] + "\n" + signature[8:])),
        "non-canonical base64": edited(lambda d: d.update(signature="AB==")),   # decodes like "AA=="
        "bad key id": edited(lambda d: d["signing_key"].update(key_id="xyz")),
        "NaN": text.replace('"status": 200', '"status": NaN'),
        "too large": json.dumps({**doc, "pad": "x" * (1024 * 1024)}),
    }


def test_malformed_receipts_are_refused_with_a_typed_error(document: dict[str, Any]) -> None:
    for name, text in _mutations(document).items():
        with pytest.raises(ReceiptError):
            parse_receipt(text)
            pytest.fail(f"accepted: {name}")
    with pytest.raises(ReceiptError):
        parse_receipt({"object": "receipt"})


def test_a_malformed_receipt_is_exit_2_never_a_traceback(capsys, files: dict[str, Path]) -> None:
    files["receipt"].write_text(files["receipt"].read_text().replace('"model": "llama3.2:3b"', '"model": "\\udfff"'))
    code, doc = _cli(capsys, files)
    assert code == 2 and "statement.model" in doc["error"]


def test_evidence_made_for_a_tls_key_never_passes_for_a_signing_key(document: dict[str, Any], sim_policy: Policy,
                                                                    signer: AttestedSigner, sim_dir: Path) -> None:
    """Genuine evidence binding the same public key under the attested TLS label (what a TLS handshake shows):
    refused as it is, and refused when relabelled as a signing key's (report_data differs by the label)."""
    from attestation.atls.binding import ATLS_SCHEME, report_data_for
    from attestation.evidence import encode_cmw
    from attestation.signing import SIGNING_SCHEME

    nonce = bytes(range(32))
    tls = SimProvider(sim_dir).get_evidence(report_data_for(signer.identity.public_key_der, nonce))
    for scheme, refusal in ((ATLS_SCHEME, "binding scheme"), (SIGNING_SCHEME, "report_data")):
        evidence = replace(tls, binding={"scheme": scheme, "nonce": nonce})
        doc = json.loads(json.dumps(document))
        doc["signing_key"]["evidence"] = base64.b64encode(encode_cmw(evidence)).decode()
        result = _verify(doc, sim_policy)
        assert not result.ok and result.error.startswith("signature_and_evidence") and refusal in result.error


def test_receipt_path() -> None:
    assert receipt_path("dom", "0f" * 16) == "/proxy/dom/v1/receipts/" + "0f" * 16


# ---- cube-attest verify-receipt ------------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path: Path, document: dict[str, Any], sim_platform) -> dict[str, Path]:
    paths = {"receipt": tmp_path / "receipt.json", "request": tmp_path / "request.json",
             "response": tmp_path / "response.txt", "policy": tmp_path / "policy.yaml"}
    paths["receipt"].write_text(json.dumps(document))
    paths["request"].write_bytes(REQUEST)
    paths["response"].write_bytes(RESPONSE)
    paths["policy"].write_text(sim_policy_yaml(sim_platform.fingerprint))
    return paths


def _cli(capsys, files: dict[str, Path], *extra: str) -> tuple[int, dict[str, Any]]:
    code = main(["verify-receipt", str(files["receipt"]), "--request", str(files["request"]), "--response",
                 str(files["response"]), "--policy", str(files["policy"]), "--json", *extra])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    doc = json.loads(lines[0])
    assert set(doc) == {"ok", "error", "checks", "statement", "key_id", "verdict"}
    return code, doc


def test_cli_accepts_a_good_receipt(capsys, files: dict[str, Path]) -> None:
    code, doc = _cli(capsys, files)
    assert code == 0 and doc["ok"] and doc["error"] is None and doc["verdict"]["ok"]
    assert doc["statement"]["request_id"] == "0f" * 16
    assert main(["verify-receipt", str(files["receipt"]), "--request", str(files["request"]), "--response",
                 str(files["response"]), "--policy", str(files["policy"])]) == 0
    assert "RECEIPT HOLDS" in capsys.readouterr().out


def test_cli_refuses_changed_bytes_with_exit_1(capsys, files: dict[str, Path]) -> None:
    files["response"].write_bytes(_flip(RESPONSE, 10))
    code, doc = _cli(capsys, files)
    assert code == 1 and not doc["ok"] and doc["error"].startswith("response_sha256")
    assert main(["verify-receipt", str(files["receipt"]), "--request", str(files["request"]), "--response",
                 str(files["response"]), "--policy", str(files["policy"])]) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "response_sha256" in out


def test_cli_refuses_another_policy_with_exit_1(capsys, files: dict[str, Path]) -> None:
    files["policy"].write_text(sim_policy_yaml("cd" * 32))
    code, doc = _cli(capsys, files)
    assert code == 1 and doc["error"].startswith("signature_and_evidence")


def test_cli_input_errors_exit_2(capsys, files: dict[str, Path], tmp_path: Path) -> None:
    files["receipt"].write_text('{"object": "receipt"}')
    code, doc = _cli(capsys, files)
    assert code == 2 and not doc["ok"] and doc["checks"][0]["name"] == "input" and "receipt" in doc["error"]
    code, doc = _cli(capsys, {**files, "request": tmp_path / "absent"})
    assert code == 2 and "cannot read" in doc["error"]
    files["policy"].write_text("platforms: [nope]\n")
    code, doc = _cli(capsys, files)
    assert code == 2
    # --policy is required: a receipt means nothing without saying which enclave is trusted
    assert main(["verify-receipt", str(files["receipt"]), "--request", str(files["request"]), "--response",
                 str(files["response"])]) == 2


def test_the_statement_time_is_utc_with_microseconds() -> None:
    from datetime import timedelta

    later = Entry(created_at=datetime(2026, 3, 4, 6, 6, 7, 5, tzinfo=timezone(timedelta(hours=1))))
    assert statement_of(later)["time"] == "2026-03-04T05:06:07.000005Z"
    naive = Entry(created_at=datetime(2026, 3, 4, 5, 6, 7))   # as SQLite returns the store's UTC times
    assert statement_of(naive)["time"] == "2026-03-04T05:06:07.000000Z"
    with pytest.raises(ValueError, match="no receipt"):
        statement_of(Entry(response_sha256=None))
