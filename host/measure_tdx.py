"""Expected TDX measurements of the enclave TD: MRTD from the TDVF firmware, and the boot events TDVF and
the Linux EFI stub record for a direct kernel boot, plus a policy that pins them.

MRTD.  TDVF (OVMF built with TDX support) declares in its metadata which parts of the image the VMM
must copy into the TD and which of those it must measure.  The metadata is found through OVMF's
footer GUID table (the entry ``e47a6535-984a-4798-865e-4685a7bf8ec2`` holds its offset from the end of
the image); it starts with the "TDVF" descriptor and lists sections (file offset, raw size, guest
address, memory size, type, attributes).  For every section without PAGE_AUG the TDX module records
TDH.MEM.PAGE.ADD of each 4 KiB page, and for sections with MR_EXTEND it records TDH.MR.EXTEND of every
256-byte chunk: MRTD is one SHA-384 over 128-byte records (the operation's ASCII name, the GPA as a
little-endian u64 at byte 16) each followed, for MR.EXTEND, by the chunk.  Current QEMU/KVM add and
extend page by page (``single``); some earlier TDX stacks added every page first (``two-pass``).

Boot events (direct boot: QEMU ``-kernel/-initrd/-append`` with TDVF), as the CC event log shows them:
- RTMR1, EV_EFI_BOOT_SERVICES_APPLICATION: the PE Authenticode SHA-384 of the kernel *as QEMU hands it
  to the firmware*: QEMU patches the bzImage setup header (loader type, heap end, command line and
  initrd addresses; the latter depend on the guest's memory size), so the digest is of that image;
- RTMR2, EV_EVENT_TAG "LOADED_IMAGE::LoadOptions" (the EFI stub): SHA-384 of the command line OVMF
  passes as LoadOptions: the -append text, plus " initrd=initrd" when there is an initrd, in UTF-16LE
  with a terminating NUL;
- RTMR2, EV_EVENT_TAG "Linux initrd" (the EFI stub, loading it through LoadFile2): SHA-384 of the initrd.
RTMR0 (TD HOB, ACPI tables, UEFI variables: chosen by the VMM) is not predicted; the policy pins the
events above instead, and a verifier replays the log against the quote's RTMRs before trusting them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from attestation.policy import policy_from_yaml
from attestation.tdx.eventlog import cmdline_digests

from .measure import MAX_OVMF_BYTES, PAGE, LaunchError

OVMF_FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
TDVF_METADATA_GUID = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2")
TDVF_SIGNATURE = b"TDVF"
TDVF_VERSION = 1
_ENTRY_HEADER = 18  # u16 size + 16-byte GUID, after each entry's data
_FOOTER_END = 32  # the table ends 32 bytes before the end of the image
MAX_SECTIONS = 64

SECTION_TYPES = {0: "BFV", 1: "CFV", 2: "TD_HOB", 3: "TEMP_MEM", 4: "PERM_MEM", 5: "PAYLOAD", 6: "PAYLOAD_PARAM"}
ATTR_MR_EXTEND = 1 << 0
ATTR_PAGE_AUG = 1 << 1
MR_EXTEND_CHUNK = 256
PAGE_ORDERS = ("single", "two-pass")

# QEMU's direct boot (hw/i386 x86_load_linux) on q35: the bzImage setup header fields it writes
ACPI_DATA_SIZE = 0x20000 + 0x8000
MAX_KERNEL_BYTES = 512 * 1024 * 1024
LINUX_INITRD_SUFFIX = " initrd=initrd"


@dataclass(frozen=True)
class TdvfSection:
    data_offset: int
    raw_data_size: int
    memory_address: int
    memory_data_size: int
    section_type: int
    attributes: int

    @property
    def type_name(self) -> str:
        return SECTION_TYPES.get(self.section_type, f"0x{self.section_type:x}")


def footer_table(firmware: bytes) -> dict[uuid.UUID, bytes]:
    """OVMF's footer GUID table: GUID -> entry data (empty when the image has no table)."""
    if len(firmware) < _FOOTER_END + _ENTRY_HEADER:
        return {}
    end = len(firmware) - _FOOTER_END
    size = int.from_bytes(firmware[end - _ENTRY_HEADER:end - 16], "little")
    if uuid.UUID(bytes_le=firmware[end - 16:end]) != OVMF_FOOTER_GUID:
        return {}
    if size < _ENTRY_HEADER or size > end:
        raise LaunchError(f"OVMF footer table size {size} is out of range")
    table = firmware[end - size:end - _ENTRY_HEADER]
    entries: dict[uuid.UUID, bytes] = {}
    while len(table) >= _ENTRY_HEADER:
        guid = uuid.UUID(bytes_le=table[-16:])
        length = int.from_bytes(table[-_ENTRY_HEADER:-16], "little")
        if length < _ENTRY_HEADER or length > len(table):
            raise LaunchError(f"OVMF footer table entry {guid} has size {length}, out of range")
        entries[guid] = table[len(table) - length:len(table) - _ENTRY_HEADER]
        table = table[:len(table) - length]
    return entries


