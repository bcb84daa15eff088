"""Appraisal policies: what a relying party accepts beyond "the signatures and chains are good".

A policy is YAML validated strictly (unknown keys refused, exact types); a PolicyError names the
offending key and says why.  The model's own defaults are the *strict* ones (debug, migration agent,
SMT, a TD without SEPT_VE_DISABLE and a bound service TD are all refused unless a policy allows
them); DEFAULT_POLICY is the permissive one used when no policy is given: it appraises only what the
evidence itself proves (signatures, chains, TCB status when collateral was evaluated) and still
refuses debug guests and debug TDs.

A policy is *measured* for a platform (``Policy.measurement_gaps``) only when every allowlist entry pins the
whole boot chain: SEV-SNP launch digests computed with kernel hashes (``kernel_hashes: true``: the digest
covers OVMF, the kernel, initrd and command line), TDX entries pinning MRTD (the TDVF firmware) and either
RTMR0-2 (firmware configuration, kernel/initrd, command line) or the boot events of the CC event log
(``boot``: kernel, initrd, command line, the EFI applications allowed; RTMR0, the host-supplied firmware
configuration, is then unpinned unless given too).  A firmware-only digest accepts any OS booted on
that firmware.  See docs/policies.md for every setting.

Example::

    platforms: [snp, tdx]
    accepted_tcb_statuses: [UpToDate]
    snp:
      measurements:
        - {measurement: "<96 hex>", kernel_hashes: true}
      min_tcb: {bootloader: 3, snp: 8, microcode: 115}
    tdx:
      measurements:
        - {mrtd: "<96 hex>", rtmr0: "<96 hex>", rtmr1: "<96 hex>", rtmr2: "<96 hex>"}
        - mrtd: "<96 hex>"
          boot: {kernel: "<96 hex>", initrd: "<96 hex>", cmdline: "console=ttyS0 ro initrd=initrd"}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

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
# Example policies carry "REPLACE..." where an operator's own value belongs; loading one refuses to run.
PLACEHOLDER_PREFIX = "replace"

# Named bits an appraisal rule may require or forbid (AMD SEV-SNP ABI: guest POLICY and PLATFORM_INFO;
# Intel TDX module ABI: TDATTRIBUTES).  Bit numbers in the little-endian value.
SNP_GUEST_POLICY_BITS = {
    "SMT": 16, "MIGRATE_MA": 18, "DEBUG": 19, "SINGLE_SOCKET": 20, "CXL_ALLOW": 21, "MEM_AES_256_XTS": 22,
    "RAPL_DIS": 23, "CIPHERTEXT_HIDING_DRAM": 24, "PAGE_SWAP_DISABLE": 25,
}
SNP_PLATFORM_INFO_BITS = {
    "SMT_EN": 0, "TSME_EN": 1, "ECC_EN": 2, "RAPL_DIS": 3, "CIPHERTEXT_HIDING_DRAM_EN": 4,
    "ALIAS_CHECK_COMPLETE": 5, "SEV_TIO_EN": 7,
}
TD_ATTRIBUTE_BITS = {"DEBUG": 0, "SEPT_VE_DISABLE": 28, "MIGRATABLE": 29, "PKS": 30, "KL": 31, "PERFMON": 63}
# The RTMRs a TD's boot chain extends: 0 firmware configuration, 1 kernel/initrd, 2 command line (3: runtime).
TDX_BOOT_RTMRS = ("rtmr0", "rtmr1", "rtmr2")


def _hex_of(n_bytes: int):
    def check(value: str) -> str:
        text = value.strip().lower()
        if text.startswith(PLACEHOLDER_PREFIX):
            raise ValueError("is a placeholder from an example policy: put your image's value here")
        if text.startswith("0x"):
            text = text[2:]
        if not _HEX.fullmatch(text) or len(text) != 2 * n_bytes:
            raise ValueError(f"must be {2 * n_bytes} hex digits ({n_bytes} bytes)")
        return text

    return AfterValidator(check)


Hex8 = Annotated[str, _hex_of(8)]
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


class SnpMeasurement(_Strict):
    """One accepted SNP launch digest.  ``kernel_hashes`` says it was computed with QEMU ``kernel-hashes=on``,
    so it covers the kernel, initrd and command line as well as the firmware; only such entries make a policy
    measured.  A bare hex string in the allowlist means ``{measurement: <hex>, kernel_hashes: false}``."""

    measurement: Hex48
    kernel_hashes: bool = False


def _measurement_entry(value: Any) -> Any:
    return {"measurement": value} if isinstance(value, str) else value


class _BitsRule(_Strict):
    """Named bits a field must have set (``require``) or clear (``forbid``)."""

    @model_validator(mode="after")
    def _not_both(self) -> "_BitsRule":
        both = set(getattr(self, "require", ())) & set(getattr(self, "forbid", ()))
        if both:
            raise ValueError(f"both required and forbidden: {', '.join(sorted(both))}")
        return self


class SnpGuestPolicyRule(_BitsRule):
    """Bits of the guest POLICY the VM was launched with (beyond allow_debug / allow_smt / allow_migrate_ma)."""

    require: list[Literal[tuple(SNP_GUEST_POLICY_BITS)]] = Field(default_factory=list)  # type: ignore[valid-type]
    forbid: list[Literal[tuple(SNP_GUEST_POLICY_BITS)]] = Field(default_factory=list)  # type: ignore[valid-type]


class SnpPlatformInfoRule(_BitsRule):
    """PLATFORM_INFO: the host platform's configuration at report time; ``exact`` pins the whole value."""

    require: list[Literal[tuple(SNP_PLATFORM_INFO_BITS)]] = Field(default_factory=list)  # type: ignore[valid-type]
    forbid: list[Literal[tuple(SNP_PLATFORM_INFO_BITS)]] = Field(default_factory=list)  # type: ignore[valid-type]
    exact: Annotated[int, Field(ge=0, le=2**64 - 1)] | None = None


