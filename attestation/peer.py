"""Appraising a peer enclave that asks for (or offers) the platform secrets: the join binding and the default
join policy, "a peer exactly like me".

The binding: a joining replica's evidence carries

    report_data = SHA-512(JOIN_LABEL || SHA-256(server SPKI) || server nonce || joiner X25519 public key)

(all three fixed-length, 32 bytes each, so no two inputs share an encoding).  The label keeps this report_data
apart from the attested-TLS one (``attestation.atls.binding``): evidence made for a TLS key can never pass as a
join request, nor the reverse.

The default policy (:func:`same_as_me_policy`) is derived from the replica's *own* evidence: the same platform and
root of trust, the same launch measurement, the same HOST_DATA / MRCONFIGID (the same configuration, see the
config binding), the same guest policy / TD attributes, debug always refused.  It pins what *this* replica was
launched with, so it is only as strong as that launch: an SNP measurement computed with kernel hashes covers the
kernel, initrd and command line; a firmware-only launch (no ``kernel-hashes=on``) would let any OS on the same
firmware pass, which is why production deployments should name an explicit join policy from
``cube-host measure`` (``kernel_hashes: true`` entries) in the configuration.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .errors import EvidenceError
from .evidence import SNP_CRL_FILE, Evidence
from .policy import (
    SNP_GUEST_POLICY_BITS,
    TD_ATTRIBUTE_BITS,
    Policy,
    policy_from_dict,
)

JOIN_LABEL = b"cube-ai/join/v1"
TDX_EVENT_LOG_FILE = "ccel.bin"   # the collateral name of the CC event log in TDX evidence
JOIN_PART_SIZE = 32


def join_report_data(server_spki_sha256: bytes, nonce: bytes, joiner_public_key: bytes) -> bytes:
    """The 64 bytes of report_data a joiner's evidence must carry for this server key, nonce and joiner key."""
    for name, value in (("server_spki_sha256", server_spki_sha256), ("nonce", nonce),
                        ("joiner_public_key", joiner_public_key)):
        if not isinstance(value, (bytes, bytearray)) or len(value) != JOIN_PART_SIZE:
            raise ValueError(f"{name} must be exactly {JOIN_PART_SIZE} bytes")
    return hashlib.sha512(JOIN_LABEL + bytes(server_spki_sha256) + bytes(nonce) + bytes(joiner_public_key)).digest()


def _bits_matching(value: int, names: dict[str, int]) -> dict[str, list[str]]:
    """A require/forbid rule that holds exactly when each named bit equals its value in ``value``."""
    return {"require": sorted(n for n, bit in names.items() if value >> bit & 1),
            "forbid": sorted(n for n, bit in names.items() if not value >> bit & 1)}


def _snp_section(evidence: Evidence) -> dict[str, Any]:
    from .snp.report import POLICY_DEBUG, POLICY_MIGRATE_MA, POLICY_SMT, parse_report

    report = parse_report(evidence.report)
    if report.policy & POLICY_DEBUG:
        raise EvidenceError("this replica is a debug guest: its memory is readable by the host, it must not "
                            "hold or hand out the platform secrets")
    return {
        "measurements": [{"measurement": report.measurement.hex(), "kernel_hashes": False}],
        "host_data": report.host_data.hex(),
        "vmpl": report.vmpl,
        "allow_debug": False,
        "allow_smt": bool(report.policy & POLICY_SMT),
        "allow_migrate_ma": bool(report.policy & POLICY_MIGRATE_MA),
        "guest_policy": _bits_matching(report.policy, SNP_GUEST_POLICY_BITS),
        "id_key_digests": [report.id_key_digest.hex()],
        "family_id": report.family_id.hex(),
        "image_id": report.image_id.hex(),
        "min_guest_svn": report.guest_svn,
        # our own evidence carries the AMD CRL (a KDS source is configured): so must a peer's
        "require_crl": SNP_CRL_FILE in evidence.collateral,
    }


def _tdx_section(evidence: Evidence) -> dict[str, Any]:
    from .tdx.quote import parse_quote

    body = parse_quote(evidence.report).body
    if body.debug:
        raise EvidenceError("this replica is a debug TD: its state is readable by the host, it must not hold or "
                            "hand out the platform secrets")
    attrs = body.td_attributes_int
    service_td = body.mrservicetd is not None and any(body.mrservicetd)
    return {
        "measurements": [{"mrtd": body.mrtd.hex(), "rtmr0": body.rtmr0.hex(), "rtmr1": body.rtmr1.hex(),
                          "rtmr2": body.rtmr2.hex()}],
        "mrconfigid": body.mrconfigid.hex(),
        "mrowner": body.mrowner.hex(),
        "allow_debug": False,
        "require_sept_ve_disable": bool(attrs >> TD_ATTRIBUTE_BITS["SEPT_VE_DISABLE"] & 1),
        "allow_service_td": service_td,
        "td_attributes": {"exact": body.td_attributes.hex()},
        "xfam": {"exact": body.xfam.hex()},
        # our own evidence carries Intel's collateral (a PCS source is configured): so must a peer's. The CC
        # event log some providers attach is not collateral (Intel signs none of it).
        "require_collateral": any(name != TDX_EVENT_LOG_FILE for name in evidence.collateral),
    }


def same_as_me_policy(own: Evidence, *, sim_root_fingerprint: str | None = None,
                      name: str = "join: same as this replica") -> Policy:
    """The default join policy: accept a peer whose evidence shows what ``own`` (this replica's evidence) shows.

    ``sim_root_fingerprint``: for simulated evidence, the root this replica's simulated platform uses (a peer
    must run on the same simulated platform). EvidenceError for a debug guest (it must not join or serve) or
    an unknown platform; ParseError for a report that does not parse.
    """
    data: dict[str, Any] = {"name": name, "platforms": [own.platform], "allow_unmeasured": True}
    if own.platform in ("snp", "sim"):
        data["snp"] = _snp_section(own)
        if own.platform == "sim":
            if not sim_root_fingerprint:
                raise EvidenceError("simulated evidence: the sim root fingerprint is needed to pin the peer's root")
            data["sim_root_fingerprint"] = sim_root_fingerprint
    elif own.platform == "tdx":
        data["tdx"] = _tdx_section(own)
    else:
        raise EvidenceError(f"unknown platform {own.platform!r}")
    return policy_from_dict(data)
