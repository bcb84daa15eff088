"""The bootstrap PAT outside simulation: never printed or logged, sealed to the operator's X25519 key (or a
0600 --pat-file); with neither, no bootstrap at all. The sealed blob opens with the operator's key only."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from enclave.bootstrap import SEALED_PAT_FILE_NAME, BootstrapRefused, PatDelivery, choose_delivery, deliver
from enclave.bootstrap_cli import main as bootstrap_cli
from enclave.config import ConfigError, load_settings
from enclave.main import banner
from enclave.sealing import SealError, load_public_key, open_sealed, public_key_text, seal
from enclave.store import Store
from enclave.tokens import PAT_PREFIX, generate_token, parse_token, token_hash

from tests.enclave.conftest import PAT_KEY, ROW_KEY
from tests.enclave.test_main import free_port


def _percent_encoded(text: str) -> str:
    return "".join(f"%{b:02X}" for b in text.encode())


def _assert_absent(token: str, text: str) -> None:
    secret = token[len(PAT_PREFIX):].lower()
    low = text.lower()
    assert secret not in low and _percent_encoded(secret[:12]).lower() not in low, "the bootstrap PAT leaked"


def test_sealed_blob_opens_with_the_right_key_only() -> None:
    operator, stranger = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    token = generate_token()
    blob = seal(token.encode(), load_public_key(public_key_text(operator.public_key())))
    assert blob.startswith("cube-sealed-v1.") and token not in blob
    assert open_sealed(blob, operator) == token.encode()
    assert seal(token.encode(), operator.public_key()) != blob                 # a fresh ephemeral key each time
    with pytest.raises(SealError, match="not sealed to this key"):
        open_sealed(blob, stranger)
    tampered = blob[:-3] + ("A" if blob[-3] != "A" else "B") + blob[-2:]
    with pytest.raises(SealError):
        open_sealed(tampered, operator)
    with pytest.raises(SealError, match="invalid ephemeral key"):             # a low-order point: no secret
        open_sealed("cube-sealed-v1." + "A" * 70, operator)
    with pytest.raises(SealError, match="not a sealed blob"):
        open_sealed(token, operator)


def test_operator_key_comes_from_the_config_file_only(tmp_path: Path) -> None:
    key = public_key_text(X25519PrivateKey.generate().public_key())
    config = tmp_path / "enclave.yaml"
    config.write_text(f"bootstrap: {{operator_public_key: '{key}'}}\n")
    assert load_settings(config, environ={}).bootstrap.operator_public_key == key
    with pytest.raises(ConfigError, match="must come from the configuration file"):   # the host sets the env
        load_settings(config, environ={"CUBE_ENCLAVE__BOOTSTRAP__OPERATOR_PUBLIC_KEY": key})
    config.write_text("bootstrap: {operator_public_key: 'c2hvcnQ='}\n")
    with pytest.raises(ConfigError, match="bootstrap.operator_public_key: .*X25519"):
        load_settings(config, environ={})


@pytest.mark.parametrize("name, value", [
    ("CUBE_ENCLAVE__BOOTSTRAP", "{operator_public_key: KEY}"),
    ("CUBE_ENCLAVE__bootstrap", "{admin_name: root, operator_public_key: KEY}"),
    ("CUBE_ENCLAVE__BOOTSTRAP", "{Operator_Public_Key: KEY}"),
])
def test_the_operator_key_cannot_come_from_the_environment_inside_a_yaml_mapping(tmp_path: Path, name: str,
                                                                                  value: str) -> None:
    """``CUBE_ENCLAVE__BOOTSTRAP='{operator_public_key: <host key>}'`` set the operator key from the environment:
    the launcher got the bootstrap and recovery keys sealed to itself."""
    host_key = public_key_text(X25519PrivateKey.generate().public_key())
    sim = {"simulate": True}     # outside simulation every CUBE_ENCLAVE__* variable is refused anyway
    with pytest.raises(ConfigError, match="must come from the configuration file"):
        load_settings(None, environ={name: value.replace("KEY", host_key)}, overrides=sim)
    assert load_settings(None, environ={"CUBE_ENCLAVE__BOOTSTRAP": "{admin_name: root}"},
                         overrides=sim).bootstrap.admin_name == "root"


def test_with_an_operator_key_a_pat_file_launch_argument_gets_only_the_sealed_pat(tmp_path: Path) -> None:
    """``--pat-file`` (a launch argument) took precedence over the operator key of the measured configuration:
    whoever starts the process received the plain bootstrap / recovery PAT in a file of its choosing."""
    operator = X25519PrivateKey.generate()
    settings = load_settings(None, environ={}, overrides={
        "data_dir": str(tmp_path), "bootstrap": {"operator_public_key": public_key_text(operator.public_key())}})
    chosen = tmp_path / "launcher-chose-this"
    delivery = choose_delivery(settings, chosen)
    assert delivery == PatDelivery("sealed", chosen)
    token = generate_token()
    deliver(delivery, settings, token)
    written = chosen.read_text()
    assert token not in written and open_sealed(written, operator).decode() == token
    plain = load_settings(None, environ={}, overrides={"data_dir": str(tmp_path)})
    assert choose_delivery(plain, chosen) == PatDelivery("file", chosen)


def test_printing_is_for_simulation_only(tmp_path: Path) -> None:
    token = generate_token()
    sim = load_settings(None, environ={}, overrides={"simulate": True, "data_dir": str(tmp_path)})
    assert token in "\n".join(deliver(PatDelivery("print"), sim, token).lines)
    real = load_settings(None, environ={}, overrides={"data_dir": str(tmp_path)})
    with pytest.raises(BootstrapRefused):
        deliver(PatDelivery("print"), real, token)


def test_confidential_banner_holds_no_pat_and_suggests_only_attested_paths(tmp_path: Path) -> None:
    operator = X25519PrivateKey.generate()
    settings = load_settings(None, environ={}, overrides={
        "data_dir": str(tmp_path), "bootstrap": {"operator_public_key": public_key_text(operator.public_key())}})
    token = generate_token()
    delivered = deliver(PatDelivery("sealed", tmp_path / SEALED_PAT_FILE_NAME), settings, token)
    text = banner(settings, base="https://enclave:8443", cert_path=tmp_path / "server-cert.pem", policy_path=None,
                  domain_id="d1", delivered=delivered)
    _assert_absent(token, text)
    assert "curl" not in text and "--cacert" not in text and "server-cert.pem" not in text
    assert "cube-attest verify-url https://enclave:8443 --policy" in text and "openai_client(" in text
    blob = next(line.strip() for line in text.splitlines() if line.strip().startswith("cube-sealed-v1."))
    assert open_sealed(blob, operator).decode() == token
    assert (tmp_path / SEALED_PAT_FILE_NAME).read_text().strip() == blob


# `cube-enclave serve` outside simulation on this machine (no confidential platform): the sim stands in for the
# hardware. It gives one start-up report, with a correctly bound HOST_DATA (the check that HOST_DATA carries the
# config's SHA-256, enclave/config_binding.py), and the sealing key; then no evidence for the TLS key, so the
# process bootstraps and then stops where TLS needs some.
_SEALING_ONLY = """
import sys
import attestation.providers as providers
from attestation.errors import ProviderError
from enclave.main import main

