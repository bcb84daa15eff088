"""Sealed state against a host that reads and writes data_dir: nothing there opens without the sealing key, and a
file that does not open is refused, never replaced."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import stat
import os
from pathlib import Path

import pytest
import sqlalchemy as sa

from attestation.errors import NoSealingKey, ProviderError
from attestation.providers import SimProvider
from enclave.config import ConfigError, load_settings
from enclave.platform_secrets import PlatformSecrets
from enclave.sealed_state import (FROM_CONFIG, FROM_LEGACY, FROM_PEER, FROM_SEALED, GENERATED, SEALED_FILE_NAME,
                                  SealedStateError, load_platform_secrets, obtain_platform_secrets,
                                  open_platform_secrets, platform_secrets_for, seal_platform_secrets)
from enclave.store import Store


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimProvider:
    return SimProvider(tmp_path_factory.mktemp("sealed-sim") / "sim")


@pytest.fixture(scope="module")
def other_sim(tmp_path_factory: pytest.TempPathFactory) -> SimProvider:
    """Another simulated machine: another chip secret, so another sealing key for the same guest."""
    return SimProvider(tmp_path_factory.mktemp("sealed-other-sim") / "sim")


class NoSealing:
    """A TDX-like provider: no hardware sealing key."""
    platform = "tdx"
    sealing_binding = "none"

    def derived_key(self, context: bytes) -> bytes:
        raise NoSealingKey("TDX has no hardware sealing key: the platform secrets must come from an attested peer")


class BrokenDevice:
    platform = "snp"
    sealing_binding = "snp-vcek:measurement,policy"

    def derived_key(self, context: bytes) -> bytes:
        raise ProviderError("sev-guest: firmware refused the key request (status 0x16)")


def _forms(secret: bytes) -> list[bytes]:
    """The ways a secret could lie in a file: raw, hex, base64 (standard and url-safe)."""
    return [secret, secret.hex().encode(), base64.b64encode(secret), base64.urlsafe_b64encode(secret).rstrip(b"=")]


def _assert_nothing_in(directory: Path, keys: PlatformSecrets) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in (keys.root, keys.pat_hmac_key(), keys.row_mac_key()):
                for form in _forms(secret):
                    assert form not in data, f"{path} holds a platform secret"


def test_generated_once_sealed_and_reopened(tmp_path: Path, sim: SimProvider) -> None:
    keys, origin = obtain_platform_secrets(tmp_path, sim)
    assert origin == GENERATED
    sealed = tmp_path / SEALED_FILE_NAME
    assert stat.S_IMODE(sealed.stat().st_mode) == 0o600
    again, origin = obtain_platform_secrets(tmp_path, sim)
    assert origin == FROM_SEALED and again.root == keys.root
    header = json.loads(sealed.read_bytes())
    assert header["format"] == "cube-sealed-state/v1" and header["platform"] == "sim"
    assert header["bound_to"] == sim.sealing_binding and header["aead"] == "AES-256-GCM"
    _assert_nothing_in(tmp_path, keys)


def test_another_platform_cannot_open_it_and_it_is_never_replaced(tmp_path: Path, sim: SimProvider,
                                                                   other_sim: SimProvider) -> None:
    """The host copies data_dir to a machine (here: a sim platform) of its own: the file does not open there,
    and the enclave refuses to start rather than make new secrets over it."""
    keys = load_platform_secrets(tmp_path, sim)
    sealed = tmp_path / SEALED_FILE_NAME
    before = sealed.read_bytes()
    with pytest.raises(SealedStateError, match="does not open with this guest's sealing key.*never replaced"):
        load_platform_secrets(tmp_path, other_sim)
    with pytest.raises(SealedStateError, match="never replaced"):
        load_platform_secrets(tmp_path, other_sim, obtain=PlatformSecrets.generate)   # nor taken from elsewhere
    assert sealed.read_bytes() == before
    assert load_platform_secrets(tmp_path, sim).root == keys.root


def test_another_measurement_cannot_open_it(tmp_path: Path, sim: SimProvider) -> None:
    """Another image (measurement) on the same machine derives another key."""
    data = seal_platform_secrets(PlatformSecrets.generate(), sim)

    class OtherImage:
        platform = "sim"
        sealing_binding = sim.sealing_binding

        def derived_key(self, context: bytes) -> bytes:
            return sim.sim.derived_key(context, measurement=b"\x02" * 48)

    with pytest.raises(SealedStateError, match="does not open"):
        open_platform_secrets(data, OtherImage())


@pytest.mark.parametrize("edit", ["bound_to", "platform", "format", "ciphertext", "nonce", "garbage", "secrets"])
def test_an_edited_file_is_refused(tmp_path: Path, sim: SimProvider, edit: str) -> None:
    load_platform_secrets(tmp_path, sim)
    sealed = tmp_path / SEALED_FILE_NAME
    doc = json.loads(sealed.read_bytes())
    if edit == "bound_to":
        doc["bound_to"] = "sim:nothing"          # the header is in the AAD
    elif edit == "platform":
        doc["platform"] = "snp"
    elif edit == "format":
        doc["format"] = "cube-sealed-state/v0"
    elif edit in ("ciphertext", "nonce"):
        raw = bytearray(base64.b64decode(doc[edit]))
        raw[len(raw) // 2] ^= 1
        doc[edit] = base64.b64encode(bytes(raw)).decode()
    elif edit == "secrets":                     # the host seals its own secrets with a key it does not have
        doc["ciphertext"] = base64.b64encode(PlatformSecrets(b"h" * 32).to_bytes() + bytes(16)).decode()
    if edit == "garbage":
        sealed.write_bytes(b"\x00not json")
    else:
        sealed.write_text(json.dumps(doc))
    before = sealed.read_bytes()
    with pytest.raises(SealedStateError, match="refused"):
        load_platform_secrets(tmp_path, sim)
    assert sealed.read_bytes() == before


def test_obtain_is_asked_only_when_nothing_is_sealed(tmp_path: Path, sim: SimProvider) -> None:
    given = PlatformSecrets.generate()
    calls: list[int] = []

    def obtain() -> PlatformSecrets:
        calls.append(1)
        return given

    got, origin = obtain_platform_secrets(tmp_path, sim, obtain=obtain)
    assert origin == FROM_PEER and got.root == given.root and calls == [1]
    got, origin = obtain_platform_secrets(tmp_path, sim, obtain=obtain)
    assert origin == FROM_SEALED and got.root == given.root and calls == [1]   # sealed: the peer is not asked


def test_without_a_sealing_key_nothing_is_written_and_it_says_so(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="enclave.sealed_state"):
        keys, origin = obtain_platform_secrets(tmp_path, NoSealing())
    assert origin == GENERATED and len(keys.root) == 32
    assert not (tmp_path / SEALED_FILE_NAME).exists()
    assert "NOT persisted" in caplog.text and "--join" in caplog.text
    with pytest.raises(SealedStateError, match="no sealed state.*--join.*no sealing key"):
        obtain_platform_secrets(tmp_path, NoSealing(), generate=False)


def test_a_device_error_is_a_refusal_not_a_silent_plaintext(tmp_path: Path) -> None:
    with pytest.raises(SealedStateError, match="cannot derive the sealing key.*0x16"):
        obtain_platform_secrets(tmp_path, BrokenDevice())
    assert list(tmp_path.iterdir()) == []


def _settings(tmp_path: Path, **overrides):
    return load_settings(None, environ={}, overrides={"data_dir": str(tmp_path), **overrides})


def test_configured_secret_is_for_simulation_only(tmp_path: Path, sim: SimProvider) -> None:
    with pytest.raises(ConfigError, match="only with --simulate"):
        platform_secrets_for(_settings(tmp_path, server_secret="x" * 40), sim)
    keys, origin = platform_secrets_for(_settings(tmp_path, server_secret="x" * 40, simulate=True), sim)
    assert origin == FROM_CONFIG and keys.root == b"x" * 40 and not (tmp_path / SEALED_FILE_NAME).exists()


def test_a_legacy_plaintext_secret_is_refused_outside_simulation(tmp_path: Path, sim: SimProvider) -> None:
    legacy = tmp_path / "server_secret"
    legacy.write_text("q" * 64 + "\n")
    legacy.chmod(0o600)
    with pytest.raises(SealedStateError, match="plaintext.*cannot be adopted.*new data_dir"):
        platform_secrets_for(_settings(tmp_path), sim)
    assert legacy.exists() and not (tmp_path / SEALED_FILE_NAME).exists()


def test_a_legacy_simulated_installation_is_migrated_once(tmp_path: Path, sim: SimProvider) -> None:
    """Simulation: the plaintext secret becomes the root, is sealed, then deleted; its rows (written before
    row MACs) are adopted once, by the start that migrates."""
    from enclave.bootstrap import PatDelivery
    from enclave.main import _prepare

    legacy = tmp_path / "server_secret"
    legacy.write_text("q" * 64 + "\n")
    legacy.chmod(0o600)
    settings = _settings(tmp_path, simulate=True)

    async def old_rows() -> None:   # rows as a version before 0003 left them: no MAC
        store = await Store.open(settings.effective_database_url(), row_key=b"o" * 32)
        try:
            await store.create_user("old-admin", is_superadmin=True)
            async with store.engine.begin() as conn:
                await conn.execute(sa.text("UPDATE users SET mac = NULL"))
        finally:
            await store.close()

    asyncio.run(old_rows())
    keys, origin = platform_secrets_for(settings, sim)
    assert origin == FROM_LEGACY and keys.root == b"q" * 64
    assert not legacy.exists() and (tmp_path / SEALED_FILE_NAME).exists()
    asyncio.run(_prepare(settings, PatDelivery("file", tmp_path / "pat"), keys, origin))

    async def users() -> list[str]:
        store = await Store.open(settings.effective_database_url(), row_key=keys.row_mac_key())
        try:
            return [u.name for u in await store.list_users()]
        finally:
            await store.close()

    assert asyncio.run(users()) == ["old-admin"]
    again, origin = platform_secrets_for(settings, sim)
    assert origin == FROM_SEALED and again.root == keys.root


def test_fresh_secrets_are_refused_over_a_database_in_use(tmp_path: Path, sim: SimProvider) -> None:
    """The host deletes the sealed file to make the enclave start over: with rows in the database it refuses
    (fresh secrets would leave a deployment whose every row is refused)."""
    from enclave.main import platform_secrets

    settings = _settings(tmp_path)
    keys, origin = platform_secrets(settings, sim)
    assert origin == GENERATED

    async def one_user() -> None:
        store = await Store.open(settings.effective_database_url(), row_key=keys.row_mac_key())
        try:
            await store.create_user("someone")
        finally:
            await store.close()

    asyncio.run(one_user())
    (tmp_path / SEALED_FILE_NAME).unlink()
    with pytest.raises(SealedStateError, match="database already holds rows"):
        platform_secrets(settings, sim)
    assert not (tmp_path / SEALED_FILE_NAME).exists()


def test_nothing_in_data_dir_after_a_start_holds_a_secret(tmp_path: Path, sim: SimProvider) -> None:
    """A whole start outside simulation (bootstrap included; the sim stands in for the sealing key): no file in
    data_dir holds the root or a derived key, in any encoding."""
    from enclave.bootstrap import PatDelivery
    from enclave.main import _prepare, platform_secrets

    settings = _settings(tmp_path)
    keys, origin = platform_secrets(settings, sim)
    delivered, _ = asyncio.run(_prepare(settings, PatDelivery("file", tmp_path / "pat"), keys, origin))
    assert delivered is not None
    assert not (tmp_path / "server_secret").exists()
    _assert_nothing_in(tmp_path, keys)



def _config(path: Path, text: str, data_dir: Path, **overrides):
    path.write_text(text)
    return load_settings(path, environ={}, overrides={"data_dir": str(data_dir), **overrides})


def test_the_sealed_state_opens_only_under_the_configuration_it_was_sealed_with(tmp_path: Path,
                                                                                sim: SimProvider) -> None:
    """The host launches the same image (same measurement, so the same sealing key) with a configuration of its
    own and a HOST_DATA to match it (the start check passes: the host chose both): that enclave must not open
    this deployment's secrets, or its own join policy / operator key would hand them out. Nor may the host
    re-label the file with its configuration's digest (the header is in the AAD)."""
    data_dir = tmp_path / "data"
    ours = _config(tmp_path / "ours.yaml", "log_level: INFO\n", data_dir)
    keys, origin = platform_secrets_for(ours, sim)
    assert origin == GENERATED
    sealed = data_dir / SEALED_FILE_NAME
    assert json.loads(sealed.read_bytes())["config"] == ours.config_file.sha256.hex()
    hosts = _config(tmp_path / "hosts.yaml", "log_level: INFO\nbootstrap: {admin_name: host}\n", data_dir)
    before = sealed.read_bytes()
    with pytest.raises(SealedStateError, match="refused: sealed under another configuration"):
        platform_secrets_for(hosts, sim)
    with pytest.raises(SealedStateError, match="refused"):        # nor fresh secrets, nor the peer's, instead
        platform_secrets_for(hosts, sim, obtain=PlatformSecrets.generate)
    assert sealed.read_bytes() == before
    doc = json.loads(before)
    doc["config"] = hosts.config_file.sha256.hex()
    sealed.write_text(json.dumps(doc))
    with pytest.raises(SealedStateError, match="does not open"):
        platform_secrets_for(hosts, sim)
    sealed.write_bytes(before)
    again, origin = platform_secrets_for(ours, sim)
    assert origin == FROM_SEALED and again.root == keys.root


