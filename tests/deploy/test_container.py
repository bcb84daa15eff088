"""Dockerfile.confidential: its reproducibility rules, and what can be checked of them without a container engine
(none runs here, and Docker Hub is unreachable, so the image itself is not built in this suite): the hash-locked
dependencies install byte-identically twice with the Dockerfile's own pip command, and its configuration-digest step
prints the SHA-256 the enclave checks against HOST_DATA."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from enclave.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.confidential"


def _logical_lines() -> list[str]:
    """The Dockerfile's instructions with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if not current and raw.lstrip().startswith("#"):
            continue
        if raw.endswith("\\"):
            current += raw[:-1] + " "
            continue
        current += raw
        if current.strip():
            lines.append(current.strip())
        current = ""
    return lines


def _pip_line() -> str:
    return next(line for line in _logical_lines() if line.startswith("RUN pip install"))


def test_dockerfile_rules() -> None:
    lines = _logical_lines()
    image_arg = next(line for line in lines if line.startswith("ARG PYTHON_IMAGE="))
    assert re.fullmatch(r"ARG PYTHON_IMAGE=python:3\.11[.\d]*-slim-bookworm@sha256:[0-9a-f]{64}", image_arg)
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms and all(line.split()[1] == "${PYTHON_IMAGE}" for line in froms)     # every stage: the pinned base
    pip = _pip_line().split()
    for flag in ("--require-hashes", "--no-deps", "--only-binary=:all:", "--no-compile", "--ignore-installed"):
        assert flag in pip
    assert pip[pip.index("-r") + 1] == "requirements.lock"
    assert sum(line.startswith("RUN pip") for line in lines) == 1                       # nothing else installed
    assert "COPY requirements.lock ./" in lines
    assert all("SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH}" in line for line in lines if line.startswith("ENV SOURCE"))
    assert sum(line.startswith("ARG SOURCE_DATE_EPOCH=") for line in lines) == len(froms)   # per stage
    assert sum("PYTHONDONTWRITEBYTECODE=1" in line for line in lines) == len(froms)
    assert not any("CUBE_ENCLAVE__" in line for line in lines)       # refused outside simulation
    entry = next(line for line in lines if line.startswith("ENTRYPOINT"))
    assert '"-I", "-B", "-m", "enclave.main", "serve", "--config", "/etc/cube/enclave.yaml"' in entry
    assert "--simulate" not in entry and '"--data-dir", "/var/lib/cube"' in entry
    assert any("sha256sum /etc/cube/enclave.yaml" in line for line in lines)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "**/__pycache__" in ignored and "**/*.pyc" in ignored


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    out = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            content = "->" + os.readlink(path)
        elif stat.S_ISDIR(info.st_mode):
            content = "dir"
        else:
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        out[str(path.relative_to(root))] = (stat.S_IMODE(info.st_mode), content)
    return out


def test_the_lock_installs_byte_identically_twice(tmp_path: Path) -> None:
    """The Dockerfile's pip command (its --prefix moved to a temporary directory), run twice: the same files with the
    same modes and contents, and no bytecode. Layer timestamps are the builder's part (SOURCE_DATE_EPOCH)."""
    words = shlex.split(_pip_line())[1:]
    assert words[:3] == ["pip", "install", "--no-compile"]
    trees = []
    for name in ("a", "b"):
        prefix = tmp_path / name
        args = [w if w != "--prefix=/install" else f"--prefix={prefix}" for w in words[2:]]
        assert f"--prefix={prefix}" in args
        env = {**os.environ, "SOURCE_DATE_EPOCH": "1735689600", "PYTHONDONTWRITEBYTECODE": "1",
               "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        trees.append(_tree(prefix))
    assert trees[0] == trees[1]
    assert len(trees[0]) > 1000 and not [p for p in trees[0] if p.endswith(".pyc")]
    names = {p.split("/")[3] for p in trees[0] if p.startswith("lib/python3.11/site-packages/") and p.count("/") > 3}
    assert {"cryptography", "pydantic", "sqlalchemy", "uvicorn", "cbor2"} <= {n.lower() for n in names}


def _digest_step() -> str:
    """The shell of the build step that computes, prints and checks the configuration's SHA-256."""
    run = next(line for line in _logical_lines() if "sha256sum /etc/cube/enclave.yaml" in line)
    start = run.index("digest=$(")
    end = run.index(" && install -d")
    return run[start:end]


@pytest.mark.parametrize("expected, code", [("right", 0), ("", 0), ("0" * 64, 1)])
def test_the_build_prints_and_checks_the_digest_the_enclave_binds(tmp_path: Path, expected: str, code: int) -> None:
    config = tmp_path / "enclave.yaml"
    config.write_bytes((ROOT / "config" / "enclave.yaml").read_bytes() + b"# baked\n")
    digest = load_settings(config, environ={}).config_file.sha256.hex()
    script = _digest_step().replace("/etc/cube/enclave.yaml", str(config))
    env = {**os.environ, "CUBE_CONFIG_SHA256": digest if expected == "right" else expected}
    proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert f"configuration SHA-256: {digest} = SNP HOST_DATA; TDX MRCONFIGID: {digest}{'0' * 32}" in proc.stdout
    assert (tmp_path / "enclave.yaml.sha256").read_text().strip() == digest
    if code:
        assert f"the configuration's SHA-256 is {digest}" in proc.stderr
