"""Expected SEV-SNP launch measurement of the enclave VM, and a policy that pins it.

The digest itself is computed by the ``sev-snp-measure`` library (``sevsnpmeasure.guest``), the
tool Cube AI already uses for this; this module only checks the inputs first, so that a wrong or
non-SEV firmware image, a missing kernel or a bad vCPU type gives a LaunchError that says what is
wrong instead of a traceback from deep inside the library.

What the measurement covers (and therefore what ``host.launch`` must boot identically): the OVMF
image, the SEV metadata pages it declares, the kernel/initrd/command-line hash table (only when a
kernel is given: QEMU ``kernel-hashes=on``), and one VMSA per vCPU (count, CPU signature of the
vCPU type, guest SEV features).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from attestation.policy import policy_from_yaml

DEFAULT_VCPU_TYPE = "EPYC-v4"
DEFAULT_GUEST_FEATURES = 0x1  # VMSA SEV_FEATURES bit 0 (SNPActive); e.g. 0x21 adds DebugSwap (bit 5)
MAX_VCPUS = 1024
MAX_OVMF_BYTES = 64 * 1024 * 1024
PAGE = 4096
MEASUREMENT_BYTES = 48

# OVMF SEV metadata section types (edk2 OvmfPkg/ResetVector/X64/OvmfSevMetadata.asm)
SECTION_KERNEL_HASHES = 0x10
KNOWN_SECTIONS = {1: "SNP_SEC_MEM", 2: "SNP_SECRETS", 3: "CPUID", 4: "SVSM_CAA", 0x10: "SNP_KERNEL_HASHES"}


class LaunchError(ValueError):
    """An operator input for measuring or booting the enclave VM is missing or unusable."""


@dataclass(frozen=True)
class SnpLaunch:
    """Everything the SNP launch digest depends on; ``host.launch`` boots from the same object."""

    ovmf: Path
    vcpus: int
    vcpu_type: str = DEFAULT_VCPU_TYPE
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    guest_features: int = DEFAULT_GUEST_FEATURES

    @property
    def kernel_hashes(self) -> bool:
        """QEMU measures kernel/initrd/cmdline hashes exactly when it is given a kernel."""
        return self.kernel is not None


def vcpu_types() -> list[str]:
    from sevsnpmeasure.vcpu_types import CPU_SIGS

    return sorted(CPU_SIGS)


def _readable_file(path: Path | None, what: str) -> None:
    if path is None:
        return
    if not path.exists():
        raise LaunchError(f"{what} {path}: no such file")
    if not path.is_file():
        raise LaunchError(f"{what} {path}: not a regular file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise LaunchError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None


def check_launch(launch: SnpLaunch) -> None:
    """Validate everything but the firmware's contents (see ``inspect_ovmf``)."""
    from sevsnpmeasure.vcpu_types import CPU_SIGS

    if isinstance(launch.vcpus, bool) or not isinstance(launch.vcpus, int) or not 1 <= launch.vcpus <= MAX_VCPUS:
        raise LaunchError(f"--vcpus: must be a whole number from 1 to {MAX_VCPUS}, got {launch.vcpus!r}")
    if launch.vcpu_type not in CPU_SIGS:
        raise LaunchError(f"--vcpu-type: unknown {launch.vcpu_type!r}; one of {', '.join(vcpu_types())}")
    if not isinstance(launch.guest_features, int) or not 0 <= launch.guest_features < 1 << 64:
        raise LaunchError(f"--guest-features: must be a 64-bit value, got {launch.guest_features!r}")
    if launch.kernel is None and (launch.initrd is not None or launch.append is not None):
        raise LaunchError("--initrd and --append need --kernel (they are measured through the kernel hash table)")
    if launch.append is not None and "\x00" in launch.append:
        raise LaunchError("--append: must not contain a NUL character")
    _readable_file(launch.ovmf, "--ovmf")
    _readable_file(launch.kernel, "--kernel")
    _readable_file(launch.initrd, "--initrd")


@dataclass(frozen=True)
class OvmfSections:
    """The SEV metadata sections an OVMF image declares: (gpa, size, type) each."""

    sections: tuple[tuple[int, int, int], ...]

    def has(self, section_type: int) -> bool:
        return any(t == section_type for _, _, t in self.sections)


