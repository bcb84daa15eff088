"""The QEMU command line that boots the enclave VM as an SEV-SNP guest or a TDX trust domain.

This module only builds the argv; it never runs QEMU. For SNP it is built from the same
``SnpLaunch`` the measurement is computed from, so vCPU count, vCPU type, firmware, kernel, initrd,
command line and the kernel-hashes setting cannot drift apart between the two.

Flags follow Cube AI's QEMU scripts, in upstream-QEMU (9.1+) spelling:

* SNP: ``-machine q35,confidential-guest-support=sev0,memory-backend=ram1``,
  ``-object memory-backend-memfd,id=ram1,...``, ``-object sev-snp-guest,id=sev0,cbitpos=51,
  reduced-phys-bits=1,kernel-hashes=on|off``, OVMF via ``-bios`` (SNP firmware is measured into
  guest memory, not mapped as pflash).
* TDX: ``-object {"qom-type":"tdx-guest",...,"quote-generation-socket":{vsock cid 2 port 4050}}``,
  ``-machine q35,kernel_irqchip=split,confidential-guest-support=tdx,memory-backend=mem0,hpet=off``,
  ``-object memory-backend-memfd,id=mem0,...``, ``-bios OVMF``, ``-cpu host``.
* Both carry the image's configuration digest when one is given: SNP ``host-data=<base64 of 32 bytes>`` on the
  ``sev-snp-guest`` object (HOST_DATA), TDX ``"mrconfigid": <base64 of 48 bytes>`` (the SHA-256 and 16 zero
  bytes). The enclave refuses to serve unless it equals the SHA-256 of the configuration it loaded.
* ``sim``: a plain q35 VM (KVM, or TCG where KVM cannot run a guest) for machines without SEV-SNP or TDX; the
  image must then say ``cube.simulate=1`` and its evidence proves nothing.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .measure import MAX_OVMF_BYTES, LaunchError, SnpLaunch, check_launch, inspect_ovmf

SNP_CBITPOS = 51
SNP_REDUCED_PHYS_BITS = 1
SNP_GUEST_POLICY = 0x30000  # QEMU's default: bit 17 reserved-must-be-one, bit 16 SMT allowed; debug (bit 19) clear
TDX_QGS_CID = 2  # the host, as seen from the guest's vsock
TDX_QGS_PORT = 4050  # Intel Quote Generation Service default
TDX_METADATA_GUID = "e47a6535-984a-4798-865e-4685a7bf8ec2"  # OVMF footer entry -> "TDVF" descriptor
MAX_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB
_MEMORY = re.compile(r"(?P<n>[0-9]{1,9})(?P<unit>[MGT]?)(?:i?B)?", re.IGNORECASE)
_FORWARD = re.compile(r"(?P<host>[0-9]{1,5}):(?P<guest>[0-9]{1,5})")


def parse_memory_mib(text: str) -> int:
    """``8G``, ``10240M``, ``1T`` or a bare number of MiB (as QEMU's ``-m`` reads it)."""
    match = _MEMORY.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise LaunchError(f"--memory: {text!r} is not a size like 8G or 10240M")
    mib = int(match["n"]) * {"": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[match["unit"].upper()]
    if not 1 <= mib <= MAX_MEMORY_MIB:
        raise LaunchError(f"--memory: {text!r} is out of range (1M to 16T)")
    return mib


@dataclass(frozen=True)
class PortForward:
    host_port: int
    guest_port: int

    @classmethod
    def parse(cls, text: str) -> "PortForward":
        match = _FORWARD.fullmatch(text.strip())
        if match is None:
            raise LaunchError(f"--forward: {text!r} is not HOSTPORT:GUESTPORT")
        host, guest = int(match["host"]), int(match["guest"])
        if not (1 <= host <= 65535 and 1 <= guest <= 65535):
            raise LaunchError(f"--forward: {text!r}: ports must be 1 to 65535")
        return cls(host, guest)


@dataclass(frozen=True)
class VmSpec:
    """A confidential VM to boot. For SNP, ``snp`` carries the measured inputs."""

    platform: Literal["snp", "tdx", "sim"]
    ovmf: Path | None
    memory_mib: int
    vcpus: int
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    vcpu_type: str = "EPYC-v4"
    guest_features: int = 0x1
    disk: Path | None = None
    vsock_cid: int | None = None
    forwards: tuple[PortForward, ...] = field(default_factory=tuple)
    name: str = "cube-ai-vm"
    qemu: str = "qemu-system-x86_64"
    qgs_port: int = TDX_QGS_PORT
    # SNP HOST_DATA (32 bytes) / TDX MRCONFIGID (48 bytes): the image's configuration digest (see host_data_for)
    host_data: bytes | None = None
    accel: Literal["kvm", "tcg"] = "kvm"

    def snp_launch(self) -> SnpLaunch:
        if self.ovmf is None:
            raise LaunchError("--ovmf: needed to measure or boot a confidential guest")
        return SnpLaunch(ovmf=self.ovmf, vcpus=self.vcpus, vcpu_type=self.vcpu_type, kernel=self.kernel,
                         initrd=self.initrd, append=self.append, guest_features=self.guest_features)


def mrconfigid_for(host_data: bytes) -> bytes:
    """TDX MRCONFIGID (48 bytes) carrying a 32-byte configuration digest: the digest, then 16 zero bytes."""
    if len(host_data) != 32:
        raise LaunchError(f"host data must be 32 bytes (a SHA-256), got {len(host_data)}")
    return host_data + bytes(16)


def inspect_tdx_ovmf(path: Path) -> None:
    """Refuse firmware that cannot start a TD: a TDVF carries, in its OVMF footer GUID table, a
    pointer (u32 offset from the image end) to a "TDVF" metadata descriptor (version 1)."""
    from sevsnpmeasure.ovmf import OVMF

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise LaunchError(f"--ovmf {path}: cannot read ({exc.strerror or exc})") from None
    if size == 0 or size % 4096 or size > MAX_OVMF_BYTES:
        raise LaunchError(f"--ovmf {path}: {size} bytes is not a firmware image")
    try:
        ovmf = OVMF(str(path))
    except (RuntimeError, ValueError, IndexError, OSError) as exc:
        raise LaunchError(f"--ovmf {path}: malformed OVMF footer table ({exc})") from None
    try:
        entry = ovmf.table_item(TDX_METADATA_GUID)
    except KeyError:
        entry = b""
    data = ovmf.data()
    offset = int.from_bytes(entry[:4], "little") if len(entry) >= 4 else 0
    if not 16 <= offset <= len(data) or data[len(data) - offset:len(data) - offset + 4] != b"TDVF" \
            or int.from_bytes(data[len(data) - offset + 8:len(data) - offset + 12], "little") != 1:
        raise LaunchError(f"--ovmf {path}: no TDX metadata (TDVF descriptor); use a TDX-capable OVMF build")


def _option_value(path: Path | str) -> str:
    """A value inside a QEMU option list (``key=value,...``): commas are escaped by doubling."""
    return str(path).replace(",", ",,")


def _validate(spec: VmSpec) -> None:
    if spec.platform not in ("snp", "tdx", "sim"):
        raise LaunchError(f"--platform: {spec.platform!r} is not snp, tdx or sim")
    if spec.host_data is not None and len(spec.host_data) != 32:
        raise LaunchError(f"host data must be 32 bytes (a SHA-256), got {len(spec.host_data)}")
    if spec.accel not in ("kvm", "tcg") or (spec.accel == "tcg" and spec.platform != "sim"):
        raise LaunchError("--accel tcg: only for --platform sim (a confidential guest needs KVM)")
    if spec.platform != "sim" and spec.ovmf is None:
        raise LaunchError(f"--ovmf: needed for --platform {spec.platform}")
    if spec.platform == "sim":
        if spec.kernel is None:
            raise LaunchError("--platform sim boots an image's kernel: give --image or --kernel")
        # the same checks as a measured launch; without --ovmf QEMU's default BIOS boots the kernel
        check_launch(SnpLaunch(ovmf=spec.ovmf or spec.kernel, vcpus=spec.vcpus, kernel=spec.kernel,
                               initrd=spec.initrd, append=spec.append))
    elif spec.platform == "snp":
        launch = spec.snp_launch()
        check_launch(launch)
        inspect_ovmf(launch.ovmf, need_kernel_hashes=launch.kernel_hashes)
    else:
        assert spec.ovmf is not None
        check_launch(SnpLaunch(ovmf=spec.ovmf, vcpus=spec.vcpus, kernel=spec.kernel, initrd=spec.initrd,
                               append=spec.append))
        inspect_tdx_ovmf(spec.ovmf)
    if spec.disk is not None and not spec.disk.is_file():
        raise LaunchError(f"--disk {spec.disk}: no such file")
    if spec.vsock_cid is not None and not 3 <= spec.vsock_cid <= 0xFFFFFFFE:
        raise LaunchError(f"--vsock-cid: {spec.vsock_cid} is reserved or out of range (3 to 4294967294)")
    if not 1 <= spec.qgs_port <= 0xFFFFFFFF:
        raise LaunchError(f"--qgs-port: {spec.qgs_port} is out of range")
    seen: set[int] = set()
    for fwd in spec.forwards:
        if fwd.host_port in seen:
            raise LaunchError(f"--forward: host port {fwd.host_port} given twice")
        seen.add(fwd.host_port)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", spec.name):
        raise LaunchError(f"--name: {spec.name!r} must be 1-64 letters, digits, '.', '_' or '-'")


def _common_tail(spec: VmSpec) -> list[str]:
    argv: list[str] = []
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel)]
        if spec.initrd is not None:
            argv += ["-initrd", str(spec.initrd)]
        if spec.append is not None:
            argv += ["-append", spec.append]
    if spec.disk is not None:
        argv += ["-drive", f"file={_option_value(spec.disk)},format=raw,if=virtio"]
    if spec.forwards:
        # Bound to the host's loopback: the public entry point is `cube-host relay`, not QEMU's slirp.
        fwd = "".join(f",hostfwd=tcp:127.0.0.1:{f.host_port}-:{f.guest_port}" for f in spec.forwards)
        argv += ["-netdev", f"user,id=vmnic{fwd}",
                 "-device", "virtio-net-pci,disable-legacy=on,iommu_platform=true,netdev=vmnic,romfile="]
    if spec.vsock_cid is not None:
        argv += ["-device", f"vhost-vsock-pci,id=vhost-vsock-pci0,guest-cid={spec.vsock_cid}"]
    return argv


