"""The join protocol at unit level: what the replica handing out the secrets accepts and refuses, and the
encryption of the answer (no processes; the real exchange over attested TLS is in test_join.py)."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from attestation.peer import join_report_data, same_as_me_policy
from attestation.providers import SimProvider
from enclave.join.protocol import (
    Challenge,
    JoinError,
    MessageError,
    SecretsAnswer,
    SecretsRequest,
    open_from_server,
    raw_public_key,
    seal_for_joiner,
)
from enclave.join.server import JoinService, NonceStore
from enclave.platform_secrets import PlatformSecrets
from enclave.tls import TlsManager

from .conftest import sim_provider

ROOT = PlatformSecrets(b"r" * 32)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def tls() -> TlsManager:
    manager = TlsManager(sim_provider(), hostnames=["127.0.0.1"], rotate_every=None)
    manager.start()
    return manager


@pytest.fixture
def handed_out() -> list[int]:
    return []


@pytest.fixture
def service(tls: TlsManager, handed_out: list[int]) -> JoinService:
    provider = sim_provider()
    policy = same_as_me_policy(tls.current.evidence, sim_root_fingerprint=provider.fingerprint)

    def source() -> PlatformSecrets:
        handed_out.append(1)
        return ROOT

    return JoinService(source, policy, nonces=NonceStore(clock=Clock()))


def _spki(tls: TlsManager) -> bytes:
    return bytes.fromhex(tls.current.spki_sha256)


def _request(provider, spki: bytes, nonce: bytes, private: X25519PrivateKey | None = None,
             *, bind_spki: bytes | None = None, bind_key: bytes | None = None) -> tuple[SecretsRequest, X25519PrivateKey]:
    private = private or X25519PrivateKey.generate()
    public = raw_public_key(private)
    evidence = provider.get_evidence(join_report_data(bind_spki or spki, nonce, bind_key or public))
    return SecretsRequest(nonce, public, evidence), private


def test_a_joiner_like_me_gets_the_secrets_only_it_can_open(service, tls, handed_out):
    spki = _spki(tls)
    nonce = service.nonces.issue(spki)
    request, private = _request(sim_provider(), spki, nonce)
    outcome, answer = service.answer(SecretsRequest.parse(request.to_bytes()), tls.current)
    assert outcome == "accepted" and isinstance(answer, SecretsAnswer) and handed_out == [1]
    wire = SecretsAnswer.parse(json.dumps(answer.to_json()).encode())
    opened = open_from_server(wire.sealed, private=private, server_key=wire.public_key, server_spki_sha256=spki,
                              nonce=nonce)
    assert PlatformSecrets.from_bytes(opened).root == ROOT.root
    assert ROOT.root not in wire.sealed and ROOT.root not in json.dumps(answer.to_json()).encode()
    with pytest.raises(JoinError, match="not sealed for this exchange"):   # another key cannot open it
        open_from_server(wire.sealed, private=X25519PrivateKey.generate(), server_key=wire.public_key,
                         server_spki_sha256=spki, nonce=nonce)
    for changed in ({"server_spki_sha256": b"\x00" * 32}, {"nonce": b"\x00" * 32}):   # the transcript is bound
        args = {"server_spki_sha256": spki, "nonce": nonce, **changed}
        with pytest.raises(JoinError):
            open_from_server(wire.sealed, private=private, server_key=wire.public_key, **args)
    tampered = bytearray(wire.sealed)
    tampered[0] ^= 1
    with pytest.raises(JoinError):
        open_from_server(bytes(tampered), private=private, server_key=wire.public_key, server_spki_sha256=spki,
                         nonce=nonce)


def test_a_replayed_request_is_refused(service, tls, handed_out):
    spki = _spki(tls)
    nonce = service.nonces.issue(spki)
    request, _ = _request(sim_provider(), spki, nonce)
    assert service.answer(request, tls.current)[0] == "accepted"
    outcome, why = service.answer(request, tls.current)               # the very same request again
    assert outcome == "nonce" and "used already" in why and handed_out == [1]
    stale, _ = _request(sim_provider(), spki, b"\x07" * 32)         # a nonce this replica never issued
    assert service.answer(stale, tls.current)[0] == "nonce"


def test_an_expired_nonce_and_a_nonce_of_another_key_are_refused(service, tls, handed_out):
    spki = _spki(tls)
    clock = service.nonces._clock
    late = service.nonces.issue(spki)
    clock.now += 61
    assert service.answer(_request(sim_provider(), spki, late)[0], tls.current) == ("nonce", "the nonce expired")
    other = service.nonces.issue(b"\x09" * 32)                       # issued on another TLS key of this replica
    outcome, why = service.answer(_request(sim_provider(), spki, other)[0], tls.current)
    assert outcome == "nonce" and "another TLS key" in why and handed_out == []


def test_evidence_bound_to_another_channel_or_key_is_refused(service, tls, handed_out):
    """A man in the middle relaying a genuine joiner's evidence: made for another replica's key, or offering
    the relay's own X25519 key in place of the joiner's. Both break the report_data binding."""
    spki = _spki(tls)
    nonce = service.nonces.issue(spki)
    other_replica, _ = _request(sim_provider(), spki, nonce, bind_spki=b"\x05" * 32)
    outcome, why = service.answer(other_replica, tls.current)
    assert outcome == "binding" and "REPORT_DATA" in why
    nonce = service.nonces.issue(spki)
    genuine, _ = _request(sim_provider(), spki, nonce)
    swapped = SecretsRequest(nonce, raw_public_key(X25519PrivateKey.generate()), genuine.evidence)
    assert service.answer(swapped, tls.current)[0] == "binding"
    assert handed_out == []


def test_a_replica_with_another_measurement_learns_nothing(service, tls, handed_out, monkeypatch):
    monkeypatch.setenv("CUBE_SIM_MEASUREMENT", hashlib.sha384(b"another image").hexdigest())
    other = SimProvider(sim_provider().sim.directory)               # same simulated platform, another image
    spki = _spki(tls)
    nonce = service.nonces.issue(spki)
    outcome, why = service.answer(_request(other, spki, nonce)[0], tls.current)
    assert outcome == "policy" and "measurement" in why
    assert handed_out == []                                          # the secrets were never even read


def test_the_sim_measurement_env_is_checked(monkeypatch):
    monkeypatch.setenv("CUBE_SIM_MEASUREMENT", "abcd")
    from attestation.errors import ProviderError

    with pytest.raises(ProviderError, match="96 hex"):
        SimProvider(sim_provider().sim.directory)


def test_nonce_store_is_bounded():
    store = NonceStore(limit=2)
    first = store.issue(b"\x01" * 32)
    store.issue(b"\x01" * 32)
    store.issue(b"\x01" * 32)
    assert store.redeem(first, b"\x01" * 32) is not None             # the oldest was dropped


@pytest.mark.parametrize("body", [
    b"", b"[]", b"not json", b'{"v": 1}', b"[" * 200_000, b'{"v": ' + b"[" * 200_000,
    b'{"v": 2, "nonce": "' + b"00" * 32 + b'", "public_key": "' + b"00" * 32 + b'", "evidence": "AA=="}',
    b'{"v": 1, "nonce": "zz", "public_key": "' + b"00" * 32 + b'", "evidence": "AA=="}',
    b'{"v": 1, "nonce": "' + b"00" * 32 + b'", "public_key": "' + b"00" * 32 + b'", "evidence": "!!"}',
    b'{"v": 1, "nonce": "' + b"00" * 32 + b'", "public_key": "' + b"00" * 32 + b'", "evidence": "AAAA"}',
    b'{"v": 1, "nonce": "' + b"00" * 32 + b'", "public_key": "' + b"00" * 32 + b'", "evidence": "AA==", "x": 1}',
])
def test_malformed_requests_are_refused(body):
    with pytest.raises(MessageError):
        SecretsRequest.parse(body)


def test_a_low_order_joiner_key_gives_no_answer():
    with pytest.raises(MessageError, match="X25519"):
        seal_for_joiner(b"x", server_spki_sha256=b"\x01" * 32, nonce=b"\x02" * 32, joiner_key=bytes(32))


def test_challenge_round_trips():
    c = Challenge(b"\x01" * 32, b"\x02" * 32)
    assert Challenge.parse(json.dumps(c.to_json()).encode()) == c



_FIELD = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=80), st.binary(max_size=40).map(bytes.hex),
                   st.lists(st.integers(), max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=400),
                 st.dictionaries(st.sampled_from(["v", "nonce", "public_key", "evidence", "sealed",
                                                  "server_spki_sha256", "expires_in", "x"]), _FIELD,
                                 max_size=6).map(lambda d: json.dumps(d).encode())))
def test_message_parsers_refuse_anything_malformed_with_message_error(body: bytes):
    for parse in (SecretsRequest.parse, SecretsAnswer.parse, Challenge.parse):
        try:
            parse(body)
        except MessageError:
            pass


def test_a_verifier_that_ignored_the_binding_would_still_be_caught(tls, handed_out):
    """Defence in depth: even if the verifier passed evidence without checking report_data, the service compares
    the appraised report_data with this exchange's binding itself."""
    from attestation.verifier import verify_evidence

    provider = sim_provider()
    policy = same_as_me_policy(tls.current.evidence, sim_root_fingerprint=provider.fingerprint)

    def lax(evidence, *, policy, expected_report_data=None, **kw):   # drops the caller's expectation
        return verify_evidence(evidence, policy=policy, **kw)

    service = JoinService(lambda: handed_out.append(1) or ROOT, policy, verify=lax)
    spki = _spki(tls)
    nonce = service.nonces.issue(spki)
    relayed, _ = _request(provider, spki, nonce, bind_spki=b"\x05" * 32)
    assert service.answer(relayed, tls.current) == ("binding", "the appraised report_data is not this exchange's "
                                                               "binding")
    assert handed_out == []


