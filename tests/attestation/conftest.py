"""Fixtures for the attestation tests: one simulated platform per test session (RSA-4096 keys are slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from attestation.policy import Policy, policy_from_yaml, sim_policy_yaml
from attestation.sim import SimPlatform


@pytest.fixture(scope="session")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sim-root") / "sim"
    SimPlatform.load_or_create(directory)
    return directory


@pytest.fixture(scope="session")
def sim_platform(sim_dir: Path) -> SimPlatform:
    return SimPlatform.load_or_create(sim_dir)


@pytest.fixture(scope="session")
def sim_policy(sim_platform: SimPlatform) -> Policy:
    return policy_from_yaml(sim_policy_yaml(sim_platform.fingerprint))


def _report_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix == ".hex":
        return bytes.fromhex("".join(raw.decode().split()))
    return raw


@pytest.fixture(scope="session")
def snp_vector(vectors_dir: Path, expected: dict):
    """snp_vector("go-sev-guest--attestation.bin") -> (Evidence, expected entry, time inside validity)."""
    from attestation.evidence import Evidence
    from attestation.snp.certs import cert_der, load_certificates

    from ..conftest import inside_validity

    def make(report_name: str):
        entry = next(e for e in expected["snp"] if e["report"].endswith(report_name))
        certs = [cert_der(c) for c in load_certificates((vectors_dir / entry["vek"]).read_bytes())]
        certs += [cert_der(c) for c in load_certificates((vectors_dir / entry["ask_ark"]).read_bytes())]
        evidence = Evidence(platform="snp", report=_report_bytes(vectors_dir / entry["report"]),
                            certificates=tuple(certs))
        return evidence, entry, inside_validity(entry["vek_not_before"])

    return make


@pytest.fixture(scope="session")
def tdx_vector(vectors_dir: Path, expected: dict):
    """tdx_vector("trustee--tdx_quote_4.dat", collateral="pcs-2026-02"|None) -> (Evidence, entry, time)."""
    from attestation.evidence import Evidence
    from attestation.tdx.collateral import collateral_to_files, load_collateral_dir
    from attestation.tdx.quote import parse_quote

    from ..conftest import inside_validity, parse_when

    def make(quote_name: str, collateral: str | None = None):
        entry = next(e for e in expected["tdx"] if e["quote"].endswith(quote_name))
        raw = (vectors_dir / entry["quote"]).read_bytes()
        files = {}
        at = inside_validity(entry["pck_not_before"])
        if collateral:
            fmspc = parse_quote(raw).pck_extension.fmspc.hex()
            files = collateral_to_files(load_collateral_dir(vectors_dir / "tdx" / "collateral" / collateral, fmspc=fmspc))
            if entry.get("tcb_evaluation", {}).get("collateral", "").endswith(collateral):
                at = parse_when(entry["tcb_evaluation"]["at"])
        return Evidence(platform="tdx", report=raw, collateral=files), entry, at

    return make
