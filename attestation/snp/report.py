"""Strict parser of the SEV-SNP ATTESTATION_REPORT structure (SNP firmware ABI, 0x4A0 bytes).

Every integer is little-endian. Versions 2, 3 and 5 are understood; version 4 (embargoed, seen on
some Milan firmware) has the version-3 layout. Every reserved / must-be-zero field is checked so
that a report this module accepts has exactly one meaning.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ..errors import ParseError
from .tcb import decode_tcb, family_from_name

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
SIGNATURE_ALGO_ECDSA_P384_SHA384 = 1

SIGNING_KEY_VCEK = 0
SIGNING_KEY_VLEK = 1
SIGNING_KEY_NAMES = {SIGNING_KEY_VCEK: "VCEK", SIGNING_KEY_VLEK: "VLEK"}

# GUEST_POLICY bits.
POLICY_SMT = 1 << 16
POLICY_RESERVED_ONE = 1 << 17
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20
POLICY_CXL_ALLOW = 1 << 21
POLICY_MEM_AES_256_XTS = 1 << 22
POLICY_RAPL_DIS = 1 << 23
POLICY_CIPHERTEXT_HIDING = 1 << 24
POLICY_PAGE_SWAP_DISABLE = 1 << 25
POLICY_MBZ_MASK = ~((1 << 26) - 1) & 0xFFFF_FFFF_FFFF_FFFF

# Signer info word at 0x48.
SIGNER_AUTHOR_KEY_EN = 1 << 0
SIGNER_MASK_CHIP_KEY = 1 << 1
SIGNER_MBZ_MASK = ~0x1F & 0xFFFF_FFFF

# One struct for the whole report: parsing costs a single unpack.
_LAYOUT = struct.Struct(
    "<"
    "I"  # 0x000 VERSION
    "I"  # 0x004 GUEST_SVN
    "Q"  # 0x008 POLICY
    "16s"  # 0x010 FAMILY_ID
    "16s"  # 0x020 IMAGE_ID
    "I"  # 0x030 VMPL
    "I"  # 0x034 SIGNATURE_ALGO
    "Q"  # 0x038 CURRENT_TCB
    "Q"  # 0x040 PLATFORM_INFO
    "I"  # 0x048 signer info
    "I"  # 0x04C reserved
    "64s"  # 0x050 REPORT_DATA
    "48s"  # 0x090 MEASUREMENT
    "32s"  # 0x0C0 HOST_DATA
    "48s"  # 0x0E0 ID_KEY_DIGEST
    "48s"  # 0x110 AUTHOR_KEY_DIGEST
    "32s"  # 0x140 REPORT_ID
    "32s"  # 0x160 REPORT_ID_MA
    "Q"  # 0x180 REPORTED_TCB
    "BBB"  # 0x188 CPUID_FAM_ID, CPUID_MOD_ID, CPUID_STEP (v>=3)
    "21s"  # 0x18B reserved
    "64s"  # 0x1A0 CHIP_ID
    "Q"  # 0x1E0 COMMITTED_TCB
    "BBBB"  # 0x1E8 CURRENT_BUILD, CURRENT_MINOR, CURRENT_MAJOR, reserved
    "BBBB"  # 0x1EC COMMITTED_BUILD, COMMITTED_MINOR, COMMITTED_MAJOR, reserved
    "Q"  # 0x1F0 LAUNCH_TCB
    "Q"  # 0x1F8 LAUNCH_MIT_VECTOR (v5)
    "Q"  # 0x200 CURRENT_MIT_VECTOR (v5)
    "152s"  # 0x208 reserved
    "72s"  # 0x2A0 SIGNATURE R (little-endian, zero-extended)
    "72s"  # 0x2E8 SIGNATURE S
    "368s"  # 0x330 reserved
)
assert _LAYOUT.size == REPORT_SIZE

_P384_BYTES = 48


@dataclass(frozen=True)
class Report:
    """A parsed ATTESTATION_REPORT. TCB fields are raw u64 values: their layout depends on the
    product (see ``attestation.snp.tcb``). CPUID fields and mitigation vectors are None when the
    report version does not carry them."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: int
    signer_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: int
    current_build: int
    current_minor: int
    current_major: int
    committed_build: int
    committed_minor: int
    committed_major: int
    launch_tcb: int
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: int
    signature_s: int

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_SIZE]

    @property
    def author_key_en(self) -> bool:
        return bool(self.signer_info & SIGNER_AUTHOR_KEY_EN)

    @property
    def mask_chip_key(self) -> bool:
        return bool(self.signer_info & SIGNER_MASK_CHIP_KEY)

    @property
    def signing_key(self) -> int:
        return (self.signer_info >> 2) & 0x7

    @property
    def signing_key_name(self) -> str:
        return SIGNING_KEY_NAMES[self.signing_key]

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)

    @property
    def cpuid_fam_mod_step(self) -> str | None:
        if self.cpuid_fam_id is None:
            return None
        return f"{self.cpuid_fam_id:02x}{self.cpuid_mod_id:02x}{self.cpuid_step:02x}"


