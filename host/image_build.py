"""Build the enclave VM image: a Debian kernel and one initramfs holding everything the guest executes.

The image boots by direct kernel boot, so the SNP launch measurement (QEMU ``kernel-hashes=on``) covers the
kernel, this initramfs and the kernel command line; TDX's RTMRs cover the same three. Inside the initramfs:
``/init`` (``image/init``), a static busybox, the Python 3.11 runtime and the libraries it links (Debian
packages, unpacked with ``dpkg-deb -x``), the locked dependencies (``requirements.lock``, installed with
``--require-hashes``), Cube AI itself (its wheel, built from the project) and the configuration
(``/etc/cube-ai/enclave.yaml``). The only disk is the data disk, which holds state and is never executed
from (see ``image/init``).

Reproducible: the same inputs (Debian package versions, lock file, project sources, configuration, recipe,
``SOURCE_DATE_EPOCH``) give a byte-identical kernel and initramfs (``host.initrd`` fixes order, owners, times,
modes and compression). ``manifest.json`` records the inputs and the outputs' SHA-256, the command line and the
configuration's SHA-256 (what HOST_DATA / MRCONFIGID carry). Debian packages are fetched with ``apt-get
download`` and checked against the SHA-256 apt's (signed) package lists give.

The builder needs Debian's apt, ``dpkg-deb`` and this project's Python environment (pip); it never runs the
guest's programs except the static busybox (to list its applets).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .initrd import CharDevice, write_initrd
from .measure import LaunchError

RECIPE_VERSION = 1
MANIFEST_NAME = "manifest.json"
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
CONFIG_PATH = "etc/cube-ai/enclave.yaml"
IMAGE_ID_PATH = "etc/cube-ai/image-id"
MODULES_ORDER_PATH = "etc/cube-ai/modules.order"
SITE_PACKAGES = "usr/lib/python3/dist-packages"
PYTHON_VERSION = "3.11"
DEFAULT_EPOCH = 1735689600  # 2025-01-01T00:00:00Z; any fixed value works, the build records it
DEFAULT_KERNEL_PACKAGE = "linux-image-amd64"
DEFAULT_DATA_DEVICE = "/dev/vda"
BASE_CMDLINE = "console=ttyS0 panic=-1 loglevel=4"

# The Python runtime: these packages and their dependency closure, minus what a Python process never needs
# (package management, Perl, documentation helpers).
PYTHON_ROOTS = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6")
NOT_NEEDED = frozenset({
    "dpkg", "install-info", "tar", "perl", "perl-base", "perl-modules-5.36", "libperl5.36", "mailcap",
    "mime-support", "debconf", "debianutils", "readline-common", "libc-bin", "tzdata",
})
BUSYBOX_PACKAGE = "busybox-static"
# Kernel modules /init loads (with their dependencies), when the kernel has them as modules. Missing ones are
# fine when built in; tdx_guest/tsm exist only in newer kernels (6.7+).
WANTED_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_rng", "ext4", "crc32c_generic",
                  "crc32c_intel", "configfs", "sev_guest", "tdx_guest", "tsm_report", "tsm",
                  "vmw_vsock_virtio_transport")
# Unpacked from Debian packages but never used by the guest: left out to keep the image small.
PRUNED = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
          "usr/share/bug", "usr/lib/python3.11/ensurepip", "usr/lib/python3.11/idlelib",
          "usr/lib/python3.11/tkinter", "usr/lib/python3.11/turtledemo", "usr/lib/python3.11/lib2to3",
          "boot", "etc/cron.daily", "usr/bin/pydoc3.11")
DIRECTORIES = ("proc", "sys", "dev", "tmp", "root", "run", "var/lib/cube-ai", "etc/cube-ai")
DEVICES = (CharDevice("dev/console", 5, 1), CharDevice("dev/null", 1, 3, 0o666))


class ImageBuildError(LaunchError):
    """The image cannot be built from these inputs (a tool failed, a package or file is missing)."""


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    sha256: str
    path: Path

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


@dataclass(frozen=True)
class ImageRecipe:
    """What an image is built from; ``out`` receives vmlinuz, initrd.img and manifest.json."""

    config: Path
    out: Path
    project: Path
    simulate: bool = False
    data_device: str = DEFAULT_DATA_DEVICE
    kernel_package: str = DEFAULT_KERNEL_PACKAGE
    source_date_epoch: int = DEFAULT_EPOCH
    deb_cache: Path | None = None
    extra_cmdline: str = ""
    python: str = field(default_factory=lambda: sys.executable)

    @property
    def lock(self) -> Path:
        return self.project / "requirements.lock"

    @property
    def init_script(self) -> Path:
        return self.project / "image" / "init"

    def cmdline(self) -> str:
        parts = [BASE_CMDLINE, f"cube.data={self.data_device}"]
        if self.simulate:
            parts.append("cube.simulate=1")
        if self.extra_cmdline:
            parts.append(self.extra_cmdline)
        return " ".join(parts)


def default_project() -> Path:
    """The project checkout this module belongs to (it is installed editable: the recipe lives beside it)."""
    return Path(__file__).resolve().parent.parent


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ImageBuildError(f"{argv[0]}: not installed (Debian: apt-get install {argv[0]})") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise ImageBuildError(f"{' '.join(argv[:3])} ... failed (exit {done.returncode}):\n{tail}")
    return done.stdout


# -- Debian packages ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _candidate(name: str) -> dict[str, str]:
    """The fields apt's package lists give for the candidate version of ``name``."""
    text = _run(["apt-cache", "show", "--no-all-versions", name])
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith(" "):
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "Version" not in fields or "SHA256" not in fields:
        raise ImageBuildError(f"apt-cache show {name}: no candidate version with a SHA256 (apt-get update?)")
    return fields