class OneReport(providers.SimProvider):
    reports = 0
    def get_evidence(self, report_data):
        self.reports += 1
        if self.reports > 1:
            raise ProviderError("no attestation interface on this machine (test: one start-up report only)")
        return super().get_evidence(report_data)

providers.detect_provider = lambda **kw: OneReport(kw["sim_dir"], host_data=kw["sim_host_data"])
sys.exit(main(sys.argv[1:]))
"""


def _serve(tmp_path: Path, config_text: str, *extra: str) -> subprocess.CompletedProcess:
    config = tmp_path / "enclave.yaml"
    config.write_text(config_text + "log_level: DEBUG\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUBE_ENCLAVE__")}
    return subprocess.run([sys.executable, "-c", _SEALING_ONLY, "serve", "--config", str(config), "--data-dir",
                           str(tmp_path / "data"), "--port", str(free_port()), *extra],
                          capture_output=True, text=True, env=env, timeout=120)


def _sealed_keys(data: Path):
    """The platform secrets the enclave sealed in ``data`` (the sim's key: see _SEALING_ONLY)."""
    from attestation.providers import SimProvider
    from enclave.sealed_state import load_platform_secrets

    return load_platform_secrets(data, SimProvider(data / "sim"))


def _bootstrap_pat_is_valid(data: Path, token: str) -> bool:
    async def check() -> bool:
        keys = _sealed_keys(data)
        store = await Store.open(f"sqlite+aiosqlite:///{data / 'enclave.db'}", row_key=keys.row_mac_key())
        try:
            record = await store.find_auth(token_hash(keys.pat_hmac_key(), token))
            return record is not None and record.user.is_superadmin and record.pat.revoked_at is None
        finally:
            await store.close()

    return asyncio.run(check())


def test_outside_simulation_the_pat_is_sealed_and_never_printed_or_logged(tmp_path: Path, capsys) -> None:
    """The real process, not simulated: it bootstraps (then stops: this machine has no confidential platform),
    and the PAT is nowhere in its stdout, stderr or logs, only in the sealed file the operator opens."""
    key_file = tmp_path / "operator.key"
    assert bootstrap_cli(["keygen", "--out", str(key_file)]) == 0
    printed = capsys.readouterr().out
    public = next(line.split(":", 1)[1].strip() for line in printed.splitlines() if "operator_public_key" in line)
    proc = _serve(tmp_path, f"bootstrap: {{operator_public_key: '{public}'}}\n")
    assert proc.returncode == 2 and "no attestation interface" in proc.stderr        # bootstrapped, then stopped
    sealed = tmp_path / "data" / SEALED_PAT_FILE_NAME
    assert bootstrap_cli(["open", "--key", str(key_file), str(sealed)]) == 0
    token = capsys.readouterr().out.strip()
    parse_token(token)
    assert _bootstrap_pat_is_valid(tmp_path / "data", token)
    _assert_absent(token, proc.stdout + proc.stderr)
    assert '"logger": "enclave.bootstrap"' in proc.stderr                             # the logs were captured
    stranger = tmp_path / "stranger.key"
    assert bootstrap_cli(["keygen", "--out", str(stranger)]) == 0
    capsys.readouterr()
    assert bootstrap_cli(["open", "--key", str(stranger), str(sealed)]) == 1
    assert "not sealed to this key" in capsys.readouterr().err
    os.chmod(key_file, 0o644)
    assert bootstrap_cli(["open", "--key", str(key_file), str(sealed)]) == 1          # a loose private key
    assert "chmod 600" in capsys.readouterr().err


def test_outside_simulation_without_a_safe_delivery_nothing_is_bootstrapped(tmp_path: Path) -> None:
    proc = _serve(tmp_path, "log_json: true\n")
    assert proc.returncode == 2 and "refusing to bootstrap" in proc.stderr
    assert "bootstrap.operator_public_key" in proc.stderr and "--pat-file" in proc.stderr
    assert not re.search(r"cube_pat_[0-9A-Za-z]{20,}", proc.stdout + proc.stderr)

    async def users() -> int:
        store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'data' / 'enclave.db'}", row_key=ROW_KEY)
        try:
            return await store.count_users()
        finally:
            await store.close()

    assert asyncio.run(users()) == 0


