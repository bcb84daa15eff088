"""`cube-host measure --tdx`: MRTD from TDVF metadata, the direct-boot event digests, and the policy.

Real data: Debian's OVMF.fd (bookworm's build carries TDVF metadata), and pesign (Debian) as an
independent PE Authenticode implementation.  MRTD is checked against a re-computation written here
from the TDX module's record layout (no TDX machine or other MRTD tool runs here)."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from attestation.appraise import appraise
from attestation.policy import policy_from_yaml
from attestation.tdx.eventlog import EV_EFI_BOOT_SERVICES_APPLICATION, EV_EVENT_TAG, boot_state, parse_event_log
from attestation.verdict import VerifiedEvidence
from tests.attestation.test_eventlog_properties import build_event_log
from host.cli import main as host_main
from host.measure import LaunchError
from host.measure_tdx import (
    ATTR_MR_EXTEND,
    ATTR_PAGE_AUG,
    OVMF_FOOTER_GUID,
    TDVF_METADATA_GUID,
    authenticode_digest,
    mrtd,
    predict_tdx,
    qemu_patched_kernel,
    tdvf_sections,
    tdx_policy_yaml,
)

DEBIAN_OVMF = Path("/usr/share/ovmf/OVMF.fd")
GIB = 1 << 30


# -- an independent MRTD: every record the TDX module hashes, listed first, hashed once -----------------

def _reference_mrtd(firmware: bytes, sections: list[tuple[int, int, int, int, int, int]]) -> str:
    records: list[bytes] = []
    for offset, raw, gpa, size, _kind, attrs in sections:
        if attrs & 2:
            continue
        memory = firmware[offset:offset + raw] + bytes(size - raw)
        for page in range(gpa, gpa + size, 4096):
            records.append(b"MEM.PAGE.ADD" + bytes(4) + struct.pack("<Q", page) + bytes(104))
            if attrs & 1:
                for chunk in range(page, page + 4096, 256):
                    records.append(b"MR.EXTEND" + bytes(7) + struct.pack("<Q", chunk) + bytes(104))
                    records.append(memory[chunk - gpa:chunk - gpa + 256])
    assert all(len(r) in (128, 256) for r in records)
    return hashlib.sha384(b"".join(records)).hexdigest()


def _synthetic_tdvf(sections: list[tuple[int, int, int, int, int, int]], size: int = 64 * 4096) -> bytes:
    """A firmware image with an OVMF footer table whose TDX metadata entry points at a TDVF descriptor."""
    image = bytearray(hashlib.shake_256(b"tdvf").digest(size))
    descriptor = struct.pack("<4sIII", b"TDVF", 16 + 32 * len(sections), 1, len(sections))
    descriptor += b"".join(struct.pack("<IIQQII", *s) for s in sections)
    at = size - 4096
    image[at:at + len(descriptor)] = descriptor
    entry = struct.pack("<I", size - at) + struct.pack("<H", 4 + 18) + TDVF_METADATA_GUID.bytes_le
    footer = struct.pack("<H", len(entry) + 18) + OVMF_FOOTER_GUID.bytes_le
    table = entry + footer
    image[size - 32 - len(table):size - 32] = table
    return bytes(image)


SYNTHETIC = [(0, 8 * 4096, 0xFFF00000, 8 * 4096, 0, ATTR_MR_EXTEND),  # BFV, extended
             (8 * 4096, 4096, 0xFFE00000, 2 * 4096, 1, 0),  # CFV: added, not extended; padded with zeros
             (0, 0, 0x800000, 3 * 4096, 2, 0),  # TD_HOB
             (0, 0, 0x900000, 4 * 4096, 3, ATTR_PAGE_AUG)]  # TEMP_MEM accepted by the guest: not measured


def test_mrtd_of_a_synthetic_tdvf_equals_the_reference():
    firmware = _synthetic_tdvf(SYNTHETIC)
    assert [s.type_name for s in tdvf_sections(firmware)] == ["BFV", "CFV", "TD_HOB", "TEMP_MEM"]
    assert mrtd(firmware).hex() == _reference_mrtd(firmware, SYNTHETIC)
    assert mrtd(firmware, page_order="two-pass") != mrtd(firmware)


def test_mrtd_covers_exactly_the_extended_bytes():
    firmware = bytearray(_synthetic_tdvf(SYNTHETIC))
    base = mrtd(bytes(firmware))
    firmware[5 * 4096 + 17] ^= 1  # inside the BFV
    assert mrtd(bytes(firmware)) != base
    firmware[5 * 4096 + 17] ^= 1
    firmware[8 * 4096 + 9] ^= 1  # the CFV is added but not extended: its bytes are not in MRTD
    assert mrtd(bytes(firmware)) == base
    moved = [SYNTHETIC[0], (8 * 4096, 4096, 0xFFD00000, 2 * 4096, 1, 0), *SYNTHETIC[2:]]
    assert mrtd(_synthetic_tdvf(moved)) != base  # a page's GPA is measured


def test_debian_ovmf_is_a_tdvf_and_its_mrtd_equals_the_reference():
    firmware = DEBIAN_OVMF.read_bytes()
    sections = tdvf_sections(firmware)
    assert [(s.type_name, s.attributes) for s in sections][:2] == [("BFV", ATTR_MR_EXTEND), ("CFV", 0)]
    raw = [(s.data_offset, s.raw_data_size, s.memory_address, s.memory_data_size, s.section_type, s.attributes)
           for s in sections]
    assert mrtd(firmware).hex() == _reference_mrtd(firmware, raw)


@pytest.mark.parametrize("damage, message", [
    (lambda fw: fw[:-4096], "no TDVF metadata"),
    (lambda fw: fw.replace(b"TDVF", b"TDVX", 1), "signature"),
    (lambda fw: fw[:100], "not a firmware image"),
])
def test_non_tdvf_images_are_refused(damage, message):
    with pytest.raises(LaunchError, match=message):
        mrtd(damage(_synthetic_tdvf(SYNTHETIC)))


def test_bad_sections_are_refused():
    with pytest.raises(LaunchError, match="whole pages"):
        mrtd(_synthetic_tdvf([(0, 4096, 0xFFF00001, 4096, 0, ATTR_MR_EXTEND)]))
    with pytest.raises(LaunchError, match="does not fit"):
        mrtd(_synthetic_tdvf([(60 * 4096, 8 * 4096, 0xFFF00000, 8 * 4096, 0, ATTR_MR_EXTEND)]))
    with pytest.raises(LaunchError, match="cannot be extended"):
        mrtd(_synthetic_tdvf([(0, 0, 0x900000, 4096, 3, ATTR_MR_EXTEND | ATTR_PAGE_AUG)]))


# -- a synthetic EFI-stub bzImage -----------------------------------------------------------------------

def _bzimage(payload: bytes = b"kernel", protocol: int = 0x20F) -> bytes:
    """MZ + PE32+ headers (two sections, no certificate) with a Linux setup header at 0x1f1."""
    image = bytearray(0x1400)
    image[0:2] = b"MZ"
    image[0x3C:0x40] = struct.pack("<I", 0x80)
    image[0x80:0x84] = b"PE\x00\x00"
    image[0x84:0x86] = struct.pack("<H", 0x8664)  # Machine: x86-64
    image[0x86:0x88] = struct.pack("<H", 2)  # NumberOfSections
    image[0x94:0x96] = struct.pack("<H", 0xF0)  # SizeOfOptionalHeader
    image[0x96:0x98] = struct.pack("<H", 0x0206)  # Characteristics: executable, large address aware
    opt = 0x98
    image[opt:opt + 2] = struct.pack("<H", 0x20B)
    image[opt + 32:opt + 40] = struct.pack("<II", 0x200, 0x200)  # SectionAlignment, FileAlignment
    image[opt + 56:opt + 60] = struct.pack("<I", 0x1400)  # SizeOfImage
    image[opt + 68:opt + 70] = struct.pack("<H", 10)  # Subsystem: EFI application
    image[opt + 60:opt + 64] = struct.pack("<I", 0x200)  # SizeOfHeaders
    image[opt + 64:opt + 68] = b"\xde\xad\xbe\xef"  # CheckSum: not hashed
    image[opt + 108:opt + 112] = struct.pack("<I", 16)  # NumberOfRvaAndSizes
    table = opt + 0xF0
    for i, (name, size, pointer) in enumerate(((b".setup", 0x200, 0x200), (b".text", 0x1000, 0x400))):
        entry = table + 40 * i
        image[entry:entry + 8] = name.ljust(8, b"\x00")
        image[entry + 8:entry + 24] = struct.pack("<IIII", size, pointer, size, pointer)
    image[0x1F1] = 1  # setup_sects
    image[0x202:0x206] = b"HdrS"
    image[0x206:0x208] = struct.pack("<H", protocol)
    image[0x211] = 0x01  # LOADED_HIGH
    image[0x22C:0x230] = struct.pack("<I", 0x7FFFFFFF)  # initrd_addr_max
    image[0x400:0x400 + len(payload)] = payload
    return bytes(image) + b"trailing data after the sections"


def _pesign_sha256(path: Path) -> str:
    assert shutil.which("pesign"), "pesign (Debian) is installed by ./dev"
    out = subprocess.run(["pesign", "-h", "-i", str(path), "-d", "sha256"], capture_output=True, text=True,
                         check=True).stdout
    return out.split()[-1]


def test_authenticode_equals_pesign(tmp_path):
    for i, image in enumerate((_bzimage(), qemu_patched_kernel(_bzimage(), initrd_size=5000, memory_bytes=8 * GIB))):
        path = tmp_path / f"k{i}.efi"
        path.write_bytes(image)
        assert authenticode_digest(image, "sha256").hex() == _pesign_sha256(path)
    image = bytearray(_bzimage())
    base = authenticode_digest(bytes(image), "sha384")
    image[0x98 + 64] ^= 0xFF  # the checksum is excluded
    assert authenticode_digest(bytes(image), "sha384") == base


def test_qemu_patches_the_setup_header_by_memory_size():
    kernel = _bzimage()
    small = qemu_patched_kernel(kernel, initrd_size=5000, memory_bytes=GIB)
    large = qemu_patched_kernel(kernel, initrd_size=5000, memory_bytes=8 * GIB)
    assert small[0x210] == 0xB0 and small[0x228:0x22C] == struct.pack("<I", 0x20000)
    assert struct.unpack_from("<I", small, 0x21C)[0] == 5000
    # 8 GiB: q35 keeps 2 GiB below 4 GiB; 1 GiB: all of it. initrd_max = below_4g - ACPI data - 1
    assert struct.unpack_from("<I", large, 0x218)[0] == (0x80000000 - 0x28000 - 1 - 5000) & ~0xFFF
    assert small != large and qemu_patched_kernel(kernel, initrd_size=0, memory_bytes=2 * GIB)[0x218:0x220] == bytes(8)
    with pytest.raises(LaunchError, match="HdrS"):
        qemu_patched_kernel(b"MZ" + bytes(0x300), initrd_size=0, memory_bytes=GIB)


# -- the whole prediction --------------------------------------------------------------------------------

@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "vmlinuz").write_bytes(_bzimage())
    (tmp_path / "initrd").write_bytes(b"initramfs " * 100)
    (tmp_path / "enclave.yaml").write_text("listen: 0.0.0.0:8443\n")
    return tmp_path


def _predict(d: Path, **over):
    args = {"initrd": d / "initrd", "append": "console=ttyS0 ro", "memory_bytes": 8 * GIB,
            "config": d / "enclave.yaml"} | over
    return predict_tdx(DEBIAN_OVMF, d / "vmlinuz", **args)


def test_one_changed_byte_changes_the_prediction(inputs):
    base = _predict(inputs)
    assert base.cmdline == "console=ttyS0 ro initrd=initrd"
    assert base.mrconfigid == hashlib.sha256(b"listen: 0.0.0.0:8443\n").digest() + bytes(16)
    assert base.mrtd == mrtd(DEBIAN_OVMF.read_bytes())
    (inputs / "vmlinuz").write_bytes(_bzimage(b"kernel!"))
    assert _predict(inputs).kernel != base.kernel
    (inputs / "initrd").write_bytes(b"initramfs?" + b"initramfs " * 99)
    changed = _predict(inputs)
    assert changed.initrd != base.initrd
    assert _predict(inputs, append="console=ttyS0 rw").cmdline_sha384 != base.cmdline_sha384
    (inputs / "enclave.yaml").write_text("listen: 0.0.0.0:8444\n")
    assert _predict(inputs).mrconfigid != base.mrconfigid
    assert _predict(inputs, memory_bytes=GIB).kernel != changed.kernel  # QEMU's initrd address
    no_initrd = _predict(inputs, initrd=None)
    assert no_initrd.initrd is None and no_initrd.cmdline == "console=ttyS0 ro"


def _direct_boot_log(p) -> bytes:
    sep = hashlib.sha384(bytes(4)).digest()
    tag = lambda t, text: struct.pack("<II", t, len(text)) + text  # noqa: E731
    return build_event_log([
        (1, 0x4, sep, bytes(4)),
        (2, 0x80000007, hashlib.sha384(b"Calling EFI Application from Boot Option").digest(),
         b"Calling EFI Application from Boot Option"),
        (2, 0x4, sep, bytes(4)),
        (2, EV_EFI_BOOT_SERVICES_APPLICATION, p.kernel, bytes(32)),
        (3, EV_EVENT_TAG, p.cmdline_sha384, tag(0x8F3B22EC, b"LOADED_IMAGE::LoadOptions\x00")),
        (3, EV_EVENT_TAG, p.initrd, tag(0x8F3B22ED, b"Linux initrd\x00")),
    ])


def test_the_written_policy_accepts_the_predicted_boot_and_nothing_else(inputs):
    p = _predict(inputs)
    text = tdx_policy_yaml(p)
    policy = policy_from_yaml(text)
    assert policy.is_measured("tdx") and policy.tdx.mrconfigid == p.mrconfigid.hex()
    state = boot_state(parse_event_log(_direct_boot_log(p), allow_padding=False))
    assert state["kernel"]["source"] == "efi_application" and state["cmdline"]["source"] == "efi_stub"
    # the only events whose digest their data does not explain are the three the policy pins
    assert {e["digest"] for e in state["opaque_events"]} == {p.kernel.hex(), p.initrd.hex(), p.cmdline_sha384.hex()}
    claims = {"mrtd": p.mrtd.hex(), "td_attributes": "0000001000000000", "mrconfigid": p.mrconfigid.hex(),
              "mrservicetd": "00" * 48, "eventlog": [], "boot_state": state}
    lax = policy_from_yaml(text.replace("require_collateral: true", "require_collateral: false"))
    assert appraise(VerifiedEvidence("tdx", None, dict(claims)), lax).ok
    other = _predict(inputs, append="console=ttyS0 rw init=/bin/sh")
    state_other = boot_state(parse_event_log(_direct_boot_log(other), allow_padding=False))
    verdict = appraise(VerifiedEvidence("tdx", None, {**claims, "boot_state": state_other}), lax)
    assert not verdict.ok and "command line" in (verdict.error or "")
    claims_no_log = {k: v for k, v in claims.items() if k not in ("eventlog", "boot_state")}
    assert not appraise(VerifiedEvidence("tdx", None, claims_no_log), lax).ok


def test_cli_measure_tdx_writes_the_policy(inputs, capsys):
    out = inputs / "tdx-policy.yaml"
    code = host_main(["measure", "--tdx", "--ovmf", str(DEBIAN_OVMF), "--kernel", str(inputs / "vmlinuz"),
                      "--initrd", str(inputs / "initrd"), "--append", "console=ttyS0 ro", "--memory", "8G",
                      "--config", str(inputs / "enclave.yaml"), "--policy-out", str(out), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    p = _predict(inputs)
    assert printed == p.to_json()
    policy = policy_from_yaml(out.read_text())
    entry = policy.tdx.measurements[0]
    assert entry.mrtd == p.mrtd.hex() and entry.boot.kernel == p.kernel.hex() and entry.boot.initrd == p.initrd.hex()
    assert entry.boot.cmdline == "console=ttyS0 ro initrd=initrd"
    assert host_main(["measure", "--tdx", "--ovmf", str(DEBIAN_OVMF), "--memory", "8G"]) == 2  # no kernel
    assert "needs --kernel" in capsys.readouterr().err
    assert host_main(["measure", "--tdx", "--ovmf", str(inputs / "initrd"), "--kernel", str(inputs / "vmlinuz"),
                      "--memory", "8G"]) == 2
    # SNP measuring still needs --vcpus
    assert host_main(["measure", "--ovmf", str(DEBIAN_OVMF)]) == 2
    assert "--vcpus" in capsys.readouterr().err


def test_uuid_constants_are_the_documented_guids():
    assert str(TDVF_METADATA_GUID) == "e47a6535-984a-4798-865e-4685a7bf8ec2"
    assert isinstance(OVMF_FOOTER_GUID, uuid.UUID)