def test_simulation_seals_unbound_so_a_development_config_may_change(tmp_path: Path, sim: SimProvider) -> None:
    data_dir = tmp_path / "data"
    first = _config(tmp_path / "a.yaml", "log_level: INFO\n", data_dir, simulate=True)
    keys, _ = platform_secrets_for(first, sim)
    assert json.loads((data_dir / SEALED_FILE_NAME).read_bytes())["config"] == "unbound"
    changed = _config(tmp_path / "b.yaml", "log_level: DEBUG\n", data_dir, simulate=True)
    again, origin = platform_secrets_for(changed, sim)
    assert origin == FROM_SEALED and again.root == keys.root
    # An unbound file does not open outside simulation: there the configuration must be the sealed one.
    with pytest.raises(SealedStateError, match="another configuration"):
        platform_secrets_for(_config(tmp_path / "a.yaml", "log_level: INFO\n", data_dir), sim)


def test_a_link_at_the_temporary_name_is_not_followed(tmp_path: Path, sim: SimProvider) -> None:
    """data_dir is the host's disk: a symbolic link put beforehand where the temporary file's name used to be
    predictable (the pid) must not make the enclave truncate and overwrite the file it points to (in the guest);
    the temporary name is random now, created exclusively and never through a link."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    victim = tmp_path / "guest-file"
    victim.write_text("the guest's own file\n")
    (data_dir / f".{SEALED_FILE_NAME}.{os.getpid()}.tmp").symlink_to(victim)
    keys, origin = obtain_platform_secrets(data_dir, sim)
    assert origin == GENERATED and victim.read_text() == "the guest's own file\n"
    sealed = data_dir / SEALED_FILE_NAME
    assert not sealed.is_symlink() and stat.S_IMODE(sealed.stat().st_mode) == 0o600
    assert sorted(p.name for p in data_dir.iterdir() if not p.is_symlink()) == [SEALED_FILE_NAME]
    assert load_platform_secrets(data_dir, sim).root == keys.root
