"""Helpers for host agent tests: configs in tmp_path, vectors wrapped as Evidence."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attestation.evidence import Evidence
from host.config import HostConfig, config_from_dict

TCB_ORDER_MILAN = ("bl", "tee", "snp", "ucode")


def host_config(tmp_path: Path, **sections: Any) -> HostConfig:
    data: dict[str, Any] = {
        "data_dir": str(tmp_path / "agent"),
        "policies": {"default": "builtin:default"},
        "verify": {"allow_time_override": True, "fetch_collateral": False},
        "collateral": {"enabled": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return config_from_dict(data, tmp_path)


def pem_or_der_certs(blob: bytes) -> list[bytes]:
    with warnings.catch_warnings():  # one vector VCEK has a non-positive serial (cryptography warns)
        warnings.simplefilter("ignore")
        return _certs(blob)


def _certs(blob: bytes) -> list[bytes]:
    if b"-----BEGIN" in blob:
        return [c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(blob)]
    return [x509.load_der_x509_certificate(blob).public_bytes(serialization.Encoding.DER)]


def snp_report_bytes(vectors: Path, entry: dict) -> bytes:
    raw = (vectors / entry["report"]).read_bytes()
    if entry["report"].endswith(".hex"):
        return bytes.fromhex(raw.decode().strip())
    return raw


def snp_evidence(vectors: Path, entry: dict, *, with_certs: bool = True) -> Evidence:
    certs: list[bytes] = []
    if with_certs:
        certs = pem_or_der_certs((vectors / entry["vek"]).read_bytes()) + \
            pem_or_der_certs((vectors / entry["ask_ark"]).read_bytes())
    return Evidence(platform="snp", report=snp_report_bytes(vectors, entry), certificates=tuple(certs),
                    product="Milan")


def collateral_files(directory: Path, fmspc: str) -> dict[str, bytes]:
    files = {}
    for path in directory.iterdir():
        name = path.name
        if name.startswith("tcb_info_") and not name.startswith(f"tcb_info_{fmspc}"):
            continue
        files[name] = path.read_bytes()
    return files


def tdx_evidence(vectors: Path, entry: dict, *, with_collateral: bool = True) -> Evidence:
    collateral = {}
    evaluation = entry.get("tcb_evaluation")
    if with_collateral and evaluation:
        collateral = collateral_files(vectors / evaluation["collateral"], entry["fmspc"])
    return Evidence(platform="tdx", report=(vectors / entry["quote"]).read_bytes(), collateral=collateral)


@pytest.fixture
def tmp_config(tmp_path: Path):
    def make(**sections: Any) -> HostConfig:
        return host_config(tmp_path, **sections)
    return make