def inspect_ovmf(path: Path, *, need_kernel_hashes: bool = False) -> OvmfSections:
    """Parse the firmware as sev-snp-measure will, refusing what it would trip over.

    An SNP-capable OVMF carries, in its footer GUID table, an SEV-ES reset block and an SEV
    metadata pointer; the metadata ("ASEV", version 1) lists page-aligned sections. A plain
    (non-SEV) OVMF has neither and cannot launch an SNP guest.
    """
    from sevsnpmeasure.ovmf import OVMF

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise LaunchError(f"--ovmf {path}: cannot read ({exc.strerror or exc})") from None
    if size == 0 or size % PAGE or size > MAX_OVMF_BYTES:
        raise LaunchError(f"--ovmf {path}: {size} bytes is not a firmware image "
                          f"(expected a non-empty multiple of {PAGE} bytes, at most {MAX_OVMF_BYTES})")
    try:
        ovmf = OVMF(str(path))
    except (RuntimeError, ValueError, IndexError, OSError) as exc:
        raise LaunchError(f"--ovmf {path}: malformed SEV metadata ({exc})") from None
    if OVMF.SEV_ES_RESET_BLOCK_GUID not in ovmf._table or OVMF.OVMF_SEV_META_DATA_GUID not in ovmf._table:
        raise LaunchError(f"--ovmf {path}: no SEV metadata (footer GUID table lacks the SEV-ES reset block or "
                          "the SEV metadata pointer); use an SEV-capable OVMF build, e.g. OvmfPkg/AmdSev")
    if len(ovmf.table_item(OVMF.SEV_ES_RESET_BLOCK_GUID)) < 4:
        raise LaunchError(f"--ovmf {path}: SEV-ES reset block entry is truncated")
    sections = []
    for item in ovmf.metadata_items():
        gpa, length, kind = int(item.gpa), int(item.size), int(item.section_type_int)
        if kind not in KNOWN_SECTIONS:
            raise LaunchError(f"--ovmf {path}: SEV metadata section type {kind:#x} is unknown")
        if gpa % PAGE or length % PAGE or length == 0:
            raise LaunchError(f"--ovmf {path}: SEV metadata section {KNOWN_SECTIONS[kind]} at {gpa:#x} "
                              f"size {length:#x} is not page aligned")
        sections.append((gpa, length, kind))
    if not sections:
        raise LaunchError(f"--ovmf {path}: SEV metadata lists no sections; not an SNP-capable OVMF")
    found = OvmfSections(tuple(sections))
    if need_kernel_hashes:
        if not found.has(SECTION_KERNEL_HASHES):
            raise LaunchError(f"--ovmf {path}: no SNP_KERNEL_HASHES section, so the kernel, initrd and command "
                              "line cannot be measured; build OVMF from OvmfPkg/AmdSev (AmdSevX64.dsc) or boot "
                              "without --kernel")
        hashes = [(g, n) for g, n, t in sections if t == SECTION_KERNEL_HASHES]
        try:
            table_gpa = ovmf.sev_hashes_table_gpa()
        except (RuntimeError, ValueError) as exc:
            raise LaunchError(f"--ovmf {path}: {exc}") from None
        if any(n != PAGE for _, n in hashes) or not any(g <= table_gpa < g + n for g, n in hashes):
            raise LaunchError(f"--ovmf {path}: the SEV hash table ({table_gpa:#x}) is not inside a one-page "
                              "SNP_KERNEL_HASHES section")
    return found


def snp_measurement(launch: SnpLaunch) -> bytes:
    """The 48-byte SNP launch digest (MEASUREMENT in the attestation report)."""
    from sevsnpmeasure import guest
    from sevsnpmeasure.sev_mode import SevMode
    from sevsnpmeasure.vcpu_types import CPU_SIGS
    from sevsnpmeasure.vmm_types import VMMType

    check_launch(launch)
    inspect_ovmf(launch.ovmf, need_kernel_hashes=launch.kernel_hashes)
    try:
        digest = guest.calc_launch_digest(
            SevMode.SEV_SNP, launch.vcpus, CPU_SIGS[launch.vcpu_type], str(launch.ovmf),
            str(launch.kernel) if launch.kernel else None, str(launch.initrd) if launch.initrd else None,
            launch.append, launch.guest_features, "", VMMType.QEMU)
    except (RuntimeError, ValueError, AssertionError, OSError) as exc:
        raise LaunchError(f"cannot compute the SNP measurement: {exc}") from None
    if len(digest) != MEASUREMENT_BYTES:  # pragma: no cover - library contract
        raise LaunchError(f"sev-snp-measure returned {len(digest)} bytes, expected {MEASUREMENT_BYTES}")
    return digest


