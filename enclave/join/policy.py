"""The join policy a replica appraises its peers with: from the configuration, else "a peer exactly like me".

``join.policy`` (inline, covered by the configuration's digest in HOST_DATA / MRCONFIGID) or ``join.policy_file``
(a path that must lie inside the measured image: a file on a disk the host writes would let the host choose
who receives the secrets). Neither: :func:`attestation.peer.same_as_me_policy` over this replica's own evidence.
Outside simulation an explicit policy must pin the whole boot chain (``require_measured_policy``) and must not
accept the simulated platform, whose root key is a file.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

from attestation.atls.client import require_measured_policy
from attestation.errors import AttestationError
from attestation.evidence import Evidence
from attestation.peer import same_as_me_policy
from attestation.policy import Policy, load_policy, policy_from_dict

from .protocol import JoinError

if TYPE_CHECKING:
    from enclave.config import Settings

log = logging.getLogger("enclave.join")


def _own_config_sha256(own: Evidence) -> bytes:
    """SHA-256 of this replica's configuration, as its launch carries it (the config binding checked it)."""
    if own.platform in ("snp", "sim"):
        from attestation.snp.report import parse_report

        return parse_report(own.report).host_data
    if own.platform == "tdx":
        from attestation.tdx.quote import parse_quote

        return parse_quote(own.report).body.mrconfigid[:32]
    raise JoinError(f"join policy: unknown platform {own.platform!r} of this replica's evidence")


def same_configuration(policy: Policy, own: Evidence) -> Policy:
    """``policy`` with the configuration pinned to this replica's own where it leaves it open.

    A measurement pins the code, not the configuration file the host hands it (HOST_DATA / MRCONFIGID only
    say which one it was). A join policy that leaves them open would hand the secrets to a genuine image run
    with a configuration of the host's (its own database and operator key: it would mint PATs and rows with
    valid MACs under the real keys), or take secrets from one. An inline policy cannot name the digest of the
    file it is in, so the peer must show this replica's configuration (SNP HOST_DATA = SHA-256(config); TDX
    MRCONFIGID = SHA-256(config) || 16 zero bytes), unless the policy pins a value itself.
    """
    config = _own_config_sha256(own)
    if not any(config):
        raise JoinError("join policy: this replica's launch carries no configuration digest")
    if policy.snp.host_data is None:
        policy = policy.model_copy(update={"snp": policy.snp.model_copy(update={"host_data": config.hex()})})
    if policy.tdx.mrconfigid is None:
        mrconfigid = (config + bytes(16)).hex()
        policy = policy.model_copy(update={"tdx": policy.tdx.model_copy(update={"mrconfigid": mrconfigid})})
    return policy


def join_policy(settings: "Settings", own: Evidence, *, sim_root_fingerprint: str | None = None) -> Policy:
    """The policy peers are appraised with, both ways (as joiner and as the replica handing out secrets)."""
    join = settings.join
    try:
        if join.policy is not None:
            policy = policy_from_dict(join.policy)
            log.info("join policy: inline in the configuration (%r)", policy.name)
        elif join.policy_file is not None:
            if not settings.simulate and join.policy_file.resolve().is_relative_to(settings.data_dir.resolve()):
                raise JoinError(f"join.policy_file {join.policy_file} lies in data_dir, on the host's disk: the "
                                "host would choose who receives the secrets; use a file inside the image or "
                                "join.policy inline")
            policy = load_policy(join.policy_file)
            digest = hashlib.sha256(join.policy_file.read_bytes()).hexdigest()
            log.info("join policy: %s (sha256 %s, %r)", join.policy_file, digest, policy.name)
        else:
            policy = same_as_me_policy(own, sim_root_fingerprint=sim_root_fingerprint)
            log.info("join policy: peers must show this replica's own platform, measurement and configuration")
            return policy
        if not settings.simulate:
            if "sim" in policy.platforms:
                raise JoinError("join policy: the simulated platform is for development (--simulate) only")
            require_measured_policy(policy)
            policy = same_configuration(policy, own)
    except (AttestationError, OSError) as exc:
        raise JoinError(f"join policy: {exc}") from None
    return policy