class TdAttributesRule(_BitsRule):
    """TDATTRIBUTES bits (beyond allow_debug / require_sept_ve_disable); ``exact`` is 16 hex digits in quote
    byte order, as the ``td_attributes`` claim shows it."""

    require: list[Literal[tuple(TD_ATTRIBUTE_BITS)]] = Field(default_factory=list)  # type: ignore[valid-type]
    forbid: list[Literal[tuple(TD_ATTRIBUTE_BITS)]] = Field(default_factory=list)  # type: ignore[valid-type]
    exact: Hex8 | None = None


class XfamRule(_Strict):
    """XFAM (the extended CPU features the TD may use), in quote byte order as the ``xfam`` claim shows it:
    ``exact`` the whole value, or ``mask`` + ``value``: the bits under the mask must equal value's."""

    exact: Hex8 | None = None
    mask: Hex8 | None = None
    value: Hex8 | None = None

    @model_validator(mode="after")
    def _one_form(self) -> "XfamRule":
        if (self.mask is None) != (self.value is None):
            raise ValueError("mask and value go together")
        if self.exact is not None and self.mask is not None:
            raise ValueError("give exact or mask/value, not both")
        if self.exact is None and self.mask is None:
            raise ValueError("give exact or mask/value")
        if self.mask is not None and int(self.value, 16) & ~int(self.mask, 16):  # type: ignore[arg-type]
            raise ValueError("value sets bits outside mask")
        return self


_FIRMWARE_VERSION = re.compile(r"(\d{1,3})\.(\d{1,3})(?:\.(\d{1,3}))?")


def _firmware_version(value: str) -> str:
    match = _FIRMWARE_VERSION.fullmatch(value.strip())
    if not match or any(int(g) > 255 for g in match.groups() if g is not None):
        raise ValueError('must be "MAJOR.MINOR" or "MAJOR.MINOR.BUILD" (each 0-255), e.g. "1.55.21"')
    major, minor, build = match.groups()
    return f"{int(major)}.{int(minor)}.{int(build or 0)}"