def test_one_nonce_sent_many_times_at_once_gives_the_secrets_once(service, tls, handed_out):
    """A host racing copies of one genuine request (same nonce) at the replica: the nonce is taken out under a
    lock, so exactly one copy is answered and the others are refused as used."""
    import threading

    spki = _spki(tls)
    nonce = service.nonces.issue(spki)
    request, _ = _request(sim_provider(), spki, nonce)
    start = threading.Barrier(8)
    outcomes: list[str] = []

    def send() -> None:
        start.wait()
        outcomes.append(service.answer(request, tls.current)[0])

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["accepted"] + ["nonce"] * 7 and handed_out == [1]


def test_a_nonce_of_one_replica_is_refused_at_another(service, tls, handed_out):
    """Replicas share the secrets, not their nonces: a nonce replica A issued (and evidence for it) is worth
    nothing at replica B, even on the very TLS key A issued it on."""
    policy = service.policy
    other = JoinService(lambda: ROOT, policy, nonces=NonceStore(clock=Clock()))
    spki = _spki(tls)
    nonce = service.nonces.issue(spki)
    request, _ = _request(sim_provider(), spki, nonce)
    outcome, why = other.answer(request, tls.current)
    assert outcome == "nonce" and "not issued by this replica" in why
    assert service.answer(request, tls.current)[0] == "accepted"   # still good where it was issued
