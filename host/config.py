"""Host agent configuration (config/host.yaml): strict YAML, paths relative to the config file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from attestation.policy import DEFAULT_POLICY, Policy, load_policy
from attestation.snp.kds import DEFAULT_KDS_URL
from attestation.tdx.pcs import INTEL_CERTS_URL, INTEL_PCS_URL

BUILTIN_DEFAULT = "builtin:default"


class ConfigError(Exception):
    """A host configuration that cannot be used (names the key and why)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HealthSettings(_Strict):
    """Active health checks of the relay's targets (host.relay.HealthCheck)."""

    probe: Literal["tcp", "tls", "none"] = "tcp"  # tls: a handshake completes (its certificate is not judged)
    interval: float = Field(2.0, gt=0, le=3600)
    timeout: float = Field(2.0, gt=0, le=300)
    unhealthy_after: int = Field(3, ge=1, le=1000)   # failures in a row that take a target out of the rotation
    healthy_after: int = Field(2, ge=1, le=1000)     # good probes in a row that bring it back


class RelaySettings(_Strict):
    listen: str = "0.0.0.0:8443"
    target: str | None = None                    # tcp:HOST:PORT | vsock:CID:PORT (one enclave) ...
    targets: list[str] = Field(default_factory=list)  # ... or several replicas (least connections)
    health: HealthSettings = Field(default_factory=HealthSettings)
    control_socket: Path | None = None           # Unix socket for `cube-host relay drain|resume|... --control`
    max_connections: int = Field(1024, ge=1, le=1_000_000)
    max_per_source: int = Field(64, ge=1, le=1_000_000)          # open connections per client address (/64)
    max_per_network: int = Field(256, ge=1, le=1_000_000)        # open connections per IPv6 /48
    connect_timeout: float = Field(5.0, gt=0, le=300)
    first_byte_timeout: float = Field(10.0, gt=0, le=300)        # a client that sends nothing is closed
    idle_timeout: float = Field(300.0, gt=0, le=86400)
    half_close_timeout: float = Field(30.0, gt=0, le=86400)      # after one direction ends, for the other
    buffer_bytes: int = Field(1 << 20, ge=4096, le=64 << 20)
    pump: Literal["splice", "copy", "streams"] | None = None
    shutdown_grace: float = Field(10.0, ge=0, le=3600)

    @model_validator(mode="after")
    def _one_target_list(self) -> "RelaySettings":
        if (self.target is None) == (not self.targets):
            raise ValueError("give either target (one enclave) or targets (a list of replicas)")
        return self

    def all_targets(self) -> list[str]:
        return [self.target] if self.target is not None else list(self.targets)


class CollateralSettings(_Strict):
    enabled: bool = True
    kds_upstream: str = DEFAULT_KDS_URL
    pcs_upstream: str = INTEL_PCS_URL
    intel_certs_upstream: str = INTEL_CERTS_URL
    kds_seed_dir: Path | None = None
    pcs_seed_dir: Path | None = None
    offline: bool = False
    fetch_timeout: float = Field(15.0, gt=0, le=300)
    kds_chain_ttl: float = Field(86400.0, gt=0)
    vcek_ttl: float = Field(30 * 86400.0, gt=0)
    # Anyone reaching the agent can make it fetch: failures are remembered, upstream fetches are budgeted.
    negative_ttl: float = Field(30.0, ge=0, le=3600)
    upstream_per_client_per_minute: float = Field(6.0, gt=0)
    upstream_per_client_burst: int = Field(10, ge=1)
    upstream_per_minute: float = Field(60.0, gt=0)
    upstream_burst: int = Field(60, ge=1)


class VerifySettings(_Strict):
    max_body_bytes: int = Field(512 * 1024, ge=1024, le=16 << 20)
    # Honour an "at" verification time from callers: for tests and for re-checking old evidence only.
    allow_time_override: bool = False
    # Fetch missing certificates/collateral (through this agent's collateral cache).
    fetch_collateral: bool = True
    default_policy: str = "default"
    developer: str = "cube-ai"
    build: str = "cube-host 0.1.0"
    # EAR `exp` = `iat` + this: a result describes evidence at one moment, so it is short-lived.
    ear_lifetime_seconds: float = Field(300.0, ge=1, le=86400)
    status_max_enclaves: int = Field(64, ge=1, le=10_000)


class HostConfig(_Strict):
    data_dir: Path = Field(default_factory=lambda: Path(os.environ.get(
        "CUBE_HOST_DATA_DIR", Path.home() / ".local" / "share" / "cube-ai" / "host")))
    listen: str = "127.0.0.1:7080"
    policies: dict[str, str] = Field(default_factory=lambda: {"default": BUILTIN_DEFAULT})
    verify: VerifySettings = Field(default_factory=VerifySettings)
    collateral: CollateralSettings = Field(default_factory=CollateralSettings)
    relay: RelaySettings | None = None

    def load_policies(self) -> dict[str, tuple[str, Policy]]:
        """name -> (source, Policy); PolicyError/ConfigError on a bad file."""
        out: dict[str, tuple[str, Policy]] = {}
        for name, source in self.policies.items():
            if source == BUILTIN_DEFAULT:
                out[name] = (source, DEFAULT_POLICY)
            else:
                out[name] = (source, load_policy(Path(source)))
        if self.verify.default_policy not in out:
            raise ConfigError(f"verify.default_policy: {self.verify.default_policy!r} is not among policies "
                              f"({', '.join(out) or 'none'})")
        return out


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        msg = "unknown key" if e.get("type") == "extra_forbidden" else e.get("msg", "invalid")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def config_from_dict(data: dict, base_dir: Path | None = None) -> HostConfig:
    if not isinstance(data, dict):
        raise ConfigError("host config: must be a mapping")
    try:
        config = HostConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"host config: {_describe(exc)}") from None
    if base_dir is not None:
        def rel(p: Path | None) -> Path | None:
            if p is None:
                return None
            p = p.expanduser()
            return p if p.is_absolute() else (base_dir / p)
        config.data_dir = rel(config.data_dir)  # type: ignore[assignment]
        config.collateral.kds_seed_dir = rel(config.collateral.kds_seed_dir)
        config.collateral.pcs_seed_dir = rel(config.collateral.pcs_seed_dir)
        if config.relay is not None:
            config.relay.control_socket = rel(config.relay.control_socket)
        config.policies = {name: (src if src.startswith("builtin:") else str(rel(Path(src))))
                           for name, src in config.policies.items()}
    return config


def load_config(path: Path) -> HostConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return config_from_dict(data, path.resolve().parent)
