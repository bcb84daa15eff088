"""What a new replica runs to obtain the platform secrets from a running one (``cube-enclave serve --join``).

The peer is reached with the attested client, so it is appraised under the join policy (its certificate's
evidence and fresh evidence for our nonce, both bound to its TLS key) before any request is written: a peer
that fails is refused before this replica's evidence or any request leaves it. The SPKI our evidence names is
the one the attested client verified for the connection the challenge came back on, and the secrets request
must travel on that same connection (checked). See ``enclave.join.protocol`` for the whole exchange.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from attestation.atls.client import AttestedClient, AttestedTLSError
from attestation.errors import AttestationError
from attestation.peer import join_report_data
from attestation.policy import Policy
from attestation.providers import EvidenceProvider
from enclave.platform_secrets import PlatformSecrets, PlatformSecretsError

from .protocol import (
    CHALLENGE_PATH,
    SECRETS_PATH,
    Challenge,
    JoinError,
    MessageError,
    SecretsAnswer,
    SecretsRequest,
    open_from_server,
    raw_public_key,
)

log = logging.getLogger("enclave.join")

SPKI_INFO = "cube_ai_spki_sha256"   # what the attested client's streams report (attestation.atls.client)
DEFAULT_TIMEOUT = 30.0
_RETRY_PAUSE = 1.0
_BUSY = (429, 503)   # rate limited, or no evidence right now: try again (a new nonce each time)


class _PeerUnreachable(JoinError):
    """The peer could not be reached or verified transiently: worth another try."""


def _spki_of(response: httpx.Response) -> bytes:
    stream = response.extensions.get("network_stream")
    spki_hex = stream.get_extra_info(SPKI_INFO) if stream is not None else None
    if not isinstance(spki_hex, str) or len(spki_hex) != 64:
        raise JoinError("the attested client did not report which key it verified for this connection")
    return bytes.fromhex(spki_hex)


def _refusal_text(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", {})
        return str(error.get("message", ""))[:600] or f"HTTP {response.status_code}"
    except (ValueError, AttributeError):
        return f"HTTP {response.status_code}"


def join_peer(url: str, provider: EvidenceProvider, policy: Policy, *, io_timeout: float = 10.0,
              client_factory: Callable[..., AttestedClient] = AttestedClient) -> PlatformSecrets:
    """The platform secrets of the replica at ``url``; JoinError (saying why) when it refuses us or we refuse it."""
    try:
        client = client_factory(url, policy=policy, require_measurement=False, io_timeout=io_timeout,
                                timeout=io_timeout, verdict_ttl=60.0)
    except (AttestationError, ValueError) as exc:
        raise JoinError(f"{url}: {exc}") from None
    with client:
        try:
            first = client.post(CHALLENGE_PATH)
            if first.status_code in _BUSY:
                raise _PeerUnreachable(f"{url} is busy: {_refusal_text(first)}")
            if first.status_code != 200:
                raise JoinError(f"{url} refused the challenge: {_refusal_text(first)}")
            challenge = Challenge.parse(first.content)
            spki = _spki_of(first)
            if challenge.server_spki_sha256 != spki:
                raise JoinError(f"{url}: the challenge names another TLS key than the one verified")
            private = X25519PrivateKey.generate()
            public = raw_public_key(private)
            try:
                evidence = provider.get_evidence(join_report_data(spki, challenge.nonce, public))
            except AttestationError as exc:
                raise JoinError(f"this replica cannot produce evidence: {exc}") from None
            body = SecretsRequest(challenge.nonce, public, evidence).to_bytes()
            second = client.post(SECRETS_PATH, content=body, headers={"Content-Type": "application/json"})
        except AttestedTLSError as exc:
            if exc.retryable:
                raise _PeerUnreachable(f"{url}: {exc}") from None
            raise JoinError(f"{url} failed this replica's join policy, nothing was sent: {exc}") from None
        except httpx.TransportError as exc:
            raise _PeerUnreachable(f"{url}: {type(exc).__name__}: {exc}") from None
        except MessageError as exc:
            raise JoinError(f"{url} answered a malformed challenge: {exc}") from None
        if _spki_of(second) != spki:   # first: another replica (behind a relay) refuses a nonce it never issued
            raise _PeerUnreachable(f"{url}: the connection of the challenge closed and the request reached another "
                                   "replica; trying again with a new challenge")
        if second.status_code in _BUSY:
            raise _PeerUnreachable(f"{url} is busy: {_refusal_text(second)}")
        if second.status_code != 200:
            raise JoinError(f"{url} refused this replica: {_refusal_text(second)}")
        try:
            answer = SecretsAnswer.parse(second.content)
            plaintext = open_from_server(answer.sealed, private=private, server_key=answer.public_key,
                                         server_spki_sha256=spki, nonce=challenge.nonce)
            return PlatformSecrets.from_bytes(plaintext)
        except (MessageError, PlatformSecretsError) as exc:
            raise JoinError(f"{url} answered malformed secrets: {exc}") from None


def obtain_from_peers(peers: Sequence[str], provider: EvidenceProvider, policy: Policy, *,
                      timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> PlatformSecrets:
    """The secrets from the first of ``peers`` that gives them. Peers that cannot be reached yet are tried again
    until ``timeout`` seconds have passed; a refusal (either way) is final for that peer. JoinError otherwise."""
    if not peers:
        raise JoinError("no peer to join")
    deadline = time.monotonic() + timeout
    pending = list(peers)
    reasons: dict[str, str] = {}
    while pending:
        for url in list(pending):
            try:
                secrets = join_peer(url, provider, policy, **kwargs)
            except _PeerUnreachable as exc:
                reasons[url] = str(exc)
                continue
            except JoinError as exc:
                reasons[url] = str(exc)
                pending.remove(url)
                log.error("join: %s", exc)
                continue
            log.info("join: obtained the platform secrets from %s", url)
            return secrets
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(_RETRY_PAUSE)
    raise JoinError("no peer handed over the platform secrets: " + "; ".join(reasons.values()))


def join_obtainer(peers: Sequence[str], provider: EvidenceProvider, policy: Policy, *,
                  timeout: float = DEFAULT_TIMEOUT) -> Callable[[], PlatformSecrets]:
    """The ``obtain`` callback of the sealed state: fetch the secrets from ``peers`` when this replica has none."""
    return lambda: obtain_from_peers(peers, provider, policy, timeout=timeout)