def tdvf_sections(firmware: bytes) -> tuple[TdvfSection, ...]:
    """The TDVF metadata sections of a firmware image; LaunchError when it is no (usable) TDVF."""
    if not firmware or len(firmware) % PAGE or len(firmware) > MAX_OVMF_BYTES:
        raise LaunchError(f"{len(firmware)} bytes is not a firmware image (a non-empty multiple of {PAGE} bytes, "
                          f"at most {MAX_OVMF_BYTES})")
    entry = footer_table(firmware).get(TDVF_METADATA_GUID)
    if entry is None:
        raise LaunchError("no TDVF metadata (the OVMF footer table has no TDX metadata offset entry): "
                          "not a TDX-capable OVMF build")
    if len(entry) < 4:
        raise LaunchError("TDVF metadata offset entry is truncated")
    offset = len(firmware) - int.from_bytes(entry[:4], "little")
    if not 0 <= offset <= len(firmware) - 16:
        raise LaunchError("TDVF metadata offset points outside the image")
    signature, length, version, count = struct.unpack_from("<4sIII", firmware, offset)
    if signature != TDVF_SIGNATURE:
        raise LaunchError("TDVF metadata has no 'TDVF' signature")
    if version != TDVF_VERSION:
        raise LaunchError(f"TDVF metadata version {version} is not {TDVF_VERSION}")
    if not 1 <= count <= MAX_SECTIONS or length < 16 + 32 * count or offset + length > len(firmware):
        raise LaunchError(f"TDVF metadata lists {count} sections in {length} bytes: inconsistent")
    sections = []
    for i in range(count):
        s = TdvfSection(*struct.unpack_from("<IIQQII", firmware, offset + 16 + 32 * i))
        where = f"TDVF section {i} ({s.type_name})"
        if s.section_type not in SECTION_TYPES:
            raise LaunchError(f"{where}: unknown type")
        if s.attributes & ~(ATTR_MR_EXTEND | ATTR_PAGE_AUG):
            raise LaunchError(f"{where}: unknown attribute bits {s.attributes:#x}")
        if s.memory_address % PAGE or s.memory_data_size % PAGE or not s.memory_data_size:
            raise LaunchError(f"{where}: guest range {s.memory_address:#x}+{s.memory_data_size:#x} is not whole pages")
        if s.raw_data_size > s.memory_data_size or s.data_offset + s.raw_data_size > len(firmware):
            raise LaunchError(f"{where}: raw data {s.data_offset:#x}+{s.raw_data_size:#x} does not fit")
        if s.attributes & ATTR_MR_EXTEND and s.attributes & ATTR_PAGE_AUG:
            raise LaunchError(f"{where}: PAGE_AUG pages are accepted by the guest, they cannot be extended")
        sections.append(s)
    return tuple(sections)


def _record(op: bytes, gpa: int) -> bytes:
    return (op.ljust(16, b"\x00") + gpa.to_bytes(8, "little")).ljust(128, b"\x00")


def _section_memory(firmware: bytes, s: TdvfSection) -> bytes:
    return firmware[s.data_offset:s.data_offset + s.raw_data_size].ljust(s.memory_data_size, b"\x00")


def mrtd(firmware: bytes, *, page_order: str = "single") -> bytes:
    """The MRTD a TD booted from this TDVF image shows (see the module docstring)."""
    if page_order not in PAGE_ORDERS:
        raise LaunchError(f"page order must be one of {', '.join(PAGE_ORDERS)}")
    sections = tdvf_sections(firmware)
    digest = hashlib.sha384()

    def add(s: TdvfSection, page: int) -> None:
        digest.update(_record(b"MEM.PAGE.ADD", s.memory_address + page))

    def extend(s: TdvfSection, memory: bytes, page: int) -> None:
        for chunk in range(page, page + PAGE, MR_EXTEND_CHUNK):
            digest.update(_record(b"MR.EXTEND", s.memory_address + chunk))
            digest.update(memory[chunk:chunk + MR_EXTEND_CHUNK])

    if page_order == "single":
        for s in sections:
            if s.attributes & ATTR_PAGE_AUG:
                continue
            memory = _section_memory(firmware, s) if s.attributes & ATTR_MR_EXTEND else b""
            for page in range(0, s.memory_data_size, PAGE):
                add(s, page)
                if memory:
                    extend(s, memory, page)
    else:
        for s in sections:
            if not s.attributes & ATTR_PAGE_AUG:
                for page in range(0, s.memory_data_size, PAGE):
                    add(s, page)
        for s in sections:
            if s.attributes & ATTR_MR_EXTEND:
                memory = _section_memory(firmware, s)
                for page in range(0, s.memory_data_size, PAGE):
                    extend(s, memory, page)
    return digest.digest()


