"""`cube-host measure --image` / `qemu-cmd --image` on the built image: the SNP prediction equals sev-snp-measure's
(its own console script, a separate process, on the same kernel, initrd and command line); one byte changed in an
app file or in the configuration inside the initrd, or in the command line, changes it; HOST_DATA / MRCONFIGID
carry the configuration's SHA-256 and the policy pins it.

The firmware is the synthetic OvmfPkg/AmdSev-shaped image of tests/host/test_launch.py: Debian's OVMF.fd has no
SNP_KERNEL_HASHES section, so it cannot measure a kernel at all (Debian ships no AmdSev build).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from attestation.policy import load_policy
from host.image import load_image
from host.image_build import DEVICES
from host.initrd import read_cpio, write_initrd
from tests.host.test_launch import reference_measurement, run, synthetic_ovmf

APP_FILE = "usr/lib/python3/dist-packages/enclave/tokens.py"
CONFIG_FILE = "etc/cube-ai/enclave.yaml"


@pytest.fixture(scope="module")
def unpacked(sim_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built initrd's tree, to rebuild variants of it with one byte changed."""
    entries = read_cpio(gzip.decompress((sim_image / "initrd.img").read_bytes()))
    root = tmp_path_factory.mktemp("initrd") / "root"
    for name, (mode, content) in entries.items():
        path = root / name
        kind = mode & 0o170000
        if kind == 0o040000:
            path.mkdir(parents=True, exist_ok=True)
        elif kind == 0o120000:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(content.decode())
        elif kind == 0o100000:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(mode & 0o777)
    return root


