"""The verifier's content-keyed cache of parsed TDX collateral: reuse only for byte-identical bundles."""

from __future__ import annotations

import dataclasses

import pytest

import attestation.tdx.collateral as collateral_mod
from attestation import verifier
from attestation.errors import AttestationError
from attestation.evidence import Evidence
from attestation.verifier import cached_collateral, clear_collateral_cache, collateral_cache_key, verify_evidence

V5 = "go-tdx-guest--quote_v5_sample.dat"


@pytest.fixture(autouse=True)
def empty_cache():
    clear_collateral_cache()
    yield
    clear_collateral_cache()


@pytest.fixture()
def parses(monkeypatch) -> list[dict[str, bytes]]:
    """Every bundle that reaches the real parser (the verifier imports it on each call)."""
    seen: list[dict[str, bytes]] = []
    real = collateral_mod.collateral_from_files

    def counting(files, fmspc=None):
        seen.append(dict(files))
        return real(files, fmspc)

    monkeypatch.setattr(collateral_mod, "collateral_from_files", counting)
    return seen


@pytest.fixture()
def v5_evidence(tdx_vector):
    evidence, _, at = tdx_vector(V5, collateral="pcs-2026-02")
    return evidence, at


def test_repeated_verification_parses_the_bundle_once(v5_evidence, parses):
    evidence, at = v5_evidence
    first = verify_evidence(evidence, at=at)
    again = verify_evidence(Evidence("tdx", evidence.report, collateral=dict(evidence.collateral)), at=at)
    assert first.ok and again.ok, (first.error, again.error)
    assert (first.status, first.claims) == (again.status, again.claims)
    assert len(parses) == 1


def _one_byte_changes(data: bytes):
    for at in sorted({0, 1, len(data) // 2, len(data) - 1}):
        yield at, data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def test_a_one_byte_change_to_any_file_is_never_served_from_the_cache(v5_evidence, parses):
    evidence, _ = v5_evidence
    files = dict(evidence.collateral)
    original = cached_collateral(files)
    assert cached_collateral(dict(files)) is original and len(parses) == 1
    tried = 0
    for name in sorted(files):
        for at, changed in _one_byte_changes(files[name]):
            mutated = {**files, name: changed}
            before = len(parses)
            try:
                result = cached_collateral(mutated)
            except AttestationError:
                result = None  # refused by the parser: certainly not the cached original
            assert len(parses) == before + 1, f"{name}[{at}] was served from the cache"
            if result is not None:
                assert result is not original
                assert dict(result.files)[name] == changed  # parsed from the changed bytes
            tried += 1
    assert tried >= 4 * len(files) - 1
    assert cached_collateral(dict(files)) is original  # the genuine bundle is still cached


def test_a_changed_signature_byte_fails_verification_after_a_cached_success(v5_evidence):
    evidence, at = v5_evidence
    assert verify_evidence(evidence, at=at).ok
    name = next(n for n in evidence.collateral if n.startswith("tcb_info_") and n.endswith(".json"))
    raw = evidence.collateral[name]
    sig = raw.rindex(b'"signature":"') + len(b'"signature":"')
    flipped = raw[:sig] + (b"1" if raw[sig:sig + 1] == b"0" else b"0") + raw[sig + 1:]
    tampered = Evidence("tdx", evidence.report, collateral={**evidence.collateral, name: flipped})
    verdict = verify_evidence(tampered, at=at)
    assert not verdict.ok and verdict.status == "invalid", verdict.status


def test_the_key_covers_names_lengths_and_every_byte():
    base = {"a": b"bc", "d": b"e"}
    key = collateral_cache_key(base)
    assert collateral_cache_key(dict(reversed(list(base.items())))) == key  # order of the mapping is irrelevant
    for other in ({"ab": b"c", "d": b"e"}, {"a": b"b", "cd": b"e"}, {"a": b"bc"}, {"a": b"bc", "d": b"e", "f": b""},
                  {"a": b"bd", "d": b"e"}, {"a": b"bc", "d": b"f"}, {"A": b"bc", "d": b"e"}):
        assert collateral_cache_key(other) != key, other


def test_cached_collateral_is_immutable(v5_evidence):
    c = cached_collateral(dict(v5_evidence[0].collateral))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.files = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c._parsed = None  # type: ignore[misc]
    assert isinstance(c.files, tuple) and all(type(d) is bytes for _, d in c.files)
    with pytest.raises(TypeError):
        c._parsed.pck_crls["platform"] = None  # type: ignore[index]
    with pytest.raises(TypeError):
        c._parsed.pck_crl_chain_files["platform"] = b""  # type: ignore[index]


def test_the_cache_is_bounded_in_entries_and_bytes(v5_evidence, parses, monkeypatch):
    files = dict(v5_evidence[0].collateral)
    size = sum(len(d) for d in files.values())
    for i in range(verifier.COLLATERAL_CACHE_ENTRIES + 5):  # an unrelated file changes the key, not the parse
        cached_collateral({**files, "note.txt": str(i).encode()})
    assert len(verifier._collateral_cache) == verifier.COLLATERAL_CACHE_ENTRIES
    cached_collateral({**files, "note.txt": b"0"})  # the oldest was evicted: parsed again
    assert len(parses) == verifier.COLLATERAL_CACHE_ENTRIES + 6
    clear_collateral_cache()
    monkeypatch.setattr(verifier, "COLLATERAL_CACHE_BYTES", 2 * size)
    for i in range(5):
        cached_collateral({**files, "note.txt": str(i).encode()})
    assert len(verifier._collateral_cache) == 2


def test_bad_bundles_are_never_cached(v5_evidence):
    files = dict(v5_evidence[0].collateral)
    broken = {**files, "qe_identity.json": files["qe_identity.json"][: len(files["qe_identity.json"]) // 2]}
    for _ in range(2):
        with pytest.raises(AttestationError):
            cached_collateral(broken)
    assert len(verifier._collateral_cache) == 0