# -- PE Authenticode ---------------------------------------------------------------------------------

def authenticode_sha384(image: bytes) -> bytes:
    """The PE Authenticode SHA-384 digest TDVF measures for an EFI application."""
    return authenticode_digest(image, "sha384")


def authenticode_digest(image: bytes, algorithm: str) -> bytes:
    """PE Authenticode digest: the headers without the checksum and the certificate table entry, the
    sections in file order, then any data after them other than the certificate table."""
    try:
        if image[:2] != b"MZ":
            raise LaunchError("not a PE image (no MZ header): the kernel must be built with the EFI stub")
        pe = int.from_bytes(image[0x3C:0x40], "little")
        if image[pe:pe + 4] != b"PE\x00\x00":
            raise LaunchError("not a PE image (no PE signature): the kernel must be built with the EFI stub")
        sections_count = int.from_bytes(image[pe + 6:pe + 8], "little")
        optional_size = int.from_bytes(image[pe + 20:pe + 22], "little")
        opt = pe + 24
        magic = int.from_bytes(image[opt:opt + 2], "little")
        if magic not in (0x10B, 0x20B):
            raise LaunchError(f"PE optional header magic {magic:#x} is neither PE32 nor PE32+")
        directories = opt + (96 if magic == 0x10B else 112)
        rva_count = int.from_bytes(image[directories - 4:directories], "little")
        headers_size = int.from_bytes(image[opt + 60:opt + 64], "little")
        checksum = opt + 64
        if headers_size > len(image) or directories > headers_size:
            raise LaunchError("PE headers are larger than the image")
        digest = hashlib.new(algorithm, image[:checksum])
        cert_size = 0
        if rva_count > 4:
            cert_entry = directories + 4 * 8
            cert_size = int.from_bytes(image[cert_entry + 4:cert_entry + 8], "little")
            digest.update(image[checksum + 4:cert_entry])
            digest.update(image[cert_entry + 8:headers_size])
        else:
            digest.update(image[checksum + 4:headers_size])
        table = opt + optional_size
        raw = []
        for i in range(sections_count):
            entry = table + 40 * i
            size, pointer = struct.unpack_from("<II", image, entry + 16)
            if size:
                raw.append((pointer, size))
        hashed = headers_size
        for pointer, size in sorted(raw):
            if pointer + size > len(image):
                raise LaunchError("a PE section extends past the end of the image")
            digest.update(image[pointer:pointer + size])
            hashed += size
        if len(image) > hashed + cert_size:
            digest.update(image[hashed:len(image) - cert_size])
        return digest.digest()
    except struct.error:
        raise LaunchError("PE image is truncated") from None