def variant(image: Path, root: Path, dest: Path, *, change: str | None = None) -> Path:
    """A copy of ``image`` whose initrd is ``root`` repacked, with one byte of ``change`` flipped first."""
    shutil.copytree(image, dest, ignore=shutil.ignore_patterns("initrd.img"))
    tree = dest.parent / f"{dest.name}-root"
    shutil.copytree(root, tree, symlinks=True)
    manifest = json.loads((dest / "manifest.json").read_text())
    if change is not None:
        data = bytearray((tree / change).read_bytes())
        data[len(data) // 2] ^= 0x01
        (tree / change).write_bytes(bytes(data))
        if change == CONFIG_FILE:
            manifest["config"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    write_initrd(tree, dest / "initrd.img", mtime=manifest["source_date_epoch"], devices=DEVICES)
    manifest["initrd"]["sha256"] = hashlib.sha256((dest / "initrd.img").read_bytes()).hexdigest()
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def measure(capsys, ovmf: Path, image: Path, *extra: str) -> str:
    code, out, err = run(capsys, "measure", "--ovmf", str(ovmf), "--image", str(image), "--vcpus", "2", *extra)
    assert code == 0, err
    return out.strip()


def test_prediction_equals_sev_snp_measure_and_pins_the_config(capsys, sim_image: Path, tmp_path: Path) -> None:
    ovmf = synthetic_ovmf(tmp_path / "OVMF.amdsev.fd")
    image = load_image(sim_image)
    policy_file = tmp_path / "policy.yaml"
    ours = measure(capsys, ovmf, sim_image, "--policy-out", str(policy_file))
    assert ours == reference_measurement("--ovmf", str(ovmf), "--kernel", str(image.kernel), "--initrd",
                                         str(image.initrd), "--append", image.cmdline, "--vcpus", "2",
                                         "--vcpu-type", "EPYC-v4")
    config_sha = hashlib.sha256((Path(__file__).resolve().parents[2] / "image" / "enclave.yaml").read_bytes())
    assert image.host_data == config_sha.digest()
    policy = load_policy(policy_file)
    assert [(m.measurement, m.kernel_hashes) for m in policy.snp.measurements] == [(ours, True)]
    assert policy.snp.host_data == config_sha.hexdigest()
    assert "root=" not in image.cmdline and "cube.data=/dev/vda" in image.cmdline


def test_one_byte_of_app_config_or_cmdline_changes_the_prediction(capsys, sim_image: Path, unpacked: Path,
                                                                  tmp_path: Path) -> None:
    ovmf = synthetic_ovmf(tmp_path / "OVMF.amdsev.fd")
    image = load_image(sim_image)
    base = measure(capsys, ovmf, sim_image)
    repacked = variant(sim_image, unpacked, tmp_path / "same")
    assert measure(capsys, ovmf, repacked) == base   # repacking the same tree is byte-identical
    app = variant(sim_image, unpacked, tmp_path / "app", change=APP_FILE)
    config = variant(sim_image, unpacked, tmp_path / "config", change=CONFIG_FILE)
    predictions = {base, measure(capsys, ovmf, app), measure(capsys, ovmf, config)}
    code, out, err = run(capsys, "measure", "--ovmf", str(ovmf), "--kernel", str(image.kernel), "--initrd",
                         str(image.initrd), "--append", image.cmdline + " x", "--vcpus", "2")
    assert code == 0, err
    predictions.add(out.strip())
    assert len(predictions) == 4
    assert load_image(config).host_data != image.host_data          # and HOST_DATA follows the config


def test_qemu_cmd_passes_host_data_and_mrconfigid(capsys, sim_image: Path, tmp_path: Path) -> None:
    image = load_image(sim_image)
    ovmf = synthetic_ovmf(tmp_path / "OVMF.amdsev.fd")
    disk = tmp_path / "data.img"
    disk.write_bytes(bytes(1 << 20))
    # an image built with --simulate boots only as a sim VM; the SNP/TDX lines are checked on a non-sim copy
    code, _, err = run(capsys, "qemu-cmd", "--platform", "snp", "--ovmf", str(ovmf), "--image", str(sim_image),
                       "--vcpus", "2")
    assert code == 2 and "built with --simulate" in err
    real = tmp_path / "real"
    shutil.copytree(sim_image, real)
    manifest = json.loads((real / "manifest.json").read_text())
    manifest["simulate"] = False
    (real / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = run(capsys, "qemu-cmd", "--platform", "snp", "--ovmf", str(ovmf), "--image", str(real),
                         "--vcpus", "2", "--disk", str(disk), "--json", "--measure")
    assert code == 0, err
    shown = json.loads(out)
    argv = shown["argv"]
    sev = next(o for o in argv if o.startswith("sev-snp-guest,"))
    assert f"host-data={base64.b64encode(image.host_data).decode()}" in sev.split(",")
    assert "kernel-hashes=on" in sev.split(",")
    assert argv[argv.index("-append") + 1] == image.cmdline
    assert argv[argv.index("-initrd") + 1] == str(real / "initrd.img")
    assert f"file={disk},format=raw,if=virtio" in argv
    assert shown["measurement"] == measure(capsys, ovmf, real)
    code, out, err = run(capsys, "qemu-cmd", "--platform", "tdx", "--ovmf", str(synthetic_ovmf(tmp_path / "t.fd",
                         tdx=True)), "--image", str(real), "--vcpus", "2", "--json")
    assert code == 0, err
    tdx = json.loads(next(o for o in json.loads(out)["argv"] if o.startswith("{")))
    assert base64.b64decode(tdx["mrconfigid"]) == image.host_data + bytes(16)


def test_image_inputs_are_checked(capsys, sim_image: Path, tmp_path: Path) -> None:
    ovmf = str(synthetic_ovmf(tmp_path / "OVMF.amdsev.fd"))
    image = load_image(sim_image)
    code, _, err = run(capsys, "measure", "--ovmf", ovmf, "--image", str(sim_image), "--append", "x", "--vcpus", "1")
    assert code == 2 and "--append cannot be combined" in err
    code, _, err = run(capsys, "measure", "--ovmf", ovmf, "--image", str(tmp_path), "--vcpus", "1")
    assert code == 2 and "no manifest.json" in err
    tampered = tmp_path / "tampered"
    shutil.copytree(sim_image, tampered)
    data = bytearray((tampered / "initrd.img").read_bytes())
    data[-100] ^= 1
    (tampered / "initrd.img").write_bytes(bytes(data))
    code, _, err = run(capsys, "measure", "--ovmf", ovmf, "--image", str(tampered), "--vcpus", "1")
    assert code == 2 and "initrd.img is not the file the manifest names" in err
    code, out, err = run(capsys, "qemu-cmd", "--platform", "sim", "--image", str(sim_image), "--vcpus", "1",
                         "--memory", "2G", "--accel", "tcg", "--json")
    assert code == 0, err
    argv = json.loads(out)["argv"]
    assert argv[argv.index("-kernel") + 1] == str(image.kernel) and "-accel" in argv and "-enable-kvm" not in argv
    assert not any("sev-snp-guest" in a or "tdx-guest" in a for a in argv)


def test_confidential_platforms_need_firmware_and_kvm(capsys, tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"k" * 4096)
    code, _, err = run(capsys, "qemu-cmd", "--platform", "snp", "--kernel", str(kernel), "--vcpus", "1")
    assert code == 2 and "--ovmf: needed for --platform snp" in err
    ovmf = str(synthetic_ovmf(tmp_path / "OVMF.amdsev.fd"))
    code, _, err = run(capsys, "qemu-cmd", "--platform", "snp", "--ovmf", ovmf, "--kernel", str(kernel),
                       "--vcpus", "1", "--accel", "tcg")
    assert code == 2 and "only for --platform sim" in err
    code, _, err = run(capsys, "qemu-cmd", "--platform", "sim", "--vcpus", "1")
    assert code == 2 and "give --image or --kernel" in err


def test_measure_tdx_of_the_image_binds_its_configuration(capsys, sim_image: Path, tmp_path: Path) -> None:
    """`measure --tdx --image`: the image's kernel, initrd and command line, and MRCONFIGID = its config's SHA-256
    then 16 zero bytes (Debian's OVMF.fd carries TDVF metadata); the policy it writes pins them."""
    image = load_image(sim_image)
    policy = tmp_path / "tdx.yaml"
    code, out, err = run(capsys, "measure", "--tdx", "--ovmf", "/usr/share/ovmf/OVMF.fd", "--image", str(sim_image),
                         "--memory", "2G", "--json", "--policy-out", str(policy))
    assert code == 0, err
    shown = json.loads(out)
    assert shown["mrconfigid"] == (image.host_data + bytes(16)).hex()
    assert shown["initrd"] == hashlib.sha384((sim_image / "initrd.img").read_bytes()).hexdigest()
    assert shown["cmdline"].startswith(image.cmdline)
    loaded = load_policy(policy)
    assert loaded.is_measured("tdx")
    assert loaded.tdx.mrconfigid == shown["mrconfigid"]