def test_confidential_image_seals_the_bootstrap_pat(tmp_path: Path) -> None:
    """Dockerfile.confidential bakes the operator key into its config (its own sed, run here on a copy) and
    passes no --pat-file: the image's first start seals the PAT."""
    root = Path(__file__).resolve().parents[2]
    dockerfile = (root / "Dockerfile.confidential").read_text()
    assert "--pat-file" not in dockerfile.split("ENTRYPOINT", 1)[1]
    sed = next(line for line in dockerfile.splitlines() if line.lstrip(" &").startswith("sed -i"))
    copy = tmp_path / "enclave.yaml"
    copy.write_text((root / "config" / "enclave.yaml").read_text())
    key = public_key_text(X25519PrivateKey.generate().public_key())
    command = sed.lstrip(" &").rstrip(" \\").replace("/etc/cube/enclave.yaml", str(copy))
    subprocess.run(["sh", "-c", command], check=True, env={**os.environ, "CUBE_OPERATOR_PUBLIC_KEY": key})
    settings = load_settings(copy, environ={})
    assert settings.bootstrap.operator_public_key == key
    assert settings.simulate is False


def test_cube_admin_bootstrap_makes_and_opens_without_contacting_anyone(tmp_path: Path, capsys,
                                                                        monkeypatch) -> None:
    """`cube-admin bootstrap keygen|open` is the operator's side; it works on local files (no URL, no token)."""
    from enclave import admin_cli

    monkeypatch.setattr(admin_cli.httpx, "Client", None)            # any network client use would crash
    key_file = tmp_path / "operator.key"
    assert admin_cli.main(["bootstrap", "keygen", "--out", str(key_file)]) == 0
    public_line = next(line for line in capsys.readouterr().out.splitlines() if "operator_public_key" in line)
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    public = public_line.split(":", 1)[1].strip()
    sealed = tmp_path / "sealed"
    sealed.write_text(seal(b"cube_pat_canary", load_public_key(public)))
    assert admin_cli.main(["bootstrap", "open", "--key", str(key_file), str(sealed)]) == 0
    assert capsys.readouterr().out.strip() == "cube_pat_canary"


