"""The built image: what its initramfs holds (and does not), what its manifest records, and that building it again
from the same inputs gives a byte-identical kernel and initramfs (a second full build, about two minutes)."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from host.image_build import ImageRecipe, build_image, module_load_order
from host.initrd import read_cpio
from tests.image.conftest import DEB_CACHE, ROOT


@pytest.fixture(scope="module")
def entries(sim_image: Path) -> dict[str, tuple[int, bytes]]:
    return read_cpio(gzip.decompress((sim_image / "initrd.img").read_bytes()))


def test_the_initrd_holds_everything_executed(sim_image: Path, entries: dict[str, tuple[int, bytes]]) -> None:
    manifest = json.loads((sim_image / "manifest.json").read_text())
    config = (ROOT / "image" / "enclave.yaml").read_bytes()
    assert entries["etc/cube-ai/enclave.yaml"][1] == config
    assert manifest["config"]["sha256"] == hashlib.sha256(config).hexdigest()
    assert manifest["requirements_lock_sha256"] == hashlib.sha256((ROOT / "requirements.lock").read_bytes()).hexdigest()
    assert entries["init"] == (0o100755, (ROOT / "image" / "init").read_bytes())
    assert entries["etc/cube-ai/image-id"][1].decode().strip() == manifest["image_id"]
    assert entries["usr/bin/python3.11"][0] == 0o100755
    assert entries["bin/busybox"][0] == 0o100755 and entries["bin/sh"] == (0o120777, b"busybox")
    site = "usr/lib/python3/dist-packages/"
    for module in ("enclave/main.py", "attestation/sim.py", "fastapi/__init__.py", "cryptography/__init__.py",
                   "uvicorn/__init__.py", "sqlalchemy/__init__.py"):
        assert site + module in entries, module
    # every locked distribution is there, at the locked version
    locked = {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1].split()[0]
              for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line and not line.startswith("#")}
    installed = {p.split("==")[0].lower().replace("_", "-"): p.split("==")[1] for p in manifest["python_packages"]}
    assert {k: installed.get(k) for k in locked} == locked
    assert installed["cube-ai"] == "0.1.0"
    # nothing that names the builder's interpreter or paths, no bytecode (compiled in guest memory only)
    assert not any(n.endswith(".pyc") or "/__pycache__" in n for n in entries)
    assert not any(n.startswith(site + "host/") for n in entries)   # the host agent never runs in the guest
    assert not any(n.endswith("direct_url.json") or n.startswith(site + "bin/") for n in entries)
    assert not any(b"/.venv/" in content for n, (mode, content) in entries.items() if n.startswith(site) and
                   n.endswith((".py", "RECORD", "METADATA", ".pth")))
    # the modules /init loads are in the image, dependencies first
    order = entries["etc/cube-ai/modules.order"][1].decode().split()
    assert order and all(f"lib/modules/{m}" in entries for m in order)
    names = [Path(m).name for m in order]
    assert names.index("jbd2.ko") < names.index("ext4.ko") and "virtio_net.ko" in names and "sev-guest.ko" in names
    assert manifest["cmdline"].endswith("cube.simulate=1") and "root=" not in manifest["cmdline"]


def test_module_order_puts_dependencies_first(tmp_path: Path) -> None:
    mods = tmp_path / "kernel"
    mods.mkdir()
    (mods / "a.ko").write_bytes(b"\x00name=a\x00depends=b-c,d\x00")
    (mods / "b-c.ko").write_bytes(b"\x00depends=d\x00")
    (mods / "d.ko").write_bytes(b"\x00depends=\x00")
    assert [p.name for p in module_load_order(mods, ["a", "missing_builtin"])] == ["d.ko", "b-c.ko", "a.ko"]
    (mods / "d.ko").write_bytes(b"\x00depends=gone\x00")
    with pytest.raises(ValueError, match="needs gone"):
        module_load_order(mods, ["a"])


def test_building_twice_gives_identical_kernel_and_initrd(sim_image: Path, tmp_path: Path) -> None:
    first = json.loads((sim_image / "manifest.json").read_text())
    again = build_image(ImageRecipe(config=ROOT / "image" / "enclave.yaml", out=tmp_path / "again", project=ROOT,
                                    simulate=True, deb_cache=DEB_CACHE))
    if again["debian_packages"] != first["debian_packages"]:
        pytest.fail("Debian published new package versions since the cached build: remove .cache/image and rerun")
    assert again["kernel"]["sha256"] == first["kernel"]["sha256"]
    assert again["initrd"]["sha256"] == first["initrd"]["sha256"]
    assert again["image_id"] == first["image_id"]
    assert (tmp_path / "again" / "initrd.img").read_bytes() == (sim_image / "initrd.img").read_bytes()


@pytest.mark.parametrize("field, value, message", [
    ("data_device", "/dev/vda root=/dev/vdb", "expected /dev/NAME"),
    ("extra_cmdline", "a\nb", "one line"),
    ("source_date_epoch", -1, "SOURCE_DATE_EPOCH"),
])
def test_bad_recipe_refused_before_anything_is_fetched(tmp_path: Path, field: str, value: object, message: str) -> None:
    recipe = ImageRecipe(config=ROOT / "image" / "enclave.yaml", out=tmp_path / "out", project=ROOT,
                         **{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        build_image(recipe)
    assert not (tmp_path / "out").exists()


def test_the_data_disk_is_mounted_without_exec_devices_setuid_or_symlinks() -> None:
    """Every mount of the host-writable data directory: no programs, device nodes, setuid bits, and no symlinks
    followed (one planted on the disk would otherwise lead the enclave's writes into the initramfs root)."""
    init = (ROOT / "image" / "init").read_text()
    mounts = [line.split() for line in init.splitlines() if line.strip().startswith(("mount ", "if ! mount "))
              and '"$data_dir"' in line]
    assert len(mounts) == 3, mounts   # tmpfs (cube.data=none), the first try, after formatting a blank disk
    for words in mounts:
        options = set(words[words.index("-o") + 1].split(","))
        assert {"nosuid", "nodev", "noexec", "nosymfollow"} <= options, words
