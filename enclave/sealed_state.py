"""Sealed state: the platform secrets kept in ``data_dir`` only encrypted under a key the host cannot derive.

File ``data_dir/platform-secrets.sealed`` (JSON, public fields only)::

    {"format": "cube-sealed-state/v1", "platform": "snp" | "sim", "bound_to": "<what the key is bound to>",
     "config": "<SHA-256 hex of the configuration file>" | "unbound", "aead": "AES-256-GCM",
     "nonce": "<base64, 12 bytes>", "ciphertext": "<base64: PlatformSecrets.to_bytes() + tag>"}

* key = HKDF-SHA-256(provider.derived_key(b"cube-ai/sealed-state/v1"), info = "cube-ai/sealed-state/v1/aes-256-gcm")
* AAD = the canonical JSON of the header (format, platform, bound_to, config, aead), so no header field can be
  changed without the file failing to open. The nonce is random per write (one key seals few messages).
* ``config``: outside simulation, the digest of the configuration the secrets were sealed under; the file opens
  only under that same configuration. The firmware key is not bound to HOST_DATA (the key request has no such
  field), and HOST_DATA is the host's to choose: without this, the host could launch the same image with a
  configuration of its own (a lax join policy, its own operator key) and a HOST_DATA to match, and that
  enclave would open this deployment's secrets. (Simulation: "unbound", so a development config may change.)

The sealing key is the platform's (SNP: the firmware's derived key, bound to the launch measurement and guest
policy, see ``attestation.providers.snp_derived_key``; the sim: its stand-in). Another image, another policy or
another machine derives another key, and then the file does not open.

At start (``obtain_platform_secrets``): the file present -> open it; a file that does not open is **refused**,
never replaced (replacing it would let the host reset the secrets and start a deployment of its own choosing);
the operator decides what to do (see ``SealedStateError``). Absent -> ``obtain()`` (a peer over attested TLS,
``--join``) if given, else fresh secrets; either is sealed and written at once. TDX has no sealing key: the
secrets then live in memory only, and every restart needs a peer (logged at ERROR).

What this does not stop, and what limits it: the host can delete the file (the enclave then starts without
its secrets: every row MAC in the store fails, see ``enclave.store``; ``enclave.main`` refuses fresh secrets
over a non-empty store), or put back an older copy of it (harmless: the root secret never changes).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets as _random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from attestation.errors import NoSealingKey, ProviderError
from enclave.config import ConfigError, Settings, legacy_secret_file, load_server_secret, read_secret_file
from enclave.platform_secrets import PlatformSecrets, PlatformSecretsError

log = logging.getLogger("enclave.sealed_state")

SEALED_FILE_NAME = "platform-secrets.sealed"
FORMAT = "cube-sealed-state/v1"
AEAD = "AES-256-GCM"
SEALING_CONTEXT = b"cube-ai/sealed-state/v1"
_AEAD_INFO = b"cube-ai/sealed-state/v1/aes-256-gcm"
_HEADER_FIELDS = ("format", "platform", "bound_to", "config", "aead")
UNBOUND = "unbound"   # the "config" of secrets sealed without a configuration binding (simulation)
MAX_SEALED_BYTES = 64 * 1024

# Where the secrets in use came from (``obtain_platform_secrets``' second value).
FROM_SEALED, FROM_PEER, GENERATED, FROM_CONFIG, FROM_LEGACY = "sealed", "peer", "generated", "config", "legacy"


class SealedStateError(Exception):
    """The sealed state cannot be used; the message says why and what the operator can do."""


def _aead(provider: Any) -> AESGCM:
    try:
        base = provider.derived_key(SEALING_CONTEXT)
    except NoSealingKey:
        raise
    except ProviderError as e:
        raise SealedStateError(f"cannot derive the sealing key: {e}") from None
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_AEAD_INFO).derive(base))


def _config_field(config_sha256: bytes | None) -> str:
    if config_sha256 is None:
        return UNBOUND
    if not isinstance(config_sha256, bytes) or len(config_sha256) != 32:
        raise ValueError("config_sha256 is the 32-byte SHA-256 of the configuration file")
    return config_sha256.hex()


def _header(provider: Any, config_sha256: bytes | None) -> dict[str, str]:
    return {"format": FORMAT, "platform": str(provider.platform), "bound_to": str(provider.sealing_binding),
            "config": _config_field(config_sha256), "aead": AEAD}


def _aad(header: dict[str, str]) -> bytes:
    return json.dumps({k: header[k] for k in _HEADER_FIELDS}, sort_keys=True, separators=(",", ":")).encode()


def seal_platform_secrets(platform_secrets: PlatformSecrets, provider: Any, *,
                          config_sha256: bytes | None = None) -> bytes:
    """The sealed file's bytes for ``platform_secrets`` under ``provider``'s sealing key, bound to the
    configuration whose SHA-256 is ``config_sha256`` (None: unbound, simulation).

    Raises NoSealingKey where the platform has no sealing key (TDX)."""
    header = _header(provider, config_sha256)
    nonce = _random.token_bytes(12)
    sealed = _aead(provider).encrypt(nonce, platform_secrets.to_bytes(), _aad(header))
    doc = {**header, "nonce": base64.b64encode(nonce).decode(), "ciphertext": base64.b64encode(sealed).decode()}
    return (json.dumps(doc, indent=1) + "\n").encode()


def open_platform_secrets(data: bytes, provider: Any, *, config_sha256: bytes | None = None) -> PlatformSecrets:
    """The platform secrets in a sealed file; SealedStateError when it is not one or does not open here.

    ``config_sha256``: the digest of the configuration loaded; the file must have been sealed under it (None:
    any, simulation)."""
    try:
        doc = json.loads(data)
        header = {k: doc[k] for k in _HEADER_FIELDS}
        nonce = base64.b64decode(doc["nonce"], validate=True)
        sealed = base64.b64decode(doc["ciphertext"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise SealedStateError("not a sealed-state file (unreadable JSON or missing fields)") from None
    if not all(isinstance(v, str) for v in header.values()):
        raise SealedStateError("not a sealed-state file (header fields must be strings)")
    if header["format"] != FORMAT or header["aead"] != AEAD:
        raise SealedStateError(f"unknown sealed-state format {header['format']!r} / {header['aead']!r}")
    if header["platform"] != provider.platform:
        raise SealedStateError(f"sealed on platform {header['platform']!r}, this is {provider.platform!r}")
    if config_sha256 is not None and header["config"] != _config_field(config_sha256):
        raise SealedStateError(f"sealed under another configuration (SHA-256 {header['config']}), not the one "
                               f"loaded ({config_sha256.hex()}): the platform secrets open only under the "
                               "configuration they were sealed with")
    if len(nonce) != 12:
        raise SealedStateError("sealed-state nonce must be 12 bytes")
    try:
        plain = _aead(provider).decrypt(nonce, sealed, _aad(header))
    except NoSealingKey:
        raise SealedStateError(f"this platform ({provider.platform}) has no sealing key to open it") from None
    except InvalidTag:
        raise SealedStateError(f"it does not open with this guest's sealing key (bound to "
                               f"{provider.sealing_binding}): it was sealed by another image, policy or "
                               "machine, or altered") from None
    try:
        return PlatformSecrets.from_bytes(plain)
    except PlatformSecretsError as e:
        raise SealedStateError(f"it opens but holds no platform secrets ({e})") from None


def _write_new(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (0600) through a temporary file and a rename: never a half-written file.

    The temporary name is random and created exclusively, never through a symlink: ``data_dir`` is the host's
    disk, and a planted link must not redirect the write anywhere else."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{_random.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def persist(data_dir: Path, platform_secrets: PlatformSecrets, provider: Any, *,
            config_sha256: bytes | None = None) -> bool:
    """Seal and write the secrets; False (logged at ERROR) where the platform has no sealing key."""
    try:
        data = seal_platform_secrets(platform_secrets, provider, config_sha256=config_sha256)
    except NoSealingKey as e:
        log.error("platform secrets NOT persisted: %s. They live in this process only: every restart of this "
                  "replica must obtain them again from a running replica (--join)", e)
        return False
    _write_new(Path(data_dir) / SEALED_FILE_NAME, data)
    return True


def _can_seal(provider: Any) -> bool:
    try:
        provider.derived_key(SEALING_CONTEXT)
    except NoSealingKey:
        return False
    except ProviderError:
        pass
    return True


def _read_sealed(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_SEALED_BYTES + 1)
    except OSError as e:
        raise SealedStateError(f"{path}: cannot read: {e.strerror}") from None
    if len(data) > MAX_SEALED_BYTES:
        raise SealedStateError(f"{path}: larger than a sealed-state file can be")
    return data


def _refusal(path: Path, why: str) -> SealedStateError:
    return SealedStateError(
        f"sealed state {path} refused: {why}. It is never replaced automatically (that would let the host reset "
        "this deployment's secrets). If this replica should take the secrets from a running replica, move the file "
        f"away and start with --join https://PEER; to start a new deployment, move away {path.name} and use an "
        "empty database")


def obtain_platform_secrets(data_dir: Path, provider: Any, *, obtain: Callable[[], PlatformSecrets] | None = None,
                            generate: bool = True, config_sha256: bytes | None = None
                            ) -> tuple[PlatformSecrets, str]:
    """The platform secrets and where they came from (FROM_SEALED, FROM_PEER or GENERATED); see the module doc.

    ``generate=False``: refuse to make fresh secrets (the caller knows the database is in use).
    ``config_sha256``: the configuration the secrets are sealed to and must have been sealed under."""
    path = Path(data_dir) / SEALED_FILE_NAME
    if path.exists():
        try:
            return open_platform_secrets(_read_sealed(path), provider, config_sha256=config_sha256), FROM_SEALED
        except SealedStateError as e:
            raise _refusal(path, str(e)) from None
    if obtain is not None:
        got, origin = obtain(), FROM_PEER
        if not isinstance(got, PlatformSecrets):
            raise SealedStateError("the join step returned no platform secrets")
    elif not generate:
        no_key = "" if _can_seal(provider) else (" This platform has no sealing key, so every start of a replica "
                                                 "obtains the secrets from a running one (--join).")
        raise SealedStateError(
            f"no sealed state in {data_dir} (and no --join peer), but the database already holds rows: fresh "
            "secrets would make all of them unusable. Restore the sealed file, start with --join https://PEER, "
            f"or use an empty database.{no_key}")
    else:
        got, origin = PlatformSecrets.generate(), GENERATED
    if persist(data_dir, got, provider, config_sha256=config_sha256):
        log.info("platform secrets %s and sealed to %s", "obtained from a peer" if obtain else "generated",
                 provider.sealing_binding)
    return got, origin


def load_platform_secrets(data_dir: Path, provider: Any, *,
                          obtain: Callable[[], PlatformSecrets] | None = None) -> PlatformSecrets:
    """``obtain_platform_secrets`` without the origin."""
    return obtain_platform_secrets(data_dir, provider, obtain=obtain)[0]


def platform_secrets_for(settings: Settings, provider: Any, *, obtain: Callable[[], PlatformSecrets] | None = None,
                         generate: bool = True) -> tuple[PlatformSecrets, str]:
    """What ``cube-enclave serve`` uses: the sealed state, plus the simulation-only sources.

    Simulation: ``server_secret`` / ``server_secret_file`` are the root as given (FROM_CONFIG, nothing sealed);
    a legacy plaintext ``data_dir/server_secret`` becomes the root once: it is sealed, then deleted
    (FROM_LEGACY). Outside simulation both are refused (``load_server_secret``; the legacy file here): a
    secret the host could read protects nothing, so such an installation is not adopted.
    """
    explicit = load_server_secret(settings)   # ConfigError outside simulation
    if explicit is not None:
        return PlatformSecrets(explicit), FROM_CONFIG
    legacy = legacy_secret_file(settings)
    if legacy is None:
        bound = None if settings.simulate else settings.config_file.sha256
        return obtain_platform_secrets(settings.data_dir, provider, obtain=obtain, generate=generate,
                                       config_sha256=bound)
    if not settings.simulate:
        raise SealedStateError(
            f"{legacy} holds the server secret in plaintext, where the host can read it: the keys and rows it "
            "protected may have been forged, so this installation cannot be adopted. Start a new deployment: move "
            "that file away, use a new data_dir and an empty database, and issue new API keys")
    root = read_secret_file(legacy)
    sealed = Path(settings.data_dir) / SEALED_FILE_NAME
    if sealed.exists():
        found, _ = obtain_platform_secrets(settings.data_dir, provider)
        if found.root != root:
            raise SealedStateError(f"both {legacy} (legacy, plaintext) and {sealed} exist and disagree; move one away")
        legacy.unlink()   # an interrupted migration: sealed already, only the plaintext remained
        return found, FROM_SEALED
    try:
        secrets_ = PlatformSecrets(root)
    except PlatformSecretsError as e:
        raise ConfigError(f"{legacy}: {e}") from None
    persist(settings.data_dir, secrets_, provider)
    legacy.unlink()
    log.warning("migrated the legacy plaintext %s into the sealed state (simulation)", legacy)
    return secrets_, FROM_LEGACY
