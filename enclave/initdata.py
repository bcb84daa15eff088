"""Confidential Containers init-data: the enclave's configuration carried in the pod's init-data document.

Under Confidential Containers (Kata) the host-data slot of the evidence carries the digest of the pod's init-data,
not of a configuration file. The init-data is a TOML document::

    version = "0.1.0"
    algorithm = "sha384"          # sha256 | sha384 | sha512
    [data]
    "cube-enclave.yaml" = '''...'''   # and the agent policy, the attestation agent's configuration, ...

given to Kata by the pod annotation ``io.katacontainers.config.hypervisor.cc_init_data`` (base64 of the gzipped
TOML). The guest receives the TOML; the digest under ``algorithm`` of its exact bytes is what the launch binds:

- SNP HOST_DATA (32 bytes): the digest truncated or zero-padded to 32 bytes;
- TDX MRCONFIGID (48 bytes): the digest truncated or zero-padded to 48 bytes.

Source of these rules: kata-containers ``src/libs/kata-types/src/initdata.rs`` (``calculate_digest``,
``adjust_digest``: required length 32 for SNP, 48 for TDX, longer digests truncated, shorter zero-padded; only
version "0.1.0" and the three algorithms are accepted) and confidential-containers guest-components'
init-data reader (the guest hashes the decompressed TOML bytes it writes to
``/run/confidential-containers/initdata/initdata.toml``).

``cube-enclave serve --initdata FILE`` reads that file once, takes its configuration from the ``[data]`` entry
named ``cube-enclave.yaml`` and binds the start to the init-data digest (enclave/config_binding.py). Anything
malformed fails closed with an InitDataError (a ConfigError: the service exits 2 naming the problem).
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path

from enclave.config import ConfigError

INITDATA_VERSION = "0.1.0"
CONFIG_ENTRY = "cube-enclave.yaml"
ALGORITHMS = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}
DEFAULT_GUEST_PATH = "/run/confidential-containers/initdata/initdata.toml"


class InitDataError(ConfigError):
    """The init-data document cannot be used: malformed, an unknown algorithm or version, no configuration entry."""


@dataclass(frozen=True)
class InitDataDigest:
    """The digest of an init-data document under its own ``algorithm`` (32, 48 or 64 bytes)."""

    algorithm: str
    digest: bytes

    def launch_value(self, length: int) -> bytes:
        """The launch field of ``length`` bytes Kata fills from this digest: truncated or zero-padded."""
        return self.digest[:length] + bytes(max(0, length - len(self.digest)))


@dataclass(frozen=True)
class InitData:
    path: Path
    binding: InitDataDigest
    config: bytes          # the UTF-8 bytes of the ``cube-enclave.yaml`` entry


def parse_initdata(raw: bytes, source: str) -> InitData:
    """Parse init-data ``raw`` (named ``source`` in messages): version, algorithm, the configuration entry."""
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InitDataError(f"init-data {source} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise InitDataError(f"init-data {source} is not valid TOML: {e}") from None
    version = document.get("version")
    if version != INITDATA_VERSION:
        raise InitDataError(f"init-data {source}: version {version!r} is not supported (only {INITDATA_VERSION!r})")
    algorithm = document.get("algorithm")
    if algorithm not in ALGORITHMS:
        raise InitDataError(f"init-data {source}: algorithm {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    data = document.get("data")
    if not isinstance(data, dict):
        raise InitDataError(f"init-data {source}: no [data] table")
    entry = data.get(CONFIG_ENTRY)
    if entry is None:
        raise InitDataError(f"init-data {source}: no [data] entry {CONFIG_ENTRY!r} holding the enclave's "
                            f"configuration (entries: {', '.join(sorted(data)) or 'none'})")
    if not isinstance(entry, str):
        raise InitDataError(f"init-data {source}: [data] entry {CONFIG_ENTRY!r} must be a string (the YAML text)")
    binding = InitDataDigest(algorithm, ALGORITHMS[algorithm](raw).digest())
    return InitData(Path(source), binding, entry.encode("utf-8"))


def read_initdata(path: Path) -> InitData:
    """Read the init-data file once (the digest is of exactly the bytes parsed) and parse it."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise InitDataError(f"cannot read init-data {path}: {e.strerror}") from None
    return parse_initdata(raw, str(path))
