"""Appraisal policies: what a relying party accepts beyond "the signatures and chains are good".

A policy is YAML validated strictly (unknown keys refused, exact types); a PolicyError names the
offending key and says why.  The model's own defaults are the *strict* ones (debug, migration agent,
SMT, a TD without SEPT_VE_DISABLE and a bound service TD are all refused unless a policy allows
them); DEFAULT_POLICY is the permissive one used when no policy is given: it appraises only what the
evidence itself proves (signatures, chains, TCB status when collateral was evaluated) and still
refuses debug guests and debug TDs.

Example::

    platforms: [snp, tdx]
    accepted_tcb_statuses: [UpToDate]
    snp:
      measurements: ["<96 hex>"]
      min_tcb: {bootloader: 3, snp: 8, microcode: 115}
      vmpl: 0
    tdx:
      measurements:
        - {mrtd: "<96 hex>", rtmr0: "<96 hex>"}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import PolicyError

TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "TDRelaunchAdvised",
    "TDRelaunchAdvisedConfigurationNeeded",
    "Revoked",
)
MAX_POLICY_BYTES = 256 * 1024
_HEX = re.compile(r"[0-9a-fA-F]*")


def _hex_of(n_bytes: int):
    def check(value: str) -> str:
        text = value.strip().lower()
        if text.startswith("0x"):
            text = text[2:]
        if not _HEX.fullmatch(text) or len(text) != 2 * n_bytes:
            raise ValueError(f"must be {2 * n_bytes} hex digits ({n_bytes} bytes)")
        return text

    return AfterValidator(check)


Hex16 = Annotated[str, _hex_of(16)]
Hex32 = Annotated[str, _hex_of(32)]
Hex48 = Annotated[str, _hex_of(48)]
Hex64 = Annotated[str, _hex_of(64)]
Fingerprint = Annotated[str, _hex_of(32)]
Byte = Annotated[int, Field(ge=0, le=255)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SnpMinTcb(_Strict):
    """Minimum SPL per TCB component, compared with REPORTED_TCB (fmc only exists on Turin)."""

    bootloader: Byte | None = None
    tee: Byte | None = None
    snp: Byte | None = None
    microcode: Byte | None = None
    fmc: Byte | None = None


class SnpPolicy(_Strict):
    measurements: list[Hex48] = Field(default_factory=list, max_length=1024)
    min_tcb: SnpMinTcb = Field(default_factory=SnpMinTcb)
    min_guest_svn: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    allow_debug: bool = False
    allow_migrate_ma: bool = False
    allow_smt: bool = False
    vmpl: Annotated[int, Field(ge=0, le=3)] | None = None
    host_data: Hex32 | None = None
    signing_keys: list[Literal["VCEK", "VLEK"]] = Field(default_factory=lambda: ["VCEK", "VLEK"], min_length=1)
    # The AMD CRL reaches a verifier inside evidence the (untrusted) host assembles, so without this a
    # host can skip the revocation check by leaving the CRL out; true refuses evidence without one
    # (unless a KDS client is given to fetch it).
    require_crl: bool = False


class TdxMeasurement(_Strict):
    """One accepted TD build: MRTD and, optionally, the RTMR values it must show."""

    mrtd: Hex48
    rtmr0: Hex48 | None = None
    rtmr1: Hex48 | None = None
    rtmr2: Hex48 | None = None
    rtmr3: Hex48 | None = None


class TdxPolicy(_Strict):
    measurements: list[TdxMeasurement] = Field(default_factory=list, max_length=1024)
    min_tee_tcb_svn: Hex16 | None = None  # compared byte by byte
    min_pcesvn: Annotated[int, Field(ge=0, le=65535)] | None = None
    min_qe_isvsvn: Annotated[int, Field(ge=0, le=65535)] | None = None
    mrconfigid: Hex48 | None = None
    mrowner: Hex48 | None = None
    allow_debug: bool = False
    require_sept_ve_disable: bool = True
    allow_service_td: bool = False
    require_collateral: bool = False


class Policy(_Strict):
    """A relying party's appraisal policy (see the module docstring)."""

    name: Annotated[str, Field(max_length=128)] = "policy"
    platforms: list[Literal["snp", "tdx", "sim"]] = Field(default_factory=lambda: ["snp", "tdx"], min_length=1)
    sim_root_fingerprint: Fingerprint | None = None
    accepted_tcb_statuses: list[Literal[TCB_STATUSES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["UpToDate"], min_length=1
    )
    max_collateral_age_days: Annotated[float, Field(gt=0, le=3650)] | None = None
    report_data: Hex64 | None = None
    snp: SnpPolicy = Field(default_factory=SnpPolicy)
    tdx: TdxPolicy = Field(default_factory=TdxPolicy)
    # A client that sends credentials refuses a policy accepting any snp/tdx guest image unless this is set:
    # without a measurement allowlist a host could boot its own image on genuine hardware and be trusted.
    allow_unmeasured: bool = False

    def unmeasured_platforms(self) -> list[str]:
        """Allowed hardware platforms (snp, tdx) for which this policy pins no measurement."""
        pinned = {"snp": bool(self.snp.measurements), "tdx": bool(self.tdx.measurements)}
        return [p for p in self.platforms if p in pinned and not pinned[p]]

    @model_validator(mode="after")
    def _sim_needs_root(self) -> "Policy":
        if "sim" in self.platforms and not self.sim_root_fingerprint:
            raise ValueError(
                "sim_root_fingerprint: required when platforms lists sim (`./dev serve` writes a ready policy "
                "to <data_dir>/sim-policy.yaml; or print the fingerprint with "
                "`cube-attest sim-fingerprint --dir <data_dir>/sim`, data_dir default ~/.local/share/cube-ai/enclave)"
            )
        if len(set(self.platforms)) != len(self.platforms):
            raise ValueError("platforms: listed twice")
        return self


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "function-after")
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            msg = "unknown key (not a policy setting)"
        elif e.get("type") == "missing":
            msg = "required"
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def policy_from_dict(data: Any) -> Policy:
    if not isinstance(data, dict):
        raise PolicyError(f"policy: must be a mapping of settings, got {type(data).__name__}")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(f"invalid policy: {_describe(exc)}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a silently overridden policy key is a trap)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hashed = key in seen
        except TypeError:
            raise PolicyError(f"policy: unhashable key at line {key_node.start_mark.line + 1}") from None
        if hashed:
            raise PolicyError(f"{key}: key given twice (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def policy_from_yaml(text: str) -> Policy:
    """Policy from YAML text; PolicyError (naming the key) on anything wrong."""
    if not isinstance(text, str):
        raise PolicyError("policy: YAML text expected")
    if len(text) > MAX_POLICY_BYTES:
        raise PolicyError(f"policy: larger than {MAX_POLICY_BYTES} bytes")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except PolicyError:
        raise
    except yaml.YAMLError as exc:
        raise PolicyError(f"policy: not valid YAML ({str(exc).splitlines()[0][:160]})") from None
    except (RecursionError, ValueError, TypeError, OverflowError) as exc:
        raise PolicyError(f"policy: not usable YAML ({type(exc).__name__})") from None
    return policy_from_dict(data)


def load_policy(path: Path) -> Policy:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"policy file {path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"policy file {path}: not UTF-8 text") from None
    try:
        return policy_from_yaml(text)
    except PolicyError as exc:
        raise PolicyError(f"policy file {path}: {exc}") from None


def sim_policy_yaml(fingerprint: str) -> str:
    """A ready-to-use development policy that accepts this installation's simulated platform."""
    return (
        "# Development policy: accepts the simulated platform whose root has this fingerprint.\n"
        "# Simulated evidence proves nothing about hardware; never use this in production.\n"
        "name: sim-development\n"
        "platforms: [sim]\n"
        f"sim_root_fingerprint: \"{fingerprint}\"\n"
        "snp:\n"
        "  vmpl: 0\n"
        "  require_crl: true   # the sim issues its own ARK-signed CRL; evidence without it is refused\n"
    )


DEFAULT_POLICY = Policy(
    name="default (evidence only)",
    platforms=["snp", "tdx"],
    accepted_tcb_statuses=["UpToDate"],
    snp=SnpPolicy(allow_debug=False, allow_migrate_ma=True, allow_smt=True),
    tdx=TdxPolicy(allow_debug=False, require_sept_ve_disable=False, allow_service_td=True),
)
