"""`cube-host measure` / `cube-host qemu-cmd`: the SNP launch digest agrees with sev-snp-measure's own
CLI, the generated policy pins it, and the QEMU command line boots what was measured.

Two firmware images are used:

* Debian's ``ovmf`` package (``OVMF.fd``): a real build with SEV metadata but without an
  SNP_KERNEL_HASHES section (it is not the OvmfPkg/AmdSev build), so it measures only without
  ``--kernel``. Installed by ``apt-get install ovmf``; the test fails loudly when it is missing.
* A synthetic image built below carrying the OVMF footer GUID table and the SEV metadata exactly as
  sev-snp-measure (and QEMU) parse them, including SNP_KERNEL_HASHES, so the kernel/initrd/cmdline
  hash table is covered too. Layout facts used (edk2 OvmfPkg/ResetVector, sevsnpmeasure/ovmf.py):
  - the image is mapped to end at 4 GiB; its size is a multiple of 4 KiB;
  - the footer table ends 32 bytes before the end of the image; its last 18 bytes are the footer
    entry {u16 total table size incl. this entry, GUID 96b582de-1fb2-45f7-baea-a366c55a082d};
  - before it, entries are walked backwards, each laid out as data || u16 size (data + 18) ||
    16-byte GUID (little-endian GUID byte order);
  - SEV-ES reset block (00f771de-1a7e-4fcb-890e-68c77e2fb44e): u32 reset EIP;
  - SEV hash table (7255371f-3a3b-4b04-927b-1da6efa8d454): u32 GPA, u32 size;
  - SEV metadata pointer (dc886566-984a-4798-a75e-5585a7bf67cc): u32 offset of the metadata
    header counted back from the end of the image;
  - metadata header: "ASEV", u32 size (16 + 12 per section), u32 version 1, u32 section count,
    then sections {u32 GPA, u32 size, u32 type} with types 1 SEC_MEM, 2 SECRETS, 3 CPUID,
    0x10 SNP_KERNEL_HASHES (one page holding the hash table GPA).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from attestation.appraise import appraise
from attestation.atls.client import require_measured_policy
from attestation.errors import PolicyError
from attestation.policy import load_policy
from attestation.sim import SIM_MEASUREMENT, SimPlatform
from attestation.snp.verify import verify_report
from attestation.verdict import VerifiedEvidence
from host.cli import main

ROOT = Path(__file__).resolve().parents[2]
# Where Debian's `ovmf` package puts its SEV-capable build (the package is a test dependency).
DEBIAN_OVMF = Path("/usr/share/ovmf/OVMF.fd")
SEV_SNP_MEASURE = Path(sys.executable).with_name("sev-snp-measure")

FOOTER_GUID = "96b582de-1fb2-45f7-baea-a366c55a082d"
RESET_BLOCK_GUID = "00f771de-1a7e-4fcb-890e-68c77e2fb44e"
HASH_TABLE_GUID = "7255371f-3a3b-4b04-927b-1da6efa8d454"
METADATA_GUID = "dc886566-984a-4798-a75e-5585a7bf67cc"
TDX_METADATA_GUID = "e47a6535-984a-4798-865e-4685a7bf8ec2"
HASH_TABLE_GPA = 0x80B000 + 0xC00


def _guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


def _entry(guid: str, data: bytes) -> bytes:
    return data + struct.pack("<H", len(data) + 18) + _guid(guid)


def synthetic_ovmf(path: Path, *, kernel_hashes: bool = True, metadata: bool = True,
                   signature: bytes = b"ASEV", tdx: bool = False, pages: int = 16, seed: int = 7) -> Path:
    """A firmware image sev-snp-measure parses like a real OvmfPkg/AmdSev build (layout in the module doc)."""
    size = pages * 4096
    image = bytearray(random.Random(seed).randbytes(size))
    sections = [(0x800000, 0x9000, 1), (0x809000, 0x1000, 2), (0x80A000, 0x1000, 3)]
    if kernel_hashes:
        sections.append((0x80B000, 0x1000, 0x10))
    sections.append((0x80C000, 0x4000, 1))
    header_at = size - 4096
    header = signature + struct.pack("<III", 16 + 12 * len(sections), 1, len(sections))
    header += b"".join(struct.pack("<III", *s) for s in sections)
    image[header_at:header_at + len(header)] = header
    entries = [_entry(RESET_BLOCK_GUID, struct.pack("<I", 0xFFFFF000)),
               _entry(HASH_TABLE_GUID, struct.pack("<II", HASH_TABLE_GPA, 0x400))]
    if metadata:
        entries.append(_entry(METADATA_GUID, struct.pack("<I", size - header_at)))
    if tdx:  # "TDVF", u32 length, u32 version 1, u32 section count (0 here)
        tdvf_at = header_at + 512
        image[tdvf_at:tdvf_at + 16] = b"TDVF" + struct.pack("<III", 16, 1, 0)
        entries.append(_entry(TDX_METADATA_GUID, struct.pack("<I", size - tdvf_at)))
    body = b"".join(entries)
    table = body + struct.pack("<H", len(body) + 18) + _guid(FOOTER_GUID)
    end = size - 32
    image[end - len(table):end] = table
    path.write_bytes(bytes(image))
    return path


def reference_measurement(*args: str) -> str:
    """What sev-snp-measure's own console script prints for the same inputs."""
    assert SEV_SNP_MEASURE.exists(), f"sev-snp-measure console script missing next to {sys.executable}"
    out = subprocess.run([str(SEV_SNP_MEASURE), "--mode", "snp", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    value = out.stdout.strip()
    assert len(value) == 96
    return value


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def guest(tmp_path: Path) -> dict[str, Path]:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(random.Random(1).randbytes(200_000))
    initrd = tmp_path / "rootfs.cpio.gz"
    initrd.write_bytes(random.Random(2).randbytes(50_000))
    return {"ovmf": synthetic_ovmf(tmp_path / "OVMF.amdsev.fd"), "kernel": kernel, "initrd": initrd}


APPEND = "root=/dev/vda rw console=ttyS0 quiet"


def test_measurement_with_kernel_hashes_equals_sev_snp_measure_cli(capsys, guest) -> None:
    common = ["--ovmf", str(guest["ovmf"]), "--kernel", str(guest["kernel"]), "--initrd", str(guest["initrd"]),
              "--append", APPEND]
    for vcpus, vcpu_type, features in (("4", "EPYC-v4", "0x1"), ("2", "EPYC-Milan", "0x21")):
        args = [*common, "--vcpus", vcpus, "--vcpu-type", vcpu_type, "--guest-features", features]
        code, out, err = run(capsys, "measure", *args)
        assert code == 0, err
        assert out.strip() == reference_measurement(*args)
    # every measured input matters: a different command line is a different measurement
    code, other, _ = run(capsys, "measure", "--ovmf", str(guest["ovmf"]), "--kernel", str(guest["kernel"]),
                         "--initrd", str(guest["initrd"]), "--append", APPEND + " debug", "--vcpus", "4")
    assert code == 0
    code, base, _ = run(capsys, "measure", *common, "--vcpus", "4")
    assert other != base


def test_measurement_of_debian_ovmf_equals_cli_and_kernel_needs_hash_section(capsys, guest) -> None:
    assert DEBIAN_OVMF.is_file(), "Debian's OVMF missing: apt-get install ovmf (./dev installs it)"
    args = ["--ovmf", str(DEBIAN_OVMF), "--vcpus", "4", "--vcpu-type", "EPYC-v4"]
    code, out, err = run(capsys, "measure", *args)
    assert code == 0, err
    assert out.strip() == reference_measurement(*args)
    code, out, err = run(capsys, "measure", *args, "--kernel", str(guest["kernel"]))
    assert code == 2 and out == ""
    assert "no SNP_KERNEL_HASHES section" in err and "Traceback" not in err


def _sim_evidence(sim: SimPlatform, measurement: bytes, policy: int = 0x30000) -> VerifiedEvidence:
    report, certs = sim.report(bytes(64), measurement=measurement, policy=policy)
    verified = verify_report(report, vek=certs[0], chain=certs[1:], trust=sim.trust)
    # Same claims and checks, presented as hardware SNP evidence (the generated policy allows snp only).
    return VerifiedEvidence(platform="snp", product=verified.product, claims=verified.claims, checks=verified.checks)


def test_policy_out_loads_and_admits_only_the_measured_image(capsys, guest, tmp_path) -> None:
    policy_path = tmp_path / "snp-enclave.yaml"
    code, out, err = run(capsys, "measure", "--ovmf", str(guest["ovmf"]), "--kernel", str(guest["kernel"]),
                         "--initrd", str(guest["initrd"]), "--append", APPEND, "--vcpus", "4",
                         "--policy-out", str(policy_path))
    assert code == 0, err
    measurement = out.strip()
    policy = load_policy(policy_path)
    assert policy.platforms == ["snp"]
    assert [(m.measurement, m.kernel_hashes) for m in policy.snp.measurements] == [(measurement, True)]
    require_measured_policy(policy)  # kernel, initrd and command line are in the digest: a measured policy
    assert policy.snp.allow_debug is False and policy.snp.allow_migrate_ma is False and policy.snp.vmpl == 0
    # the policy an operator deploys checks revocation, like config/policies/snp-production.yaml
    assert policy.snp.require_crl is True

    sim = SimPlatform.load_or_create(tmp_path / "sim")
    good = appraise(_sim_evidence(sim, bytes.fromhex(measurement)), policy)
    assert good.ok, good.error
    wrong = appraise(_sim_evidence(sim, SIM_MEASUREMENT), policy)
    assert not wrong.ok
    assert {c.name for c in wrong.checks if not c.ok} == {"measurement"}
    debug = appraise(_sim_evidence(sim, bytes.fromhex(measurement), policy=0x30000 | 1 << 19), policy)
    assert {c.name for c in debug.checks if not c.ok} == {"debug_disabled"}

    # an existing policy file is never silently replaced
    before = policy_path.read_bytes()
    code, _, err = run(capsys, "measure", "--ovmf", str(guest["ovmf"]), "--vcpus", "8", "--kernel", str(guest["kernel"]),
                       "--policy-out", str(policy_path))
    assert code == 2 and "--force" in err and policy_path.read_bytes() == before
    code, out, _ = run(capsys, "measure", "--ovmf", str(guest["ovmf"]), "--vcpus", "8", "--kernel", str(guest["kernel"]),
                       "--policy-out", str(policy_path), "--force")
    assert code == 0 and [m.measurement for m in load_policy(policy_path).snp.measurements] == [out.strip()]
    assert out.strip() != measurement


def test_firmware_only_policy_needs_asking_and_is_never_production(capsys, guest, tmp_path) -> None:
    """Without --kernel the digest covers only OVMF: any OS on that firmware matches it."""
    policy_path = tmp_path / "fw.yaml"
    base = ["measure", "--ovmf", str(guest["ovmf"]), "--vcpus", "4", "--policy-out", str(policy_path)]
    code, out, err = run(capsys, *base)
    assert code == 2 and out == "" and "--firmware-only" in err and "any kernel" in err
    assert not policy_path.exists()
    code, out, err = run(capsys, *base, "--firmware-only")
    assert code == 0, err
    text = policy_path.read_text()
    assert text.startswith("# FIRMWARE-ONLY") and "NOT FOR PRODUCTION" in text and "kernel-hashes=off" in text
    assert all("production" not in line.lower() or "not for production" in line.lower()
               or "for production" in line.lower() for line in text.splitlines())
    policy = load_policy(policy_path)
    assert policy.name == "snp-firmware-only"
    assert [(m.measurement, m.kernel_hashes) for m in policy.snp.measurements] == [(out.strip(), False)]
    with pytest.raises(PolicyError, match="lacks kernel_hashes: true"):
        require_measured_policy(policy)  # the attested client refuses it before connecting
    code, _, err = run(capsys, "measure", "--ovmf", str(guest["ovmf"]), "--vcpus", "4", "--kernel", str(guest["kernel"]),
                       "--firmware-only", "--policy-out", str(tmp_path / "x.yaml"))
    assert code == 2 and "covers the whole boot chain" in err


def _option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_qemu_cmd_snp_boots_what_was_measured(capsys, guest, tmp_path) -> None:
    disk = tmp_path / "rootfs,v1.ext4"
    disk.write_bytes(b"\0" * 4096)
    args = ["qemu-cmd", "--platform", "snp", "--ovmf", str(guest["ovmf"]), "--kernel", str(guest["kernel"]),
            "--initrd", str(guest["initrd"]), "--append", APPEND, "--memory", "10G", "--vcpus", "4",
            "--vcpu-type", "EPYC-v4", "--vsock-cid", "198", "--forward", "6193:7001", "--forward", "8443:8443",
            "--disk", str(disk)]
    code, out, err = run(capsys, *args, "--measure")
    assert code == 0, err
    comment, line = out.strip().splitlines()
    measured = comment.removeprefix("# expected SNP launch measurement: ")
    assert measured == reference_measurement("--ovmf", str(guest["ovmf"]), "--kernel", str(guest["kernel"]),
                                             "--initrd", str(guest["initrd"]), "--append", APPEND,
                                             "--vcpus", "4", "--vcpu-type", "EPYC-v4")
    argv = shlex.split(line)
    code, out, _ = run(capsys, *args, "--json")
    as_json = json.loads(out)
    assert as_json["argv"] == argv and as_json["platform"] == "snp" and as_json["measurement"] is None

    assert argv[0] == "qemu-system-x86_64"
    assert _option(argv, "-cpu") == ["EPYC-v4"] and _option(argv, "-smp") == ["4"]
    assert _option(argv, "-m") == ["10240M"]
    assert _option(argv, "-bios") == [str(guest["ovmf"])]
    assert _option(argv, "-kernel") == [str(guest["kernel"])] and _option(argv, "-initrd") == [str(guest["initrd"])]
    assert _option(argv, "-append") == [APPEND]
    assert _option(argv, "-machine") == ["q35,confidential-guest-support=sev0,memory-backend=ram1"]
    objects = _option(argv, "-object")
    assert "memory-backend-memfd,id=ram1,size=10240M,share=true,prealloc=false" in objects
    snp = [o for o in objects if o.startswith("sev-snp-guest,")]
    assert len(snp) == 1
    props = dict(kv.split("=", 1) for kv in snp[0].split(",")[1:])
    assert props == {"id": "sev0", "policy": "0x30000", "cbitpos": "51", "reduced-phys-bits": "1", "kernel-hashes": "on"}
    devices = _option(argv, "-device")
    assert "vhost-vsock-pci,id=vhost-vsock-pci0,guest-cid=198" in devices
    assert _option(argv, "-netdev") == ["user,id=vmnic,hostfwd=tcp:127.0.0.1:6193-:7001,hostfwd=tcp:127.0.0.1:8443-:8443"]
    assert _option(argv, "-drive") == [f"file={str(disk).replace(',', ',,')},format=raw,if=virtio"]

    # without a kernel nothing is hashed, and QEMU is told so (the measurement assumed the same)
    code, out, _ = run(capsys, "qemu-cmd", "--platform", "snp", "--ovmf", str(guest["ovmf"]), "--vcpus", "2", "--json")
    assert code == 0
    plain = json.loads(out)["argv"]
    assert any(o.endswith("kernel-hashes=off") for o in _option(plain, "-object"))
    assert "-kernel" not in plain and _option(plain, "-m") == ["8192M"]


def test_qemu_cmd_tdx_has_the_td_flags(capsys, guest, tmp_path) -> None:
    tdvf = synthetic_ovmf(tmp_path / "OVMF.tdx.fd", tdx=True)
    code, out, err = run(capsys, "qemu-cmd", "--platform", "tdx", "--ovmf", str(tdvf), "--kernel",
                         str(guest["kernel"]), "--append", APPEND, "--memory", "20G", "--vcpus", "16",
                         "--vsock-cid", "6", "--json")
    assert code == 0, err
    argv = json.loads(out)["argv"]
    assert shlex.split(shlex.join(argv)) == argv
    assert _option(argv, "-machine") == ["q35,kernel_irqchip=split,confidential-guest-support=tdx,"
                                         "memory-backend=mem0,hpet=off"]
    objects = _option(argv, "-object")
    assert "memory-backend-memfd,id=mem0,size=20480M" in objects
    tdx = [json.loads(o) for o in objects if o.startswith("{")]
    assert tdx == [{"qom-type": "tdx-guest", "id": "tdx",
                    "quote-generation-socket": {"type": "vsock", "cid": "2", "port": "4050"}}]
    assert _option(argv, "-bios") == [str(tdvf)] and _option(argv, "-cpu") == ["host"]
    assert _option(argv, "-smp") == ["16"] and _option(argv, "-append") == [APPEND]
    assert "vhost-vsock-pci,id=vhost-vsock-pci0,guest-cid=6" in _option(argv, "-device")
    assert not any(a.startswith("sev-snp-guest") or "sev0" in a for a in argv)
    # Debian's OVMF.fd is a TDX-capable build too (it carries a TDVF descriptor)
    assert DEBIAN_OVMF.is_file(), "Debian's OVMF missing: apt-get install ovmf (./dev installs it)"
    code, _, err = run(capsys, "qemu-cmd", "--platform", "tdx", "--ovmf", str(DEBIAN_OVMF), "--vcpus", "2")
    assert code == 0, err


def _bad_inputs(tmp_path: Path, guest: dict[str, Path]) -> list[tuple[list[str], str]]:
    ovmf, kernel = str(guest["ovmf"]), str(guest["kernel"])
    garbage = tmp_path / "garbage.fd"
    garbage.write_bytes(random.Random(3).randbytes(8192))
    plain = str(synthetic_ovmf(tmp_path / "plain.fd", metadata=False))
    bad_sig = str(synthetic_ovmf(tmp_path / "badsig.fd", signature=b"XSEV"))
    no_hashes = str(synthetic_ovmf(tmp_path / "nohashes.fd", kernel_hashes=False))
    odd = tmp_path / "odd.fd"
    odd.write_bytes(b"\0" * 1000)
    m = ["measure", "--vcpus", "4"]
    q = ["qemu-cmd", "--platform", "snp", "--vcpus", "4", "--ovmf", ovmf]
    return [
        ([*m, "--ovmf", str(tmp_path / "missing.fd")], "no such file"),
        ([*m, "--ovmf", str(tmp_path)], "not a regular file"),
        ([*m, "--ovmf", str(garbage)], "no SEV metadata"),
        ([*m, "--ovmf", plain], "no SEV metadata"),
        ([*m, "--ovmf", bad_sig], "malformed SEV metadata"),
        ([*m, "--ovmf", str(odd)], "not a firmware image"),
        ([*m, "--ovmf", no_hashes, "--kernel", kernel], "no SNP_KERNEL_HASHES section"),
        ([*m, "--ovmf", ovmf, "--kernel", str(tmp_path / "nokernel")], "--kernel"),
        ([*m, "--ovmf", ovmf, "--initrd", kernel], "need --kernel"),
        ([*m, "--ovmf", ovmf, "--vcpu-type", "Pentium"], "--vcpu-type"),
        (["measure", "--vcpus", "0", "--ovmf", ovmf], "--vcpus"),
        ([*q, "--memory", "lots"], "--memory"),
        ([*q, "--memory", "0G"], "--memory"),
        ([*q, "--forward", "70000:22"], "--forward"),
        ([*q, "--forward", "22"], "--forward"),
        ([*q, "--forward", "22:22", "--forward", "22:80"], "given twice"),
        ([*q, "--vsock-cid", "2"], "--vsock-cid"),
        ([*q, "--disk", str(tmp_path / "nodisk")], "--disk"),
        (["qemu-cmd", "--platform", "tdx", "--vcpus", "4", "--ovmf", ovmf, "--measure"], "only SNP"),
        (["qemu-cmd", "--platform", "tdx", "--vcpus", "4", "--ovmf", ovmf], "no TDX metadata"),
        (["qemu-cmd", "--platform", "tdx", "--vcpus", "4", "--ovmf", str(garbage)], "no TDX metadata"),
        (["qemu-cmd", "--platform", "snp", "--vcpus", "4", "--ovmf", plain], "no SEV metadata"),
        ([*q, "--name", "a b"], "--name"),
    ]


def test_bad_inputs_exit_2_with_a_message(capsys, guest, tmp_path) -> None:
    for argv, message in _bad_inputs(tmp_path, guest):
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert message in err and err.startswith("cube-host: "), (argv, err)
        assert "Traceback" not in err and out == ""
    with pytest.raises(SystemExit) as exc:  # argparse: unparsable numbers are usage errors, also 2
        main(["measure", "--ovmf", str(guest["ovmf"]), "--vcpus", "four"])
    assert exc.value.code == 2
    capsys.readouterr()


def test_installed_command_reports_bad_firmware_without_traceback(tmp_path) -> None:
    fake = tmp_path / "fake.fd"
    fake.write_bytes(b"\xff" * 8192)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "host.cli", "measure", "--ovmf", str(fake), "--vcpus", "1"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert "no SEV metadata" in proc.stderr and "Traceback" not in proc.stderr