def qemu_patched_kernel(kernel: bytes, *, initrd_size: int, memory_bytes: int) -> bytes:
    """The bzImage as QEMU's direct boot hands it to the firmware (q35): setup header fields patched.

    The initrd address QEMU writes depends on the guest's RAM below 4 GiB (q35: all of it up to 2.75 GiB,
    else 2 GiB), so the kernel's digest depends on the memory size given to QEMU.
    """
    data = bytearray(kernel)
    if len(data) < 0x240 or data[0x202:0x206] != b"HdrS":
        raise LaunchError("not a Linux bzImage (no 'HdrS' setup header)")
    protocol = int.from_bytes(data[0x206:0x208], "little")
    if protocol < 0x200 or not data[0x211] & 0x01:
        raise LaunchError(f"boot protocol {protocol:#x} without LOADED_HIGH: too old for direct EFI boot")
    real_addr, cmdline_addr = 0x10000, 0x20000
    data[0x210] = 0xB0  # type_of_loader: QEMU
    data[0x211] |= 0x80  # loadflags: CAN_USE_HEAP
    data[0x224:0x226] = (cmdline_addr - real_addr - 0x200).to_bytes(2, "little")  # heap_end_ptr
    data[0x228:0x22C] = cmdline_addr.to_bytes(4, "little")  # cmd_line_ptr
    if initrd_size:
        if protocol >= 0x20C and int.from_bytes(data[0x236:0x238], "little") & 0x40:
            initrd_max = 0xFFFFFFFF
        elif protocol >= 0x203:
            initrd_max = int.from_bytes(data[0x22C:0x230], "little")
        else:
            initrd_max = 0x37FFFFFF
        lowmem = 0x80000000 if memory_bytes >= 0xB0000000 else 0xB0000000
        below_4g = min(memory_bytes, lowmem)
        if initrd_max >= below_4g - ACPI_DATA_SIZE:
            initrd_max = below_4g - ACPI_DATA_SIZE - 1
        if initrd_size >= initrd_max:
            raise LaunchError(f"initrd of {initrd_size} bytes does not fit below {initrd_max:#x}: give the TD more memory")
        data[0x218:0x21C] = ((initrd_max - initrd_size) & ~0xFFF).to_bytes(4, "little")  # ramdisk_image
        data[0x21C:0x220] = initrd_size.to_bytes(4, "little")  # ramdisk_size
    return bytes(data)


# -- the prediction and its policy ----------------------------------------------------------------------

@dataclass(frozen=True)
class TdxPrediction:
    mrtd: bytes
    kernel: bytes  # RTMR1 EV_EFI_BOOT_SERVICES_APPLICATION digest
    initrd: bytes | None  # RTMR2 "Linux initrd" digest
    cmdline: str  # the LoadOptions text the EFI stub measures
    cmdline_sha384: bytes  # RTMR2 "LOADED_IMAGE::LoadOptions" digest
    mrconfigid: bytes | None  # SHA-256 of the config file, then 16 zero bytes

    def to_json(self) -> dict:
        return {"mrtd": self.mrtd.hex(), "kernel": self.kernel.hex(),
                "initrd": self.initrd.hex() if self.initrd is not None else None, "cmdline": self.cmdline,
                "cmdline_sha384": self.cmdline_sha384.hex(),
                "mrconfigid": self.mrconfigid.hex() if self.mrconfigid is not None else None}


def mrconfigid_for(config: bytes) -> bytes:
    """The MRCONFIGID that binds a TD to this config: its SHA-256 followed by 16 zero bytes."""
    return hashlib.sha256(config).digest() + bytes(16)