class SnpPolicy(_Strict):
    measurements: list[Annotated[SnpMeasurement, BeforeValidator(_measurement_entry)]] = Field(
        default_factory=list, max_length=1024)
    min_tcb: SnpMinTcb = Field(default_factory=SnpMinTcb)
    # LAUNCH_TCB: the TCB the guest was launched under (REPORTED_TCB can be lowered by the host later).
    min_launch_tcb: SnpMinTcb = Field(default_factory=SnpMinTcb)
    # SEV firmware version: both CURRENT and COMMITTED (the rollback floor) must be at least this.
    min_firmware: Annotated[str, AfterValidator(_firmware_version)] | None = None
    min_guest_svn: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    allow_debug: bool = False
    allow_migrate_ma: bool = False
    allow_smt: bool = False
    # The VMPL the report was requested from; null accepts any (software below VMPL 0 did not ask).
    vmpl: Annotated[int, Field(ge=0, le=3)] | None = 0
    host_data: Hex32 | None = None
    guest_policy: SnpGuestPolicyRule | None = None
    platform_info: SnpPlatformInfoRule | None = None
    # ID block: the ID key (and optionally author key) that signed it, and the family/image ids it names.
    id_key_digests: list[Hex48] = Field(default_factory=list, max_length=64)
    author_key_digests: list[Hex48] = Field(default_factory=list, max_length=64)
    family_id: Hex16 | None = None
    image_id: Hex16 | None = None
    signing_keys: list[Literal["VCEK", "VLEK"]] = Field(default_factory=lambda: ["VCEK", "VLEK"], min_length=1)
    # The AMD CRL reaches a verifier inside evidence the (untrusted) host assembles, so without this a
    # host can skip the revocation check by leaving the CRL out (or offering the other key kind's); true
    # refuses evidence without a current CRL covering its ASK/ASVK (unless a KDS client is given to fetch it).
    require_crl: bool = False


class TdxBootEvents(_Strict):
    """What a TD's CC event log must show was booted, appraised once the log replays to the quote's RTMRs.

    Digests are the SHA-384 values the events extended: the kernel's as its loader measured it (direct boot:
    TDVF's PE Authenticode digest of the EFI-stub kernel; GRUB: the file's SHA-384), the initrd's, and the
    command line given as ``cmdline`` (its exact text as measured: for direct boot OVMF appends
    " initrd=initrd" when there is an initrd, and the EFI stub hashes it as UTF-16LE with its NUL) or as
    ``cmdline_sha384``.  ``initrd`` must be given: null means no initrd may be loaded.  Every EFI application
    the log records must be the direct-boot kernel or listed in ``efi_applications`` (shim, GRUB, ...), and
    every other RTMR1/RTMR2 event must be explained by its data or listed in ``other_events``.
    """

    kernel: Hex48
    initrd: Hex48 | None
    cmdline: Annotated[str, Field(max_length=4096)] | None = None
    cmdline_sha384: Hex48 | None = None
    efi_applications: list[Hex48] = Field(default_factory=list, max_length=16)
    # Further RTMR1/RTMR2 events whose digest their data does not explain (GRUB's grub.cfg, shim's MokList...):
    # an event's type and data are not covered by the replay, so every such digest must be pinned somewhere.
    other_events: list[Hex48] = Field(default_factory=list, max_length=64)

    @model_validator(mode="after")
    def _one_cmdline(self) -> "TdxBootEvents":
        if (self.cmdline is None) == (self.cmdline_sha384 is None):
            raise ValueError("give the kernel command line as cmdline (text) or cmdline_sha384, exactly one")
        return self


