"""Enclave settings: config/enclave.yaml, then (simulation only) CUBE_ENCLAVE__* environment overrides.

Outside simulation every setting comes from the configuration file: its SHA-256 is what the launch puts in
SNP HOST_DATA / TDX MRCONFIGID and the enclave checks it at start (enclave/config_binding.py), so a value the
host could set another way (the environment, most launch flags) would escape that binding. Simulation is chosen
by ``--simulate`` or ``simulate: true`` in the file, never by the environment.

Environment overrides use "__" for nesting: CUBE_ENCLAVE__DATABASE_URL, CUBE_ENCLAVE__LISTEN__PORT=9443,
CUBE_ENCLAVE__BACKENDS='[{name: ol, kind: ollama, base_url: "http://127.0.0.1:11434"}]'. Values are read as
YAML scalars/flow collections, so numbers, booleans and lists work. Any problem raises ConfigError naming the key.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, field_validator,
                      model_validator)

from attestation.keyfile import KeyFileError, check_private_file, read_private_file
from enclave.backends.base import BackendConfig, plain_http_base_url
from enclave.sealing import SealError, load_public_key

if TYPE_CHECKING:   # pragma: no cover
    from enclave.initdata import InitDataDigest

ENV_PREFIX = "CUBE_ENCLAVE__"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "enclave.yaml"
SECRET_FILE_NAME = "server_secret"
MIN_SECRET_BYTES = 32
PAT_TTL_CEILING_DAYS = 3650   # no key, however configured, lives longer than ten years


class ConfigError(Exception):
    """Configuration is invalid; the message names the key and the reason."""


@dataclass(frozen=True)
class ConfigFile:
    """The configuration file the settings were read from (None: defaults only) and the SHA-256 of its exact
    bytes (of b"" without a file: an empty file gives the same settings). Under init-data (enclave/initdata.py)
    ``path`` is the init-data file, ``sha256`` that of its configuration entry, and ``initdata`` the digest of the
    whole document, which is what the launch binds instead."""

    path: Path | None
    sha256: bytes
    initdata: InitDataDigest | None = None


# The host agent's collateral mirror as a guest started by `cube-host launch` reaches it.
DEFAULT_KDS_MIRROR = "http://10.0.2.2:7080/kds"
DEFAULT_PCS_MIRROR = "http://10.0.2.2:7080/pcs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ListenSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8443, ge=0, le=65535)


class LimitSettings(_Strict):
    max_body_bytes: int = Field(1_048_576, ge=1024)
    max_header_bytes: int = Field(16_384, ge=1024, description="total size of all request headers")
    # Slow clients (slowloris): a connection's request headers must arrive within header_timeout_seconds of
    # its TLS handshake or of the request's first byte, and the body within body_timeout_seconds after them.
    header_timeout_seconds: float = Field(10.0, gt=0, le=300, description="deadline for a request's headers")
    body_timeout_seconds: float = Field(30.0, gt=0, le=3600, description="deadline for a request's body")
    max_connections: int = Field(1000, ge=1, description="open connections served at once; more get 503")


class AttestationSettings(_Strict):
    rotate_every_seconds: float | None = Field(3600.0, gt=0)
    sim_dir: Path | None = None
    rate_limit: float = Field(5.0, gt=0, description="attestation requests per second per TLS connection")
    # Revocation data carried in the evidence, fetched through the host agent's collateral mirror
    # (`cube-host serve`, 127.0.0.1:7080 on the host = 10.0.2.2:7080 from a guest on QEMU user networking,
    # as `cube-host launch` starts it). The host is untrusted, but the AMD CRL is ARK-signed and Intel's
    # collateral Intel-signed: a lying mirror can only get the evidence refused, never accepted. Unused by the
    # sim; null turns one off (verifiers requiring it then refuse this enclave's evidence).
    kds_url: str | None = Field(DEFAULT_KDS_MIRROR, description="AMD KDS (or mirror) base URL for the CRL in SNP evidence")
    pcs_url: str | None = Field(DEFAULT_PCS_MIRROR, description="Intel PCS (or mirror) base URL for the collateral in TDX evidence")

    @field_validator("kds_url", "pcs_url")
    @classmethod
    def _check_collateral_url(cls, value: str | None) -> str | None:
        return None if value is None else plain_http_base_url(value)


class TlsSettings(_Strict):
    hostnames: list[str] = Field(default_factory=lambda: ["localhost", "127.0.0.1"], min_length=1)


class BootstrapSettings(_Strict):
    admin_name: str = Field("admin", min_length=1, max_length=100)
    domain_name: str = Field("default", min_length=1, max_length=100)
    # Outside simulation the bootstrap PAT is never printed: it is sealed to this key (enclave/sealing.py).
    operator_public_key: str | None = Field(None, description="operator's X25519 public key (base64 or PEM) "
                                                              "the bootstrap PAT is sealed to")

    @field_validator("operator_public_key")
    @classmethod
    def _check_operator_key(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                load_public_key(value)
            except SealError as e:
                raise ValueError(f"not an X25519 public key ({e})") from None
        return value


class DatabaseTlsSettings(_Strict):
    """TLS to PostgreSQL, the server pinned by the SHA-256 (hex) of its certificate's DER or of its public key
    (SubjectPublicKeyInfo DER): exactly one (enclave/database_tls.py)."""

    server_certificate_sha256: str | None = None
    server_spki_sha256: str | None = None

    @field_validator("server_certificate_sha256", "server_spki_sha256")
    @classmethod
    def _hex256(cls, value: str | None) -> str | None:
        if value is not None:
            value = value.strip().lower().replace(":", "")
            if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                raise ValueError("must be a SHA-256 in hex (64 digits)")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> "DatabaseTlsSettings":
        if (self.server_certificate_sha256 is None) == (self.server_spki_sha256 is None):
            raise ValueError("give exactly one of server_certificate_sha256 and server_spki_sha256")
        return self


class JoinSettings(_Strict):
    """Replicas sharing the platform secrets (``enclave.join``): who may join this replica, or be joined by it.

    ``policy`` (inline) or ``policy_file`` (a path inside the measured image); neither: a peer must show this
    replica's own platform, measurement and configuration (``attestation.peer.same_as_me_policy``)."""

    accept: bool = Field(True, description="serve the join routes, so that new replicas can obtain the secrets")
    policy: dict[str, Any] | None = Field(None, description="the join policy inline (attestation policy keys)")
    policy_file: Path | None = Field(None, description="the join policy as a file inside the measured image")
    rate_limit: float = Field(1.0, gt=0, le=100, description="join requests per second this replica serves")
    burst: int = Field(5, ge=1, le=100)
    timeout_seconds: float = Field(60.0, gt=0, le=3600, description="how long --join keeps trying to reach a peer")

    @model_validator(mode="after")
    def _one_policy(self) -> "JoinSettings":
        if self.policy is not None and self.policy_file is not None:
            raise ValueError("give join.policy or join.policy_file, not both")
        return self