def _read(path: Path, what: str, limit: int) -> bytes:
    try:
        if path.stat().st_size > limit:
            raise LaunchError(f"{what} {path}: larger than {limit} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise LaunchError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None


def predict_tdx(firmware: Path, kernel: Path, *, initrd: Path | None = None, append: str | None = None,
                memory_bytes: int, config: Path | None = None, page_order: str = "single") -> TdxPrediction:
    """MRTD and the direct-boot events of a TD booted with these inputs (see the module docstring)."""
    if append is not None and "\x00" in append:
        raise LaunchError("--append: must not contain a NUL character")
    if memory_bytes <= ACPI_DATA_SIZE:
        raise LaunchError("--memory: too small for a TD")
    fw = _read(firmware, "--ovmf", MAX_OVMF_BYTES)
    try:
        measured_mrtd = mrtd(fw, page_order=page_order)
    except LaunchError as exc:
        raise LaunchError(f"--ovmf {firmware}: {exc}") from None
    initrd_data = _read(initrd, "--initrd", MAX_KERNEL_BYTES) if initrd is not None else None
    kernel_data = _read(kernel, "--kernel", MAX_KERNEL_BYTES)
    try:
        patched = qemu_patched_kernel(kernel_data, initrd_size=len(initrd_data or b""), memory_bytes=memory_bytes)
        kernel_digest = authenticode_sha384(patched)
    except LaunchError as exc:
        raise LaunchError(f"--kernel {kernel}: {exc}") from None
    cmdline = (append or "") + (LINUX_INITRD_SUFFIX if initrd_data else "")
    return TdxPrediction(
        mrtd=measured_mrtd, kernel=kernel_digest,
        initrd=hashlib.sha384(initrd_data).digest() if initrd_data else None,
        cmdline=cmdline, cmdline_sha384=cmdline_digests(cmdline)["efi_stub"],
        mrconfigid=mrconfigid_for(_read(config, "--config", 1 << 20)) if config is not None else None)


def _yaml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def tdx_policy_yaml(p: TdxPrediction, *, name: str = "tdx-enclave", described: str = "") -> str:
    """A measured TDX policy: MRTD and the direct-boot events pinned (+ MRCONFIGID when a config was given)."""
    lines = [
        "# TDX policy generated by `cube-host measure --tdx` for one TD image (direct boot):",
        f"#   {described}" if described else "#",
        "# MRTD pins the TDVF firmware; the boot events pin kernel, initrd and command line, appraised",
        "# against the TD's CC event log after it replays to the quote's RTMRs (evidence without one is",
        "# refused). RTMR0 (ACPI tables, TD HOB, UEFI variables: chosen by the VMM) is not pinned.",
        f"name: {_yaml_str(name)}",
        "platforms: [tdx]",
        "accepted_tcb_statuses: [UpToDate]",
        "tdx:",
        "  measurements:",
        f"    - mrtd: \"{p.mrtd.hex()}\"",
        "      boot:",
        f"        kernel: \"{p.kernel.hex()}\"     # PE Authenticode SHA-384 of the kernel QEMU hands to TDVF",
        f"        initrd: {_yaml_str(p.initrd.hex()) if p.initrd is not None else 'null'}",
        f"        cmdline: {_yaml_str(p.cmdline)}",
        "        efi_applications: []   # direct boot: the kernel is the only EFI application",
        "        other_events: []       # and no other RTMR1/RTMR2 event with a digest its data does not explain",
    ]
    if p.mrconfigid is not None:
        lines.append(f"  mrconfigid: \"{p.mrconfigid.hex()}\"   # SHA-256 of the enclave config + 16 zero bytes")
    lines += [
        "  allow_debug: false",
        "  require_sept_ve_disable: true",
        "  allow_service_td: false",
        "  require_collateral: true",
        "",
    ]
    text = "\n".join(lines)
    policy = policy_from_yaml(text)  # a PolicyError here is a bug in this template: never write a bad policy
    assert policy.is_measured("tdx")
    return text


# -- `cube-host measure --tdx` ------------------------------------------------------------------------

def add_tdx_measure_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tdx", action="store_true", help="measure a TDX TD: MRTD and the direct-boot events")
    p.add_argument("--memory", default=None, help="--tdx: the TD's RAM, as given to QEMU (e.g. 8G): QEMU writes "
                                                  "an initrd address that depends on it into the kernel")
    p.add_argument("--config", type=Path, default=None, help="--tdx: the enclave config the TD is bound to "
                                                             "(MRCONFIGID = its SHA-256 + 16 zero bytes)")
    p.add_argument("--page-order", choices=PAGE_ORDERS, default="single",
                   help="--tdx: how the VMM adds TDVF pages (single: current QEMU/KVM)")
    p.add_argument("--json", action="store_true", help="--tdx: print the prediction as JSON")


def run_measure_tdx(args: argparse.Namespace, *, config_sha256: bytes | None = None) -> int:
    """``config_sha256``: the digest of a built image's config (``--image``), bound through MRCONFIGID."""
    import json

    from .launch import parse_memory_mib
    from .measure import write_policy

    if args.kernel is None:
        raise LaunchError("--tdx needs --kernel: MRTD alone covers only the firmware (any OS would pass)")
    if args.memory is None:
        raise LaunchError("--tdx needs --memory (the TD's RAM as given to QEMU, e.g. 8G)")
    if args.firmware_only:
        raise LaunchError("--firmware-only is for SNP; a TDX policy always pins the boot events")
    memory = parse_memory_mib(args.memory) * 1024 * 1024
    prediction = predict_tdx(args.ovmf, args.kernel, initrd=args.initrd, append=args.append, memory_bytes=memory,
                             config=args.config, page_order=args.page_order)
    if config_sha256 is not None and args.config is None:
        prediction = dataclasses.replace(prediction, mrconfigid=config_sha256 + bytes(16))
    if args.policy_out is not None:
        described = " ".join(x for x in (
            f"ovmf={args.ovmf.name}", f"kernel={args.kernel.name}",
            f"initrd={args.initrd.name}" if args.initrd else "", f"memory={args.memory}",
            f"config={args.config.name}" if args.config else "", f"page-order={args.page_order}") if x)
        write_policy(args.policy_out, tdx_policy_yaml(prediction, name=args.policy_name or "tdx-enclave",
                                                      described=described), overwrite=args.force)
    if args.json:
        print(json.dumps(prediction.to_json(), indent=1))
    else:
        for key, value in prediction.to_json().items():
            print(f"{key}: {value}")
    return 0
