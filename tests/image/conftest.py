"""The enclave image, built once per input set into ``.cache/image/<key>`` (git-ignored), so reruns are fast.

The key hashes what goes into the image from this checkout (the recipe, the lock file, the project's Python
sources, the configuration) and the build options; Debian's package versions are part of the manifest, not of
the key (a cached image built from older packages stays valid for these tests). A full build takes about two
minutes here (packages from apt's cache directory, wheels from pip's).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from host.image_build import ImageRecipe, build_image

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "image"
DEB_CACHE = CACHE / "debs"
KEYED_SOURCES = ("attestation", "enclave")   # the host package is left out of the image
KEYED_FILES = ("pyproject.toml", "requirements.lock", "image/init", "image/enclave.yaml", "host/image_build.py",
               "host/initrd.py")


def input_key(config: Path, *, simulate: bool) -> str:
    digest = hashlib.sha256(json.dumps({"simulate": simulate}).encode())
    files = [ROOT / f for f in KEYED_FILES] + [config]
    for top in KEYED_SOURCES:
        files += sorted(p for p in (ROOT / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts
                        and p.suffix in (".py", ".ini", ".mako"))
    for path in files:
        digest.update(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:24]


def cached_image(config: Path, *, simulate: bool) -> Path:
    """The built image's directory for these inputs, building it when the cache has none."""
    out = CACHE / f"{'sim' if simulate else 'snp'}-{input_key(config, simulate=simulate)}"
    if not (out / "manifest.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        build_image(ImageRecipe(config=config, out=out, project=ROOT, simulate=simulate, deb_cache=DEB_CACHE))
    return out


@pytest.fixture(scope="session")
def sim_image() -> Path:
    """The default image, built with cube.simulate=1 (this machine has no SEV-SNP or TDX)."""
    return cached_image(ROOT / "image" / "enclave.yaml", simulate=True)