class UsageSettings(_Strict):
    """The usage ledger (enclave.usage): one record per inference request, written in batches.

    A crash (``kill -9``) loses at most the records of the last ``flush_seconds`` plus a batch being written;
    a clean shutdown loses none. While the database is down, up to ``max_pending`` records wait in memory (the
    oldest are dropped beyond that, counted in cube_usage_records_dropped_total)."""

    flush_seconds: float = Field(1.0, gt=0, le=60, description="how often pending usage records are written")
    batch_size: int = Field(500, ge=1, le=10_000, description="records per write; a full batch is written at once")
    max_pending: int = Field(100_000, ge=1, le=10_000_000, description="records kept in memory while the database "
                                                                      "cannot be written; beyond, the oldest drop")

    @model_validator(mode="after")
    def _batch_fits(self) -> "UsageSettings":
        if self.batch_size > self.max_pending:
            raise ValueError("usage.batch_size must not exceed usage.max_pending")
        return self


# -- usage limits and budgets -------------------------------------------------------------------------------------


class LimitValues(_Strict):
    """One subject level's limits; null (the default) = no limit of that kind. Windows are fixed UTC windows:
    the minute, the calendar day, the calendar month (docs/limits.md)."""

    rpm: int | None = Field(None, ge=0, description="requests per minute")
    tpm: int | None = Field(None, ge=0, description="tokens per minute")
    concurrent: int | None = Field(None, ge=0, description="requests in flight at once")
    tokens_per_day: int | None = Field(None, ge=0)
    tokens_per_month: int | None = Field(None, ge=0)