def _nonzero(b: bytes) -> bool:
    return b.count(0) != len(b)


def parse_report(data: bytes) -> Report:
    """Parse exactly ``REPORT_SIZE`` bytes; ParseError names the first field that is off."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError(f"SNP report must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) != REPORT_SIZE:
        raise ParseError(f"SNP report must be exactly {REPORT_SIZE} bytes, got {len(data)}")
    (
        version, guest_svn, policy, family_id, image_id, vmpl, sig_algo, current_tcb,
        platform_info, signer_info, reserved_4c, report_data, measurement, host_data,
        id_key_digest, author_key_digest, report_id, report_id_ma, reported_tcb,
        cpuid_fam, cpuid_mod, cpuid_step, reserved_18b, chip_id, committed_tcb,
        cur_build, cur_minor, cur_major, reserved_1eb,
        com_build, com_minor, com_major, reserved_1ef,
        launch_tcb, launch_mit, current_mit, reserved_208, sig_r, sig_s, reserved_330,
    ) = _LAYOUT.unpack(data)

    if version not in (2, 3, 4, 5):
        raise ParseError(f"unsupported SNP report version {version} (2, 3, 4 and 5 are known)")
    if sig_algo != SIGNATURE_ALGO_ECDSA_P384_SHA384:
        raise ParseError(f"SIGNATURE_ALGO {sig_algo} is not 1 (ECDSA P-384 with SHA-384)")
    if not policy & POLICY_RESERVED_ONE:
        raise ParseError("POLICY bit 17 (reserved, must be one) is zero")
    if policy & POLICY_MBZ_MASK:
        raise ParseError(f"POLICY {policy:#x} sets must-be-zero bits 26-63")
    if signer_info & SIGNER_MBZ_MASK:
        raise ParseError(f"signer info {signer_info:#x} sets must-be-zero bits 5-31")
    signing_key = (signer_info >> 2) & 0x7
    if signing_key not in SIGNING_KEY_NAMES:
        raise ParseError(f"SIGNING_KEY {signing_key} is neither VCEK (0) nor VLEK (1)")
    if reserved_4c:
        raise ParseError("reserved field at 0x04C is not zero")
    if version == 2:
        if cpuid_fam or cpuid_mod or cpuid_step or _nonzero(reserved_18b):
            raise ParseError("reserved bytes 0x188..0x1A0 are not zero in a version 2 report")
        fam: int | None = None
        mod: int | None = None
        step: int | None = None
    else:
        if _nonzero(reserved_18b):
            raise ParseError("reserved bytes 0x18B..0x1A0 are not zero")
        fam, mod, step = cpuid_fam, cpuid_mod, cpuid_step
    if signer_info & SIGNER_MASK_CHIP_KEY and _nonzero(chip_id):
        raise ParseError("MASK_CHIP_KEY is set but CHIP_ID is not zero")
    if reserved_1eb or reserved_1ef:
        raise ParseError("reserved byte after the current/committed firmware version is not zero")
    if version >= 5:
        launch_mit_vector: int | None = launch_mit
        current_mit_vector: int | None = current_mit
    else:
        if launch_mit or current_mit:
            raise ParseError(f"reserved bytes 0x1F8..0x208 are not zero in a version {version} report")
        launch_mit_vector = current_mit_vector = None
    if _nonzero(reserved_208):
        raise ParseError("reserved bytes 0x208..0x2A0 are not zero")
    if _nonzero(sig_r[_P384_BYTES:]) or _nonzero(sig_s[_P384_BYTES:]):
        raise ParseError("signature R/S exceed 48 bytes (P-384)")
    if _nonzero(reserved_330):
        raise ParseError("reserved signature bytes 0x330..0x4A0 are not zero")

    return Report(
        raw=data,
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=family_id,
        image_id=image_id,
        vmpl=vmpl,
        signature_algo=sig_algo,
        current_tcb=current_tcb,
        platform_info=platform_info,
        signer_info=signer_info,
        report_data=report_data,
        measurement=measurement,
        host_data=host_data,
        id_key_digest=id_key_digest,
        author_key_digest=author_key_digest,
        report_id=report_id,
        report_id_ma=report_id_ma,
        reported_tcb=reported_tcb,
        cpuid_fam_id=fam,
        cpuid_mod_id=mod,
        cpuid_step=step,
        chip_id=chip_id,
        committed_tcb=committed_tcb,
        current_build=cur_build,
        current_minor=cur_minor,
        current_major=cur_major,
        committed_build=com_build,
        committed_minor=com_minor,
        committed_major=com_major,
        launch_tcb=launch_tcb,
        launch_mit_vector=launch_mit_vector,
        current_mit_vector=current_mit_vector,
        signature_r=int.from_bytes(sig_r, "little"),
        signature_s=int.from_bytes(sig_s, "little"),
    )


def _tcb_parts(raw: int, product: str) -> dict[str, int | None]:
    t = decode_tcb(raw, product)
    return {"fmc": t.fmc, "bl": t.bl, "tee": t.tee, "snp": t.snp, "ucode": t.ucode}


def report_claims(report: Report, product: str) -> dict[str, Any]:
    """Claims in the key names and formats of the shared expected.json (see CONTRACTS), plus extras.

    ``product`` is the product family ("Milan", "Genoa", "Turin", ...; "Milan-B0" is read as
    "Milan"): it decides the TCB layout of the ``*_tcb_parts`` extras.
    """
    product = family_from_name(product)
    policy = report.policy
    mit = report.launch_mit_vector
    cmit = report.current_mit_vector
    return {
        "version": report.version,
        "guest_svn": report.guest_svn,
        "policy": f"{policy:#x}",
        "vmpl": report.vmpl,
        "signing_key": report.signing_key_name,
        "mask_chip_id": report.mask_chip_key,
        "author_key_en": report.author_key_en,
        "platform_info": f"{report.platform_info:#x}",
        "cpuid_fam_mod_step": report.cpuid_fam_mod_step,
        "reported_tcb": f"0x{report.reported_tcb:016x}",
        "current_tcb": f"0x{report.current_tcb:016x}",
        "committed_tcb": f"0x{report.committed_tcb:016x}",
        "launch_tcb": f"0x{report.launch_tcb:016x}",
        "measurement": report.measurement.hex(),
        "report_data": report.report_data.hex(),
        "host_data": report.host_data.hex(),
        "id_key_digest": report.id_key_digest.hex(),
        "family_id": report.family_id.hex(),
        "image_id": report.image_id.hex(),
        "chip_id": report.chip_id.hex(),
        # extras
        "product": product,
        "debug": bool(policy & POLICY_DEBUG),
        "smt_allowed": bool(policy & POLICY_SMT),
        "migrate_ma": bool(policy & POLICY_MIGRATE_MA),
        "single_socket": bool(policy & POLICY_SINGLE_SOCKET),
        "abi_major": (policy >> 8) & 0xFF,
        "abi_minor": policy & 0xFF,
        "author_key_digest": report.author_key_digest.hex(),
        "report_id": report.report_id.hex(),
        "report_id_ma": report.report_id_ma.hex(),
        "current_version": f"{report.current_major}.{report.current_minor}.{report.current_build}",
        "committed_version": f"{report.committed_major}.{report.committed_minor}.{report.committed_build}",
        "launch_mit_vector": None if mit is None else f"0x{mit:016x}",
        "current_mit_vector": None if cmit is None else f"0x{cmit:016x}",
        "reported_tcb_parts": _tcb_parts(report.reported_tcb, product),
        "current_tcb_parts": _tcb_parts(report.current_tcb, product),
        "committed_tcb_parts": _tcb_parts(report.committed_tcb, product),
        "launch_tcb_parts": _tcb_parts(report.launch_tcb, product),
    }
