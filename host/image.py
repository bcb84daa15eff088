"""A built enclave image as the launch tooling reads it: its kernel, initramfs, command line and config digest.

``cube-host measure --image DIR`` and ``cube-host qemu-cmd --image DIR`` take everything from the image's
``manifest.json`` (written by ``host.image_build``), after checking that the kernel and initramfs beside it are
the ones the manifest names, so what is measured, what is booted and what the build recorded cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .measure import LaunchError

MANIFEST_NAME = "manifest.json"
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class BuiltImage:
    directory: Path
    kernel: Path
    initrd: Path
    cmdline: str
    config_sha256: bytes
    image_id: str
    simulate: bool
    manifest: dict[str, Any]

    @property
    def host_data(self) -> bytes:
        """SNP HOST_DATA for this image: the SHA-256 of its configuration file."""
        return self.config_sha256


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _hex64(manifest: dict[str, Any], *keys: str) -> str:
    value: Any = manifest
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise LaunchError(f"image manifest: {'.'.join(keys)} is not a SHA-256 in hex")
    return value


def load_image(directory: Path) -> BuiltImage:
    """The image in ``directory``; LaunchError when its manifest is missing or its files do not match it."""
    path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LaunchError(f"--image {directory}: no {MANIFEST_NAME} (build one with `cube-host image build`)") from None
    except (OSError, ValueError) as exc:
        raise LaunchError(f"--image {directory}: cannot read {MANIFEST_NAME} ({exc})") from None
    if not isinstance(manifest, dict):
        raise LaunchError(f"--image {directory}: {MANIFEST_NAME} is not a JSON object")
    files = {}
    for part in ("kernel", "initrd"):
        entry = manifest.get(part)
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            raise LaunchError(f"image manifest: {part}.file is not a file name")
        file = directory / name
        expected = _hex64(manifest, part, "sha256")
        if not file.is_file():
            raise LaunchError(f"--image {directory}: {name} is missing")
        if _sha256(file) != expected:
            raise LaunchError(f"--image {directory}: {name} is not the file the manifest names (SHA-256 differs); "
                              "rebuild the image or restore the file")
        files[part] = file
    cmdline = manifest.get("cmdline")
    if not isinstance(cmdline, str) or not cmdline or "\x00" in cmdline:
        raise LaunchError("image manifest: cmdline is missing")
    image_id = _hex64(manifest, "image_id")
    return BuiltImage(directory=directory, kernel=files["kernel"], initrd=files["initrd"], cmdline=cmdline,
                      config_sha256=bytes.fromhex(_hex64(manifest, "config", "sha256")), image_id=image_id,
                      simulate=manifest.get("simulate") is True, manifest=manifest)
