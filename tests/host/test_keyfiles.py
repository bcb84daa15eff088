"""The host agent's EAR signing key: refused at start when others could read or replace it, never re-chmodded."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from attestation.keyfile import KeyFileError
from host.ear import KEY_FILE, EarSigner


def test_loose_ear_signing_key_refused(tmp_path: Path, monkeypatch) -> None:
    signer = EarSigner.load_or_create(tmp_path)
    key = tmp_path / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    os.chmod(key, 0o644)
    with pytest.raises(KeyFileError, match=rf"EAR signing key {key}: its mode 644 .*chmod 600 {key}"):
        EarSigner.load_or_create(tmp_path)
    assert stat.S_IMODE(key.stat().st_mode) == 0o644      # refused as found, not silently tightened
    os.chmod(key, 0o600)
    assert EarSigner.load_or_create(tmp_path).public_jwk() == signer.public_jwk()
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    with pytest.raises(KeyFileError, match="not by this process's user"):
        EarSigner.load_or_create(tmp_path)