def _kernel_image_package(meta: str) -> str:
    """``linux-image-amd64`` depends on the versioned image package; that one is what gets unpacked."""
    if re.fullmatch(r"linux-image-[0-9].*", meta):
        return meta
    depends = _candidate(meta).get("Depends", "")
    for item in depends.split(","):
        name = item.strip().split(" ")[0]
        if name.startswith("linux-image-") and name[len("linux-image-"):][:1].isdigit():
            return name
    raise ImageBuildError(f"{meta}: depends on no versioned linux-image package")


def python_packages() -> list[str]:
    """The dependency closure of the Python runtime (apt's view), minus ``NOT_NEEDED``."""
    seen: set[str] = set()
    todo = list(PYTHON_ROOTS)
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_NEEDED:
            continue
        seen.add(name)
        depends = _candidate(name).get("Depends", "") + "," + _candidate(name).get("Pre-Depends", "")
        for item in depends.split(","):
            alternative = item.split("|")[0].strip()
            dep = alternative.split(" ")[0].split(":")[0]
            if dep and dep not in seen:
                todo.append(dep)
    return sorted(seen)


def fetch_debs(names: Iterable[str], cache: Path) -> list[DebPackage]:
    """Download (or reuse from ``cache``) each package's candidate version, checked against apt's SHA256."""
    cache.mkdir(parents=True, exist_ok=True)
    wanted = []
    for name in sorted(set(names)):
        fields = _candidate(name)
        version, expected = fields["Version"], fields["SHA256"].lower()
        path = cache / f"{name}_{version.replace(':', '%3a')}_{fields.get('Architecture', 'amd64')}.deb"
        wanted.append((name, version, expected, path))
    missing = [f"{name}={version}" for name, version, expected, path in wanted
               if not path.is_file() or sha256_file(path) != expected]
    if missing:
        _run(["apt-get", "download", "-q", *missing], cwd=cache)
    found: list[DebPackage] = []
    for name, version, expected, path in wanted:
        if not path.is_file():
            raise ImageBuildError(f"apt-get download {name}={version}: no {path.name} afterwards")
        actual = sha256_file(path)
        if actual != expected:
            raise ImageBuildError(f"{path.name}: SHA-256 {actual} is not the {expected} apt's package lists give")
        found.append(DebPackage(name, version, actual, path))
    return found


def unpack(deb: DebPackage, root: Path) -> None:
    _run(["dpkg-deb", "-x", str(deb.path), str(root)])


def _unpacked_kernel(deb: DebPackage, cache: Path) -> Path:
    """The kernel package unpacked once beside the cache (it is large), keyed by its SHA-256."""
    where = cache / f"unpacked-{deb.name}-{deb.sha256[:16]}"
    stamp = where / ".complete"
    if not stamp.is_file():
        shutil.rmtree(where, ignore_errors=True)
        unpack(deb, where)
        stamp.write_text(deb.sha256 + "\n")
    return where


# -- kernel modules ----------------------------------------------------------------------------------------

def module_name(path: Path) -> str:
    return path.name.removesuffix(".ko").replace("-", "_")


def module_depends(path: Path) -> list[str]:
    """The ``depends=`` entry of a module's .modinfo (NUL-separated key=value strings)."""
    data = path.read_bytes()
    for match in re.finditer(rb"(?:^|\x00)depends=([^\x00]*)", data):
        return [d.replace("-", "_") for d in match.group(1).decode().split(",") if d]
    return []