class QuotaDefaults(_Strict):
    """What applies to every PAT, every user in a domain and every domain without a limit row of its own."""

    pat: LimitValues = Field(default_factory=LimitValues)
    user: LimitValues = Field(default_factory=LimitValues)
    domain: LimitValues = Field(default_factory=LimitValues)


class QuotaSettings(_Strict):
    """Per-PAT, per-user-in-domain and per-domain limits and budgets (enclave.quotas): platform defaults."""

    defaults: QuotaDefaults = Field(default_factory=QuotaDefaults)
    sync_seconds: float = Field(1.0, gt=0, le=60, description="how often a replica syncs its counters and "
                                                            "limit rows with the shared database")


# -- audit trail ----------------------------------------------------------------------------------------------------


class AuditSettings(_Strict):
    """The tamper-evident audit trail (enclave.audit, docs/audit.md)."""

    checkpoint_seconds: float = Field(300.0, gt=0, le=86400, description="how often the chain head is signed "
                                      "(when it moved); also at shutdown and at the end of every export")
    retention_days: int | None = Field(None, ge=1, le=36500, description="entries older than this are pruned "
                                       "(the prune is itself an entry); null: keep forever")
    refusal_interval_seconds: float = Field(60.0, gt=0, le=3600, description="authentication refusals are "
                                            "counted and written as one entry per class and source per interval")
    refusal_max_sources: int = Field(64, ge=1, le=10000, description="distinct source addresses counted "
                                     "separately per interval; the rest share one bucket (source \"*\")")