def test_a_locked_out_platform_gets_a_recovery_key_sealed_to_the_operator(tmp_path: Path, capsys) -> None:
    """New keys never outlive their creator, so once every superadmin platform key has expired or been revoked
    nobody could administer the platform: the next start seals a fresh one to the operator (never printed),
    and only then."""
    key_file = tmp_path / "operator.key"
    assert bootstrap_cli(["keygen", "--out", str(key_file)]) == 0
    public = next(line.split(":", 1)[1].strip() for line in capsys.readouterr().out.splitlines()
                  if "operator_public_key" in line)
    config = f"bootstrap: {{operator_public_key: '{public}'}}\n"
    data = tmp_path / "data"
    sealed = data / SEALED_PAT_FILE_NAME
    _serve(tmp_path, config)
    assert bootstrap_cli(["open", "--key", str(key_file), str(sealed)]) == 0
    first = capsys.readouterr().out.strip()

    async def revoke_all() -> None:
        store = await Store.open(f"sqlite+aiosqlite:///{data / 'enclave.db'}", row_key=_sealed_keys(data).row_mac_key())
        try:
            for pat in await store.list_pats():
                await store.revoke_pat(pat.id)
        finally:
            await store.close()

    again = _serve(tmp_path, config)                       # a usable key exists: nothing new is issued
    assert bootstrap_cli(["open", "--key", str(key_file), str(sealed)]) == 0
    assert capsys.readouterr().out.strip() == first and "recovery key" not in again.stderr
    asyncio.run(revoke_all())
    assert not _bootstrap_pat_is_valid(data, first)
    proc = _serve(tmp_path, config)
    assert "issued a recovery key" in proc.stderr     # (the banner is not reached: no confidential platform here)
    assert bootstrap_cli(["open", "--key", str(key_file), str(sealed)]) == 0
    recovery = capsys.readouterr().out.strip()
    assert recovery != first and _bootstrap_pat_is_valid(data, recovery)
    _assert_absent(recovery, proc.stdout + proc.stderr)


