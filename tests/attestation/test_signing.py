"""The attested signing key: a statement verifies only with its exact bytes, purpose, key and key-binding evidence."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.atls.binding import binding_parameters, report_data_for
from attestation.evidence import encode_cmw
from attestation.policy import Policy, policy_from_yaml, sim_policy_yaml
from attestation.providers.sim import SimProvider
from attestation.sim import SimPlatform
from attestation.signing import canonical_json, signed_message, signing_report_data, verify_signed
from enclave.config import ConfigError
from enclave.signer import AttestedSigner, SignerSource

PURPOSE = "cube-ai/test/v1"


@pytest.fixture(scope="module")
def signer(sim_dir: Path) -> AttestedSigner:
    return AttestedSigner(SimProvider(sim_dir))


def _check(signer: AttestedSigner, policy: Policy, *, message: bytes = b"statement", purpose: str = PURPOSE,
           signature: bytes | None = None, key: bytes | None = None, evidence: bytes | None = None):
    return verify_signed(purpose=purpose, message=message,
                         signature=signature if signature is not None else signer.sign(PURPOSE, b"statement"),
                         public_key_der=key if key is not None else signer.identity.public_key_der,
                         evidence=evidence if evidence is not None else signer.identity.evidence_cbor, policy=policy)


def test_a_signed_statement_verifies(signer: AttestedSigner, sim_policy: Policy) -> None:
    result = _check(signer, sim_policy)
    assert result.ok, result.error
    assert result.key_id == signer.identity.key_id and result.verdict is not None and result.verdict.ok


def test_another_message_or_purpose_fails(signer: AttestedSigner, sim_policy: Policy) -> None:
    assert not _check(signer, sim_policy, message=b"statemenT").ok
    assert not _check(signer, sim_policy, purpose="cube-ai/other/v1").ok


def test_a_flipped_signature_byte_fails(signer: AttestedSigner, sim_policy: Policy) -> None:
    sig = bytearray(signer.sign(PURPOSE, b"statement"))
    sig[-1] ^= 1
    assert not _check(signer, sim_policy, signature=bytes(sig)).ok
    assert not _check(signer, sim_policy, signature=b"\x30\x00").ok


def test_a_key_the_evidence_does_not_bind_fails(signer: AttestedSigner, sim_policy: Policy, sim_dir: Path) -> None:
    """A key of the attacker's own, signing honestly, with the enclave's (real) evidence beside it."""
    own = ec.generate_private_key(ec.SECP256R1())
    spki = own.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    sig = own.sign(signed_message(PURPOSE, b"statement"), ec.ECDSA(hashes.SHA256()))
    result = _check(signer, sim_policy, signature=sig, key=spki)
    assert not result.ok and "evidence" in (result.error or "")


def test_attested_tls_evidence_is_not_signing_evidence(signer: AttestedSigner, sim_policy: Policy, sim_dir: Path) -> None:
    """Evidence binding the same key under the attested-TLS rule does not make it a signing key."""
    nonce = secrets.token_bytes(32)
    spki = signer.identity.public_key_der
    tls_evidence = dataclasses.replace(SimProvider(sim_dir).get_evidence(report_data_for(spki, nonce)),
                                       binding=binding_parameters(nonce))
    assert not _check(signer, sim_policy, evidence=encode_cmw(tls_evidence)).ok
    relabelled = dataclasses.replace(tls_evidence, binding={"scheme": "cube-ai/signing/v1", "nonce": nonce})
    assert not _check(signer, sim_policy, evidence=encode_cmw(relabelled)).ok
    assert signing_report_data(spki, nonce) != report_data_for(spki, nonce)


def test_evidence_the_policy_refuses_fails(signer: AttestedSigner, tmp_path: Path) -> None:
    other = SimPlatform.load_or_create(tmp_path / "other-sim")
    result = _check(signer, policy_from_yaml(sim_policy_yaml(other.fingerprint)))
    assert not result.ok and result.verdict is not None and not result.verdict.ok


def test_malformed_inputs_fail_without_raising(signer: AttestedSigner, sim_policy: Policy) -> None:
    assert not _check(signer, sim_policy, key=b"not a key").ok
    assert not _check(signer, sim_policy, evidence=b"\x00garbage").ok
    rsa_like = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert "P-256" in (_check(signer, sim_policy, key=rsa_like).error or "")


def test_canonical_json_is_one_byte_form() -> None:
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_signer_source_is_lazy_and_made_once() -> None:
    made: list[int] = []

    def make() -> AttestedSigner:
        made.append(1)
        raise ConfigError("no signer here")

    source = SignerSource(make)
    assert made == []
    with pytest.raises(ConfigError):
        source.get()
    with pytest.raises(ConfigError):   # a failed attempt is not cached as a signer
        source.get()
    assert len(made) == 2