def module_load_order(modules_dir: Path, wanted: Iterable[str]) -> list[Path]:
    """The wanted modules that exist, with their dependencies first (paths relative to ``modules_dir``)."""
    index = {module_name(p): p for p in sorted(modules_dir.rglob("*.ko"))}
    order: list[Path] = []
    placed: set[str] = set()

    def place(name: str, chain: tuple[str, ...]) -> None:
        if name in placed:
            return
        if name in chain:
            raise ImageBuildError(f"kernel module dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in index:
            if chain:  # a dependency the kernel lists must exist
                raise ImageBuildError(f"kernel module {chain[-1]} needs {name}, which the kernel package lacks")
            return
        for dep in module_depends(index[name]):
            place(dep, chain + (name,))
        placed.add(name)
        order.append(index[name].relative_to(modules_dir))

    for name in wanted:
        place(name, ())
    return order


# -- Python packages ---------------------------------------------------------------------------------------

def _pip(recipe: ImageRecipe, *args: str) -> None:
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(recipe.source_date_epoch), PIP_NO_INPUT="1",
               PYTHONDONTWRITEBYTECODE="1")
    _run([recipe.python, "-m", "pip", *args], cwd=recipe.project, env=env)


def build_app_wheel(recipe: ImageRecipe, dest: Path) -> Path:
    _pip(recipe, "wheel", "--no-deps", "-q", "-w", str(dest), str(recipe.project))
    wheels = sorted(dest.glob("cube_ai-*.whl"))
    if len(wheels) != 1:
        raise ImageBuildError(f"pip wheel: expected one cube_ai wheel, found {[w.name for w in wheels]}")
    return wheels[0]


# Cube AI's wheel also carries the host agent (this package), which the guest never runs: left out of the image.
HOST_ONLY_PACKAGES = ("host/",)


def wheel_digest(wheel: Path) -> str:
    """SHA-256 over the member names and contents of the wheel's guest part (zip timestamps left out)."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(zf.namelist()):
            if name.startswith(HOST_ONLY_PACKAGES):
                continue
            digest.update(name.encode() + b"\x00" + hashlib.sha256(zf.read(name)).digest())
    return digest.hexdigest()


# The guest's interpreter, not the builder's: wheels are chosen for CPython 3.11 on x86-64 glibc 2.36 (Debian
# bookworm), whatever Python or C library runs the build.
GUEST_WHEEL_TAGS = ("--implementation", "cp", "--python-version", PYTHON_VERSION, "--abi", "cp311",
                    *(f"--platform=manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1)),
                    "--platform=manylinux2014_x86_64")


def install_python_packages(recipe: ImageRecipe, wheel: Path, target: Path) -> list[str]:
    """The locked dependencies, then Cube AI, into the image's site directory; returns ``name==version``s."""
    common = ["install", "-q", "--no-deps", "--no-compile", "--only-binary=:all:", "--no-warn-script-location",
              "--disable-pip-version-check", *GUEST_WHEEL_TAGS, "--target", str(target)]
    _pip(recipe, *common, "--require-hashes", "-r", str(recipe.lock))
    _pip(recipe, *common, str(wheel))
    shutil.rmtree(target / "bin", ignore_errors=True)  # console scripts name the builder's interpreter
    for package in HOST_ONLY_PACKAGES:
        shutil.rmtree(target / package, ignore_errors=True)
    installed = []
    for info in sorted(target.glob("*.dist-info")):
        (info / "direct_url.json").unlink(missing_ok=True)  # names the builder's temporary wheel path
        record = info / "RECORD"
        if record.is_file():  # keep RECORD consistent with the removals
            lines = [ln for ln in record.read_text().splitlines()
                     if not ln.startswith(("../", "bin/", *HOST_ONLY_PACKAGES)) and "/direct_url.json," not in ln]
            record.write_text("\n".join(lines) + "\n")
        meta = (info / "METADATA").read_text(errors="replace")
        name = re.search(r"^Name: (.+)$", meta, re.M)
        version = re.search(r"^Version: (.+)$", meta, re.M)
        installed.append(f"{name.group(1) if name else info.name}=={version.group(1) if version else '?'}")
    for cache in target.rglob("__pycache__"):
        shutil.rmtree(cache)
    return installed


# -- assembly ----------------------------------------------------------------------------------------------

def _prune(root: Path) -> None:
    for rel in PRUNED:
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _busybox_links(root: Path) -> None:
    """A link for every applet busybox has, where the Debian packages put no program of that name."""
    busybox = root / "bin" / "busybox"
    for full in _run([str(busybox), "--list-full"]).split():
        link = root / full.lstrip("/")
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(busybox, link.parent))