def qemu_argv(spec: VmSpec) -> list[str]:
    """Validated argv for ``spec`` (LaunchError on bad inputs)."""
    _validate(spec)
    mem = f"{spec.memory_mib}M"
    accel = ["-enable-kvm"] if spec.accel == "kvm" else ["-accel", "tcg"]
    argv = [spec.qemu, "-name", spec.name, *accel, "-nographic", "-no-reboot"]
    if spec.platform == "sim":
        # No SEV-SNP or TDX: for machines without them (development, CI). The guest runs the simulated
        # platform (its image command line says cube.simulate=1); nothing about this VM is attested.
        argv += ["-machine", "q35", "-smp", str(spec.vcpus), "-m", mem]
        if spec.ovmf is not None:
            argv += ["-bios", str(spec.ovmf)]
    elif spec.platform == "snp":
        kernel_hashes = "on" if spec.snp_launch().kernel_hashes else "off"
        argv += [
            "-machine", "q35,confidential-guest-support=sev0,memory-backend=ram1",
            "-cpu", spec.vcpu_type,
            "-smp", str(spec.vcpus),
            "-m", mem,
            "-object", f"memory-backend-memfd,id=ram1,size={mem},share=true,prealloc=false",
            "-object", (f"sev-snp-guest,id=sev0,policy={SNP_GUEST_POLICY:#x},cbitpos={SNP_CBITPOS},"
                        f"reduced-phys-bits={SNP_REDUCED_PHYS_BITS},kernel-hashes={kernel_hashes}"
                        + (f",host-data={base64.b64encode(spec.host_data).decode()}" if spec.host_data else "")),
            "-bios", str(spec.ovmf),
        ]
    else:
        tdx_object = {"qom-type": "tdx-guest", "id": "tdx",
                      "quote-generation-socket": {"type": "vsock", "cid": str(TDX_QGS_CID), "port": str(spec.qgs_port)}}
        if spec.host_data is not None:
            tdx_object["mrconfigid"] = base64.b64encode(mrconfigid_for(spec.host_data)).decode()
        argv += [
            "-machine", "q35,kernel_irqchip=split,confidential-guest-support=tdx,memory-backend=mem0,hpet=off",
            "-cpu", "host",
            "-smp", str(spec.vcpus),
            "-m", mem,
            "-object", f"memory-backend-memfd,id=mem0,size={mem}",
            "-object", json.dumps(tdx_object, separators=(",", ":")),
            "-bios", str(spec.ovmf),
            "-nodefaults", "-serial", "mon:stdio",
        ]
    return argv + _common_tail(spec)


def shell_line(argv: list[str]) -> str:
    return shlex.join(argv)
