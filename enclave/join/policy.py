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
    except (AttestationError, OSError) as exc:
        raise JoinError(f"join policy: {exc}") from None
    return policy