def build_id(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def build_image(recipe: ImageRecipe) -> dict[str, Any]:
    """Build the image into ``recipe.out``; returns the manifest (also written to ``out/manifest.json``)."""
    for path, what in ((recipe.config, "--config"), (recipe.lock, "requirements.lock"),
                       (recipe.init_script, "image/init")):
        if not path.is_file():
            raise ImageBuildError(f"{what} {path}: no such file")
    if not 0 <= recipe.source_date_epoch < 1 << 32:
        raise ImageBuildError("SOURCE_DATE_EPOCH must be a time after 1970 that fits 32 bits")
    if recipe.data_device != "none" and not re.fullmatch(r"/dev/[a-z][a-z0-9]{1,15}", recipe.data_device):
        raise ImageBuildError(f"--data-device {recipe.data_device!r}: expected /dev/NAME (e.g. /dev/vda) or none")
    if "\x00" in recipe.extra_cmdline or "\n" in recipe.extra_cmdline:
        raise ImageBuildError("--append: must be one line without NUL characters")
    recipe.out.mkdir(parents=True, exist_ok=True)
    cache = recipe.deb_cache or recipe.project / ".cache" / "image" / "debs"
    with tempfile.TemporaryDirectory(prefix="cube-image-") as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "root"
        root.mkdir()
        kernel_package = _kernel_image_package(recipe.kernel_package)
        debs = fetch_debs([*python_packages(), BUSYBOX_PACKAGE, kernel_package], cache)
        kernel_dir: Path | None = None
        for deb in debs:
            if deb.name == kernel_package:
                kernel_dir = _unpacked_kernel(deb, cache)
            else:
                unpack(deb, root)
        if kernel_dir is None:  # pragma: no cover - fetch_debs returns every package asked for
            raise ImageBuildError(f"{kernel_package}: not fetched")
        kernels = sorted((kernel_dir / "boot").glob("vmlinuz-*"))
        releases = sorted((kernel_dir / "lib" / "modules").iterdir())
        if len(kernels) != 1 or len(releases) != 1:
            raise ImageBuildError(f"{kernel_package}: expected one kernel and one module tree")
        release = releases[0].name
        order = module_load_order(releases[0], WANTED_MODULES)
        for rel in order:
            dest = root / "lib" / "modules" / release / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(releases[0] / rel, dest)
        _prune(root)
        _busybox_links(root)
        wheel = build_app_wheel(recipe, tmp / "wheel")
        installed = install_python_packages(recipe, wheel, root / SITE_PACKAGES)
        for rel in DIRECTORIES:
            (root / rel).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(recipe.config, root / CONFIG_PATH)
        shutil.copyfile(recipe.init_script, root / "init")
        (root / "init").chmod(0o755)
        (root / MODULES_ORDER_PATH).write_text("".join(f"{release}/{rel.as_posix()}\n" for rel in order))
        config_sha256 = sha256_file(recipe.config)
        inputs = {
            "recipe_version": RECIPE_VERSION,
            "source_date_epoch": recipe.source_date_epoch,
            "debian_packages": [d.to_json() for d in debs],
            "requirements_lock_sha256": sha256_file(recipe.lock),
            "python_packages": installed,
            "app_wheel": {"name": wheel.name, "content_sha256": wheel_digest(wheel)},
            "init_sha256": sha256_file(recipe.init_script),
            "config_sha256": config_sha256,
            "kernel_release": release,
            "modules": [rel.as_posix() for rel in order],
            "cmdline": recipe.cmdline(),
        }
        image_id = build_id(inputs)
        (root / IMAGE_ID_PATH).write_text(image_id + "\n")
        shutil.copyfile(kernels[0], recipe.out / KERNEL_NAME)
        write_initrd(root, recipe.out / INITRD_NAME, mtime=recipe.source_date_epoch, devices=DEVICES)
    manifest = {
        "image_id": image_id,
        **inputs,
        "kernel": {"file": KERNEL_NAME, "sha256": sha256_file(recipe.out / KERNEL_NAME), "package": kernel_package},
        "initrd": {"file": INITRD_NAME, "sha256": sha256_file(recipe.out / INITRD_NAME),
                   "bytes": (recipe.out / INITRD_NAME).stat().st_size},
        "config": {"file": recipe.config.name, "sha256": config_sha256, "path": "/" + CONFIG_PATH},
        "simulate": recipe.simulate,
        "data_device": recipe.data_device,
    }
    (recipe.out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest
