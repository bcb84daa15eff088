"""The few calls ``cube-enclave serve`` makes for joining (``--join``) and for being joined (``join.accept``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from attestation.evidence import Evidence
from attestation.policy import Policy
from attestation.providers import EvidenceProvider
from enclave.platform_secrets import PlatformSecrets

from .client import join_obtainer
from .policy import join_policy
from .protocol import JoinError
from .server import JoinService, join_body_gates, join_router

if TYPE_CHECKING:
    from fastapi import APIRouter

    from enclave.config import Settings

# report_data of the evidence a joiner reads its own launch facts from (never sent anywhere)
_OWN_REFERENCE = hashlib.sha512(b"cube-ai/join/v1/own-reference").digest()


def _sim_root(provider: EvidenceProvider) -> str | None:
    return getattr(provider, "fingerprint", None) if provider.platform == "sim" else None


def check_peer_urls(peers: Sequence[str]) -> list[str]:
    """``--join`` values: https:// URLs (the peer is reached over attested TLS only)."""
    import httpx

    for url in peers:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            parsed = None
        if parsed is None or parsed.scheme != "https" or not parsed.host:
            raise JoinError(f"--join {url!r}: expected https://HOST[:PORT] of a running replica")
    return list(peers)


def peer_policy(settings: "Settings", provider: EvidenceProvider, *, joining: bool,
                own: Evidence | None = None) -> Policy | None:
    """The join policy, both ways; None when this replica neither joins nor accepts joins. JoinError when it is
    unusable. ``own``: this replica's evidence (e.g. its TLS certificate's), else asked of ``provider``."""
    if not joining and not settings.join.accept:
        return None
    if own is None:
        try:
            own = provider.get_evidence(_OWN_REFERENCE)
        except Exception as exc:   # the provider's own error types: ProviderError, OSError
            raise JoinError(f"this replica cannot read its own evidence: {exc}") from None
    try:
        return join_policy(settings, own, sim_root_fingerprint=_sim_root(provider))
    except JoinError as exc:
        hint = "" if joining else " (join.accept: false turns the join routes off)"
        raise JoinError(f"{exc}{hint}") from None


def joiner_obtain(settings: "Settings", provider: EvidenceProvider, policy: Policy,
                  peers: Sequence[str]) -> Callable[[], PlatformSecrets]:
    """The ``obtain`` callback for the sealed state: the secrets from the first peer of ``peers`` whose evidence
    passes ``policy`` and that accepts this replica's evidence."""
    return join_obtainer(check_peer_urls(peers), provider, policy, timeout=settings.join.timeout_seconds)


def join_serving(settings: "Settings", policy: Policy | None, secrets_source: Callable[[], PlatformSecrets], *,
                 kds: Any = None, pcs: Any = None) -> tuple[list["APIRouter"], dict[str, Any]]:
    """(routers, body gates) for ``create_app`` so that peers can join this replica; none when
    ``join.accept`` is off."""
    if not settings.join.accept or policy is None:
        return [], {}
    service = JoinService(secrets_source, policy, rate=settings.join.rate_limit, burst=settings.join.burst,
                          kds=kds, pcs=pcs)
    return [join_router(service)], join_body_gates(service)