def test_only_an_unbound_unexpired_manage_key_of_a_superadmin_counts_as_usable(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from enclave.bootstrap import recover_if_locked_out

    settings = load_settings(None, environ={}, overrides={"data_dir": str(tmp_path), "server_secret": "s" * 48,
                                                          "simulate": True})
    secret = PAT_KEY
    now = datetime.now(UTC)

    async def scenario() -> list[bool]:
        store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", row_key=ROW_KEY)
        try:
            admin = await store.create_user("root", is_superadmin=True)
            domain = await store.create_domain("default")
            member = await store.create_user("member")
            outcomes = []

            async def key(user, **kw) -> None:
                tok = generate_token()
                base = {"scopes": ("models:read", "models:infer", "manage"), "expires_at": now + timedelta(days=1)}
                base.update(kw)
                await store.create_pat(user_id=user.id, name="k", token_hash=token_hash(secret, tok),
                                       last4=tok[-4:], **base)

            await key(admin, expires_at=now - timedelta(seconds=1))                  # expired
            await key(admin, domain_id=domain.id)                                    # bound to a domain
            await key(admin, scopes=("models:read", "models:infer"))                 # no manage
            await key(member)                                                        # not a superadmin
            outcomes.append(await recover_if_locked_out(store, settings, secret) is not None)
            outcomes.append(await recover_if_locked_out(store, settings, secret) is not None)  # now usable
            return outcomes
        finally:
            await store.close()

    assert asyncio.run(scenario()) == [True, False]


def test_the_pat_file_is_never_written_through_a_symbolic_link(tmp_path: Path) -> None:
    """A symbolic link planted at the PAT file's path sent the plain PAT wherever it pointed (O_CREAT followed
    it); a looser file left there held the PAT readable until the chmod after the write."""
    settings = load_settings(None, environ={}, overrides={"data_dir": str(tmp_path)})
    elsewhere = tmp_path / "readable-by-others"
    elsewhere.write_text("")
    elsewhere.chmod(0o644)
    link = tmp_path / "pat"
    link.symlink_to(elsewhere)
    token = generate_token()
    with pytest.raises(BootstrapRefused, match="symbolic link"):
        deliver(PatDelivery("file", link), settings, token)
    assert elsewhere.read_text() == ""
    loose = tmp_path / "loose"
    loose.write_text("old contents, longer than a token " * 4)
    loose.chmod(0o644)
    deliver(PatDelivery("file", loose), settings, token)
    assert loose.read_text() == token + "\n" and loose.stat().st_mode & 0o777 == 0o600


def test_a_pat_that_could_not_be_handed_over_does_not_hold_off_the_recovery_key(tmp_path: Path) -> None:
    """The bootstrap PAT was stored before its hand-over; when the hand-over failed, nobody had the key yet it
    counted as usable, so no recovery key came until it expired: the operator was locked out for weeks."""
    from attestation.providers import SimProvider
    from enclave.main import _prepare, platform_secrets

    settings = load_settings(None, environ={}, overrides={"data_dir": str(tmp_path)})
    keys, origin = platform_secrets(settings, SimProvider(tmp_path / "sim"))
    planted = tmp_path / "pat"
    planted.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BootstrapRefused):
        asyncio.run(_prepare(settings, PatDelivery("file", planted), keys, origin))
    good = tmp_path / "pat-2"
    keys, origin = platform_secrets(settings, SimProvider(tmp_path / "sim"))
    delivered, _ = asyncio.run(_prepare(settings, PatDelivery("file", good), keys, origin))
    assert delivered is not None and "Recovery" in delivered.lines[0]
    assert _bootstrap_pat_is_valid(tmp_path, good.read_text().strip())