class TdxMeasurement(_Strict):
    """One accepted TD build: MRTD and, optionally, the RTMR values it must show and the boot events its CC
    event log must record (``boot``; evidence without a log that replays then matches no such entry)."""

    mrtd: Hex48
    rtmr0: Hex48 | None = None
    rtmr1: Hex48 | None = None
    rtmr2: Hex48 | None = None
    rtmr3: Hex48 | None = None
    boot: TdxBootEvents | None = None


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
    td_attributes: TdAttributesRule | None = None
    xfam: XfamRule | None = None
    # Intel's TCB recovery counter: TCB info and QE identity both carry it. An older document stays signed and
    # current until its nextUpdate (30 days), so a host can keep serving the one issued before a TCB recovery,
    # under which an out-of-date platform still reads UpToDate; a minimum here refuses collateral that old.
    min_tcb_evaluation_data_number: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None
    # Without Intel collateral (TCB info, QE identity, PCK and root CA CRLs) a quote proves nothing about
    # revocation or TCB currency: a revoked or OutOfDate platform would pass. The enclave attaches it to its
    # evidence (from the host's PCS mirror; Intel-signed, so the mirror cannot forge it) and a verifier
    # given a PcsClient uses its own instead; false accepts signatures alone.
    require_collateral: bool = True


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

    def measurement_gaps(self) -> dict[str, str]:
        """Allowed hardware platform -> why this policy does not pin its whole boot chain (empty: measured).

        The one definition of "measured": SNP, every allowlisted launch digest has ``kernel_hashes: true``;
        TDX, every entry pins MRTD and RTMR0, RTMR1 and RTMR2, or MRTD and ``boot`` events.  An empty allowlist is unmeasured; simulated
        evidence (sim) always is, whatever it lists.
        """
        return {platform: gap for platform in self.platforms if (gap := _measurement_gap(self, platform))}

    def unmeasured_platforms(self) -> list[str]:
        """Allowed platforms whose boot chain this policy does not pin (sim: always)."""
        return list(self.measurement_gaps())

    def is_measured(self, platform: str | None) -> bool:
        """Whether evidence of this platform was compared with a whole measured boot chain (never for sim)."""
        return platform in ("snp", "tdx") and _measurement_gap(self, platform) is None

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


def _pins_a_measurement(rtmr: str | None) -> bool:
    """An RTMR value that records something: all zeros is the reset value, so nothing was measured into it."""
    return rtmr is not None and any(ch != "0" for ch in rtmr)


def _measurement_gap(policy: Policy, platform: str) -> str | None:
    if platform == "sim":
        # No hardware measured anything: the simulated root's key is a file, and whoever reads it (on the
        # host's disk, outside a development machine) signs any report, with any measurement, for any key.
        return "simulated evidence: no hardware measures the boot chain (the root's key is a file)"
    if platform == "snp":
        entries = policy.snp.measurements
        if not entries:
            return "no measurement allowlist"
        firmware_only = [str(i) for i, m in enumerate(entries) if not m.kernel_hashes]
        if firmware_only:
            one = len(firmware_only) == 1
            return (f"snp.measurements entr{'y' if one else 'ies'} {', '.join(firmware_only)} "
                    f"lack{'s' if one else ''} kernel_hashes: true (a firmware-only digest accepts any kernel, initrd and command line)")
        return None
    entries_t = policy.tdx.measurements
    if not entries_t:
        return "no measurement allowlist"
    partial = [f"{i} (no {', '.join(r.upper() for r in unpinned)})" for i, m in enumerate(entries_t)
               if m.boot is None
               and (unpinned := [r for r in TDX_BOOT_RTMRS if not _pins_a_measurement(getattr(m, r))])]
    if partial:
        return ("tdx.measurements entries must pin MRTD and RTMR0-2 (or MRTD and the CC event log's boot events: "
                "boot.kernel, initrd, cmdline; MRTD covers only the firmware; an all-zero RTMR is the reset "
                "value, nothing measured): " + ", ".join(partial))
    return None


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
        "allow_unmeasured: true   # simulated evidence measures nothing: the attested client refuses it without this\n"
        "snp:\n"
        "  vmpl: 0\n"
        "  require_crl: true   # the sim issues its own ARK-signed CRL; evidence without it is refused\n"
    )


DEFAULT_POLICY = Policy(
    name="default (evidence only)",
    platforms=["snp", "tdx"],
    accepted_tcb_statuses=["UpToDate"],
    snp=SnpPolicy(allow_debug=False, allow_migrate_ma=True, allow_smt=True, vmpl=None),
    tdx=TdxPolicy(allow_debug=False, require_sept_ve_disable=False, allow_service_td=True),
)