class Settings(_Strict):
    data_dir: Path = Field(default_factory=lambda: Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
                           / "cube-ai" / "enclave")
    database_url: str | None = Field(None, description="SQLAlchemy async URL; default SQLite in data_dir")
    database_schema: str | None = Field(None, description="PostgreSQL schema (search_path) to use")
    database_tls: DatabaseTlsSettings | None = Field(None, description="PostgreSQL over TLS with a pinned server "
                                                                       "certificate (required outside simulation)")
    server_secret: SecretStr | None = Field(None, description="simulation only: the root secret (>= 32 bytes); "
                                                            "else server_secret_file; else sealed in data_dir")
    server_secret_file: Path | None = None
    listen: ListenSettings = Field(default_factory=ListenSettings)
    # Strict: "true" or 1 would simulate while the environment gate (``simulate is True``) saw no simulation.
    simulate: bool = Field(False, strict=True)
    backends: list[BackendConfig] = Field(default_factory=list)
    registry_refresh_seconds: float = Field(30.0, gt=0)
    pat_default_ttl_days: int = Field(30, ge=1)
    pat_max_ttl_days: int = Field(365, ge=1, le=PAT_TTL_CEILING_DAYS)
    last_used_flush_seconds: float = Field(60.0, gt=0)
    auth_cache: bool | None = Field(None, description="cache PAT lookups in-process; default: on for SQLite only")
    limits: LimitSettings = Field(default_factory=LimitSettings)
    attestation: AttestationSettings = Field(default_factory=AttestationSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    bootstrap: BootstrapSettings = Field(default_factory=BootstrapSettings)
    join: JoinSettings = Field(default_factory=JoinSettings)
    usage: UsageSettings = Field(default_factory=UsageSettings)
    quotas: QuotaSettings = Field(default_factory=QuotaSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    log_level: str = "INFO"
    log_json: bool = True
    _config_file: ConfigFile = PrivateAttr(default_factory=lambda: ConfigFile(None, hashlib.sha256(b"").digest()))

    @property
    def config_file(self) -> ConfigFile:
        """Which file these settings came from and its digest (what HOST_DATA / MRCONFIGID must carry)."""
        return self._config_file

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return v.upper()

    @field_validator("database_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith("sqlite+aiosqlite://") or v.startswith("postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.pat_default_ttl_days > self.pat_max_ttl_days:
            raise ValueError("pat_default_ttl_days must not exceed pat_max_ttl_days")
        if self.database_tls is not None and not (self.database_url or "").startswith("postgresql"):
            raise ValueError("database_tls: only for a postgresql+asyncpg:// database_url")
        policy_file = self.join.policy_file
        if policy_file is not None and not self.simulate and _inside(policy_file, self.data_dir):
            raise ValueError(f"join.policy_file: {policy_file} lies in data_dir ({self.data_dir}), which the host "
                             "writes: it would choose who receives the platform secrets. Give a file inside the "
                             "measured image, or join.policy inline")
        names = [b.name for b in self.backends]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"backends: duplicate backend name(s) {', '.join(dupes)}")
        return self

    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'enclave.db'}"

    def auth_cache_enabled(self) -> bool:
        if self.auth_cache is not None:
            return self.auth_cache
        return self.effective_database_url().startswith("sqlite")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping naming one key twice. PyYAML keeps the last value silently, so whoever
    reads the file (a reviewer checking the bytes HOST_DATA pins) could see one setting and the enclave use
    another."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    # Only the keys written in this mapping: one may override a key merged in from an anchor (<<: *anchor).
    explicit = [k for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
    seen: set[Any] = set()
    for key_node in explicit:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:   # an unhashable key: construct_mapping names it
            break
        if duplicate:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _inside(path: Path, directory: Path) -> bool:
    """Whether ``path`` is ``directory`` or lies under it (both made absolute, links resolved where they exist)."""
    resolved, base = Path(path).expanduser().resolve(), Path(directory).expanduser().resolve()
    return resolved == base or base in resolved.parents


def _format_validation(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{key}: {msg}")
    return f"invalid configuration in {source}: " + "; ".join(lines)


def _sets_operator_key(parts: list[str], value: object) -> bool:
    """Whether an environment override reaches ``bootstrap.operator_public_key``: named in full, or inside the
    YAML mapping given for a prefix of it (``CUBE_ENCLAVE__BOOTSTRAP='{operator_public_key: ...}'``)."""
    path = ["bootstrap", "operator_public_key"]
    if parts == path:
        return True
    if parts != path[:len(parts)]:
        return False
    node: object = value
    for key in path[len(parts):]:
        if not isinstance(node, Mapping):
            return False
        node = next((v for k, v in node.items() if str(k).lower() == key), None)
    return node is not None


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if not all(parts):
            raise ConfigError(f"environment variable {name}: empty key segment")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"environment variable {name}: not a valid YAML value ({e.__class__.__name__})") from None
        if _sets_operator_key(parts, value):
            raise ConfigError(f"environment variable {name}: the operator key must come from the configuration "
                              "file (part of the measured image): whoever sets the environment would otherwise "
                              "receive the superadmin key")
        if parts[-1] in {"server_secret", "database_url", "api_key"}:
            value = raw  # secrets and URLs stay verbatim strings
        node = tree
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment variable {name}: conflicts with another override")
            node = child
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _secrets_held(data: Mapping[str, Any]) -> list[str]:
    """Which secrets a configuration file holds inline (the PAT HMAC key, backend API keys)."""
    held = ["server_secret"] if data.get("server_secret") is not None else []
    backends = data.get("backends")
    if isinstance(backends, list) and any(isinstance(b, dict) and b.get("api_key") for b in backends):
        held.append("a backend api_key")
    return held


def load_settings(path: Path | None = None, *, environ: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None, content: bytes | None = None,
                  initdata: InitDataDigest | None = None) -> Settings:
    """Read YAML (``path`` or config/enclave.yaml when present), apply env then explicit overrides, validate.

    ``content``: the YAML bytes already read from ``path`` (an init-data entry; ``initdata`` its document's
    digest), parsed instead of reading the file. ``overrides`` are the launch flags' values. The environment is applied only when the file or ``overrides``
    turn simulation on; outside simulation any CUBE_ENCLAVE__* variable is refused (see the module docstring).
    """
    environ = os.environ if environ is None else environ
    source = "defaults"
    data: dict[str, Any] = {}
    raw = b""
    file = path if path is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    if file is not None:
        source = str(file)
        try:
            raw = Path(file).read_bytes() if content is None else content   # read once: digest of the bytes parsed
        except OSError as e:
            raise ConfigError(f"cannot read configuration file {file}: {e.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"configuration file {file} is not UTF-8 text") from None
        try:
            loaded = yaml.load(text, Loader=_UniqueKeyLoader)   # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", "") or ""
            why = f" ({problem})" if problem.startswith("duplicate key") else ""
            raise ConfigError(f"configuration file {file} is not valid YAML{where}{why}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"configuration file {file}: top level must be a mapping of keys")
        held = _secrets_held(loaded)
        if held:
            try:   # the file holds secrets itself: it is a key file
                check_private_file(Path(file), f"configuration file holding {' and '.join(held)}")
            except KeyFileError as e:
                raise ConfigError(str(e)) from None
        data = loaded
    simulating = (overrides or {}).get("simulate", data.get("simulate")) is True
    if not simulating:
        _refuse_environment(environ)
    env = _env_overrides(environ)
    if env:
        source += " + CUBE_ENCLAVE__* environment"
    data = _merge(data, env)
    if overrides:
        data = _merge(data, overrides)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, source)) from None
    if env and not settings.simulate:   # CUBE_ENCLAVE__SIMULATE=false must not keep the other overrides
        _refuse_environment(environ)
    settings._config_file = ConfigFile(Path(file) if file is not None else None, hashlib.sha256(raw).digest(),
                                       initdata)
    return settings


def _refuse_environment(environ: Mapping[str, str]) -> None:
    """Outside simulation the settings come from the configuration file alone: the host sets the environment."""
    names = sorted(name for name in environ if name.startswith(ENV_PREFIX))
    if names:
        raise ConfigError(f"environment variable {names[0]}: outside simulation every setting must come from the "
                          "configuration file (its SHA-256 is bound to the launch evidence); CUBE_ENCLAVE__* "
                          "overrides are for --simulate only" + (f" ({len(names)} such variables set)"
                                                                  if len(names) > 1 else ""))


def check_database_transport(settings: Settings) -> None:
    """Outside simulation, refuse a PostgreSQL database reached without pinned TLS: the host owns that network
    (it could read the rows or answer as the database)."""
    if (not settings.simulate and settings.effective_database_url().startswith("postgresql")
            and settings.database_tls is None):
        raise ConfigError("database_url: PostgreSQL outside simulation needs database_tls (the server's certificate "
                          "or key pinned by SHA-256): the host owns the network between the enclave and the database")


def load_server_secret(settings: Settings) -> bytes | None:
    """The root secret given in the configuration (``server_secret``, or the file ``server_secret_file``), or None.

    Simulation only: outside it the platform secrets are sealed in data_dir (enclave.sealed_state), and a
    secret in the configuration is refused, since whoever holds the image or the file reads it. Nothing is
    created here any more: the plaintext ``data_dir/server_secret`` of older versions is only migrated.
    """
    if settings.server_secret is None and settings.server_secret_file is None:
        return None
    key = "server_secret" if settings.server_secret is not None else "server_secret_file"
    if not settings.simulate:
        raise ConfigError(f"{key}: only with --simulate; outside simulation the platform secrets are generated "
                          "inside the enclave and kept sealed in data_dir (a secret in the configuration is "
                          "readable by whoever holds the image or the file)")
    if settings.server_secret is not None:
        value = settings.server_secret.get_secret_value().encode()
        if len(value) < MIN_SECRET_BYTES:
            raise ConfigError(f"server_secret: must be at least {MIN_SECRET_BYTES} bytes")
        return value
    assert settings.server_secret_file is not None
    if not settings.server_secret_file.exists():
        raise ConfigError(f"server_secret_file: {settings.server_secret_file} does not exist")
    return read_secret_file(settings.server_secret_file)


def legacy_secret_file(settings: Settings) -> Path | None:
    """The plaintext ``data_dir/server_secret`` older versions wrote, when it exists."""
    file = settings.data_dir / SECRET_FILE_NAME
    return file if file.exists() else None


def read_secret_file(file: Path) -> bytes:
    """A secret kept in a private file (0600, ours), as text of at least MIN_SECRET_BYTES."""
    try:
        value = read_private_file(file, "server_secret_file").decode("utf-8").strip().encode()
    except KeyFileError as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"server_secret_file: cannot read {file}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"server_secret_file: {file} is not UTF-8 text") from None
    if len(value) < MIN_SECRET_BYTES:
        raise ConfigError(f"server_secret_file: {file} holds fewer than {MIN_SECRET_BYTES} bytes")
    return value