def _yaml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def snp_policy_yaml(measurement: bytes, launch: SnpLaunch, *, name: str | None = None,
                    firmware_only: bool = False, host_data: bytes | None = None) -> str:
    """An SNP policy allowing exactly this launch measurement (validated before returning).

    With a kernel the digest covers the whole boot chain and the entry says ``kernel_hashes: true`` (a
    measured policy).  Without one it covers only OVMF and the VMSAs, so any OS booted on that firmware
    matches: that policy is written only when asked (``firmware_only``), marked not for production, and
    the attested client refuses it unless ``allow_unmeasured: true`` is added by hand.

    ``host_data`` (an image's configuration SHA-256, which the launch passes as HOST_DATA and the enclave checks
    against the configuration it loaded) is pinned too, so the policy admits that configuration only.
    """
    if len(measurement) != MEASUREMENT_BYTES:
        raise LaunchError(f"measurement must be {MEASUREMENT_BYTES} bytes")
    if host_data is not None and len(host_data) != 32:
        raise LaunchError("host data must be 32 bytes (a SHA-256)")
    if not launch.kernel_hashes and not firmware_only:
        raise LaunchError("--policy-out without --kernel: the digest covers only the firmware, so any kernel, "
                          "initrd and command line would pass; measure with --kernel/--initrd/--append, or pass "
                          "--firmware-only to write a policy marked not for production")
    if launch.kernel_hashes and firmware_only:
        raise LaunchError("--firmware-only: this launch has a kernel, so its digest covers the whole boot chain")
    name = name or ("snp-enclave" if launch.kernel_hashes else "snp-firmware-only")
    described = [f"ovmf={launch.ovmf.name}", f"vcpus={launch.vcpus}", f"vcpu-type={launch.vcpu_type}",
                 f"guest-features={launch.guest_features:#x}",
                 f"kernel-hashes={'on' if launch.kernel_hashes else 'off'}"]
    if launch.kernel is not None:
        described.append(f"kernel={launch.kernel.name}")
    if launch.initrd is not None:
        described.append(f"initrd={launch.initrd.name}")
    if launch.kernel_hashes:
        lines = ["# SEV-SNP policy generated by `cube-host measure` for one guest image (whole boot chain):"]
    else:
        lines = [
            "# FIRMWARE-ONLY SEV-SNP policy generated by `cube-host measure --firmware-only`: NOT FOR PRODUCTION.",
            "# The digest covers OVMF and the vCPUs but no kernel, initrd or command line, so any OS booted on",
            "# this firmware matches. The attested client refuses it (it is not measured) unless you add",
            "# allow_unmeasured: true; use it to inspect evidence, and measure with --kernel for production.",
        ]
    lines.append("#   " + " ".join(described))
    if launch.append is not None:
        lines.append("#   append=" + launch.append.replace("\n", " ")[:200])
    lines += [
        "# Boot it with the same inputs (`cube-host qemu-cmd --platform snp ...`), or the measurement",
        "# will differ and this policy will refuse the enclave. Add min_tcb for your platform, e.g.",
        "#   min_tcb: {bootloader: 3, tee: 0, snp: 8, microcode: 115}",
        f"name: {_yaml_str(name)}",
        "platforms: [snp]",
        "accepted_tcb_statuses: [UpToDate]",
        "snp:",
        "  measurements:",
        f"    - {{measurement: \"{measurement.hex()}\", kernel_hashes: {'true' if launch.kernel_hashes else 'false'}}}",
        *([f"  host_data: \"{host_data.hex()}\"   # SHA-256 of the image's configuration (checked by the enclave)"]
          if host_data is not None else []),
        "  allow_debug: false",
        "  allow_migrate_ma: false",
        "  allow_smt: true          # QEMU's default guest policy (0x30000) allows SMT",
        "  vmpl: 0",
        "  signing_keys: [VCEK, VLEK]",
        "  require_crl: true        # the ASK/ASVK must be shown unrevoked by AMD's current CRL (the enclave attaches it)",
        "",
    ]
    text = "\n".join(lines)
    policy_from_yaml(text)  # PolicyError here would be a bug in this template; never write a bad policy
    return text


def write_policy(path: Path, text: str, *, overwrite: bool = False) -> None:
    """Write atomically; an existing file is kept unless ``overwrite`` (an operator's policy is not lost)."""
    if path.exists() and not overwrite:
        raise LaunchError(f"--policy-out {path}: exists; pass --force to replace it")
    if not path.parent.is_dir():
        raise LaunchError(f"--policy-out {path}: directory {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LaunchError(f"--policy-out {path}: cannot write ({exc.strerror or exc})") from None
