"""The simulated platform ("sim"): SNP-layout reports signed by a local ARK -> ASK -> VCEK chain.

It exists so the whole product (attested TLS, clients, host agent) runs on machines without
confidential-computing hardware, through exactly the same parse/verify/appraise path as real SNP
evidence.  The chain has AMD's shapes (RSA-4096 ARK and ASK signing RSASSA-PSS/SHA-384 with salt 48,
an ECDSA P-384 VCEK carrying the 1.3.6.1.4.1.3704.1.x extensions) but names that cannot be mistaken
for AMD's (O="Cube AI Simulated Platform (NOT AMD)", CNs starting "SIM-"), and it is trusted only
through ``sim_trust(fingerprint)``: a root a policy names explicitly, kept apart from AMD_TRUST.

The chain is created once per installation and persisted (directory 0700, private keys 0600) in
``$CUBE_SIM_DIR`` or ``~/.local/share/cube-ai/sim``.  Like AMD KDS, the platform also issues an
ARK-signed CRL (``SimPlatform.crl()``), so revocation checking runs for simulated evidence too.
Simulated evidence proves nothing about hardware; its only use is development and tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from .errors import ProviderError
from .keyfile import KeyFileError, check_private_file
from .snp.trust import RootTrust

SIM_ORGANIZATION = "Cube AI Simulated Platform (NOT AMD)"
SIM_ORG_UNIT = "Simulation only - proves nothing about hardware"
# The sim's own product family: the SNP verifier reads "Sim" reports with the legacy (Milan/Genoa)
# TCB layout, and sim_trust() pins the sim root for this family only, so a sim root can never vouch
# for a report claiming to come from a real AMD product.  The CPUID fields of the (version 3) report
# are zero: a simulated platform has no CPU identity to claim.
SIM_PRODUCT = "Sim"
SIM_CPUID = (0x00, 0x00, 0x00)
SIM_FAMILIES = (SIM_PRODUCT,)
SIM_ARK_CN = "SIM-ARK-{product}"
SIM_ASK_CN = "SIM-ASK-{product}"
SIM_ASVK_CN = "SIM-ASVK-{product}"
SIM_VCEK_CN = "SIM-VCEK"
SIM_VLEK_CN = "SIM-VLEK"

# Report constants (SEV-SNP ABI, ATTESTATION_REPORT): version 3 carries the CPUID fields.
REPORT_VERSION = 3
REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
GUEST_POLICY = (1 << 17)  # bit 17 reserved-must-be-one; SMT, MIGRATE_MA, DEBUG clear; ABI 0.0
PLATFORM_INFO = 0x0
# Legacy (Milan/Genoa) TCB_VERSION: byte0 boot loader, byte1 TEE, byte6 SNP, byte7 microcode.
SIM_TCB = {"bootloader": 9, "tee": 0, "snp": 23, "microcode": 0x48}
SIM_MEASUREMENT = hashlib.sha384(b"cube-ai simulated guest image v1").digest()

# The sim CRL, shaped like an AMD KDS CRL: thisUpdate an hour back (clock skew), valid a week,
# re-issued once less than a day of that remains.
CRL_BACKDATE = timedelta(hours=1)
CRL_LIFETIME = timedelta(days=7)
CRL_RENEW_BEFORE = timedelta(days=1)

_VCEK_OID = "1.3.6.1.4.1.3704.1."
_DIR_MODE = 0o700
_KEY_MODE = 0o600
_META = "platform.json"
SEALING_SECRET_FILE = "sealing_secret"   # the sim's stand-in for the chip's root key (see derived_key)
_SEALING_LABEL = b"cube-ai/sim-derived-key/v1\x00"


def default_sim_dir() -> Path:
    env = os.environ.get("CUBE_SIM_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "share" / "cube-ai" / "sim"


def sim_tcb_value(tcb: dict[str, int] | None = None) -> int:
    t = tcb or SIM_TCB
    return t["bootloader"] | (t["tee"] << 8) | (t["snp"] << 48) | (t["microcode"] << 56)


def sim_trust(fingerprint: str) -> RootTrust:
    """A RootTrust that accepts exactly one sim ARK: the one whose SHA-256 DER fingerprint is given."""
    fp = fingerprint.strip().lower().replace(":", "")
    if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise ValueError("sim root fingerprint must be 64 hex digits (SHA-256 of the sim ARK DER)")
    return RootTrust(
        name="sim",
        ark_fingerprints={family: frozenset({fp}) for family in SIM_FAMILIES},
        organization=SIM_ORGANIZATION,
        ark_cn=SIM_ARK_CN,
        ask_cn=SIM_ASK_CN,
        asvk_cn=SIM_ASVK_CN,
        vcek_cn=SIM_VCEK_CN,
        vlek_cn=SIM_VLEK_CN,
    )


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, SIM_ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, SIM_ORG_UNIT),
        ]
    )


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def _der_int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")  # leading 00 when bit 7 set
    return b"\x02" + bytes([len(body)]) + body


def _der_ia5(text: str) -> bytes:
    raw = text.encode("ascii")
    return b"\x16" + bytes([len(raw)]) + raw


def _crl_dp(product: str) -> x509.CRLDistributionPoints:
    url = f"https://sim.cube-ai.invalid/vcek/v1/{product}/crl"
    return x509.CRLDistributionPoints(
        [x509.DistributionPoint([x509.UniformResourceIdentifier(url)], None, None, None)]
    )


def _ca_cert(subject: str, issuer: str, pub, signer, now: datetime, years: int, path_length: int | None):
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365 * years))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(_crl_dp(SIM_PRODUCT), critical=False)
    )
    return builder.sign(signer, hashes.SHA384(), rsa_padding=_pss())


def _vcek_cert(pub, ask_key, now: datetime, chip_id: bytes, tcb: dict[str, int]) -> x509.Certificate:
    exts = [
        ("1", _der_int(0)),  # structVersion 0: legacy TCB layout
        ("2", _der_ia5(SIM_PRODUCT)),
        ("3.1", _der_int(tcb["bootloader"])),
        ("3.2", _der_int(tcb["tee"])),
        ("3.4", _der_int(0)),
        ("3.5", _der_int(0)),
        ("3.6", _der_int(0)),
        ("3.7", _der_int(0)),
        ("3.3", _der_int(tcb["snp"])),
        ("3.8", _der_int(tcb["microcode"])),
        ("4", chip_id),  # hwID: raw 64 bytes, as AMD's VCEKs carry it
    ]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(SIM_VCEK_CN))
        .issuer_name(_name(SIM_ASK_CN.format(product=SIM_PRODUCT)))
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365 * 7))
    )
    for suffix, value in exts:
        oid = x509.ObjectIdentifier(_VCEK_OID + suffix)
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    return builder.sign(ask_key, hashes.SHA384(), rsa_padding=_pss())


def _check_key_mode(path: Path) -> None:
    try:
        check_private_file(path, "sim key")
    except KeyFileError as e:
        raise ProviderError(str(e)) from None


def _write_private(path: Path, key) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _KEY_MODE)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


@dataclass
class SimPlatform:
    """A persisted simulated SNP platform: its chain, VCEK key, chip id and TCB."""

    directory: Path
    ark: x509.Certificate
    ask: x509.Certificate
    vcek: x509.Certificate
    vcek_key: ec.EllipticCurvePrivateKey
    chip_id: bytes
    tcb: dict[str, int]
    # The ARK key signs only CRLs: loaded on the first crl() call, not with the platform.
    _ark_key: rsa.RSAPrivateKey | None = field(default=None, init=False, repr=False, compare=False)
    _crl_der: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _crl_next_update: datetime | None = field(default=None, init=False, repr=False, compare=False)
    _crl_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.ark.public_bytes(serialization.Encoding.DER)).hexdigest()

    @property
    def trust(self) -> RootTrust:
        return sim_trust(self.fingerprint)

    @property
    def product(self) -> str:
        return SIM_PRODUCT

    @property
    def certificates(self) -> list[bytes]:
        """[vcek_der, ask_der, ark_der]"""
        return [c.public_bytes(serialization.Encoding.DER) for c in (self.vcek, self.ask, self.ark)]

    # -- creation / loading ------------------------------------------------------------------
    @classmethod
    def load_or_create(cls, directory: Path | None = None) -> "SimPlatform":
        directory = Path(directory) if directory is not None else default_sim_dir()
        if (directory / _META).is_file():
            return cls._load(directory)
        cls._create(directory)
        return cls._load(directory)

    @classmethod
    def _create(cls, directory: Path) -> None:
        directory.parent.mkdir(parents=True, exist_ok=True)
        if directory.exists() and any(directory.iterdir()):
            raise ProviderError(f"sim platform directory {directory} exists but holds no {_META}; refusing to overwrite")
        # Build in a private temporary directory, then rename: concurrent creators never see half a platform.
        tmp = Path(tempfile.mkdtemp(prefix=".sim-", dir=directory.parent))
        try:
            os.chmod(tmp, _DIR_MODE)
            now = datetime.now(timezone.utc).replace(microsecond=0)
            ark_key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
            ask_key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
            vcek_key = ec.generate_private_key(ec.SECP384R1())
            ark_cn = SIM_ARK_CN.format(product=SIM_PRODUCT)
            ark = _ca_cert(ark_cn, ark_cn, ark_key.public_key(), ark_key, now, 25, None)
            ask = _ca_cert(SIM_ASK_CN.format(product=SIM_PRODUCT), ark_cn, ask_key.public_key(), ark_key, now, 25, 0)
            chip_id = secrets.token_bytes(64)
            vcek = _vcek_cert(vcek_key.public_key(), ask_key, now, chip_id, SIM_TCB)
            _write_private(tmp / "ark_key.pem", ark_key)
            _write_private(tmp / "ask_key.pem", ask_key)
            _write_private(tmp / "vcek_key.pem", vcek_key)
            for name, cert in (("ark.pem", ark), ("ask.pem", ask), ("vcek.pem", vcek)):
                (tmp / name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            meta = {"format": 1, "product": SIM_PRODUCT, "chip_id": chip_id.hex(), "tcb": SIM_TCB,
                    "created": now.isoformat()}
            (tmp / _META).write_text(json.dumps(meta, indent=1) + "\n")
            try:
                if directory.exists():
                    directory.rmdir()  # empty (checked above); rename needs it gone
                os.rename(tmp, directory)
            except OSError:
                if not (directory / _META).is_file():
                    raise
                # someone else created it first: theirs wins
        except OSError as exc:
            raise ProviderError(f"cannot create the sim platform in {directory}: {exc}") from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def _load(cls, directory: Path) -> "SimPlatform":
        try:
            if os.stat(directory).st_mode & 0o077:
                os.chmod(directory, _DIR_MODE)
            for key_file in ("ark_key.pem", "ask_key.pem", "vcek_key.pem"):
                _check_key_mode(directory / key_file)
            meta = json.loads((directory / _META).read_text())
            ark = x509.load_pem_x509_certificate((directory / "ark.pem").read_bytes())
            ask = x509.load_pem_x509_certificate((directory / "ask.pem").read_bytes())
            vcek = x509.load_pem_x509_certificate((directory / "vcek.pem").read_bytes())
            vcek_key = serialization.load_pem_private_key((directory / "vcek_key.pem").read_bytes(), password=None)
            chip_id = bytes.fromhex(meta["chip_id"])
            tcb = {k: int(meta["tcb"][k]) for k in ("bootloader", "tee", "snp", "microcode")}
        except ProviderError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ProviderError(f"sim platform in {directory} is unreadable or corrupt: {exc}") from exc
        if not isinstance(vcek_key, ec.EllipticCurvePrivateKey) or vcek_key.public_key() != vcek.public_key():
            raise ProviderError(f"sim platform in {directory}: the VCEK key does not match its certificate")
        if len(chip_id) != 64:
            raise ProviderError(f"sim platform in {directory}: chip_id must be 64 bytes")
        return cls(directory=directory, ark=ark, ask=ask, vcek=vcek, vcek_key=vcek_key, chip_id=chip_id, tcb=tcb)

    # -- revocation ----------------------------------------------------------------------------
    def _ark_private_key(self) -> rsa.RSAPrivateKey:
        if self._ark_key is None:
            path = self.directory / "ark_key.pem"
            try:
                _check_key_mode(path)
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except ProviderError:
                raise
            except (OSError, ValueError, TypeError) as exc:
                raise ProviderError(f"sim platform in {self.directory}: the ARK key is unreadable: {exc}") from exc
            if not isinstance(key, rsa.RSAPrivateKey) or key.public_key() != self.ark.public_key():
                raise ProviderError(f"sim platform in {self.directory}: the ARK key does not match its certificate")
            self._ark_key = key
        return self._ark_key

    def crl(self, *, now: datetime | None = None) -> bytes:
        """The platform's CRL (DER), as AMD KDS serves one per product: issued and RSASSA-PSS/SHA-384
        signed by the ARK, listing no ASK.  Cached; re-issued when less than CRL_RENEW_BEFORE remains."""
        now = now or datetime.now(timezone.utc)
        now = (now if now.tzinfo is not None else now.replace(tzinfo=timezone.utc)).replace(microsecond=0)
        with self._crl_lock:
            if (self._crl_der is not None and self._crl_next_update is not None
                    and now < self._crl_next_update - CRL_RENEW_BEFORE):
                return self._crl_der
            next_update = now + CRL_LIFETIME
            crl = (
                x509.CertificateRevocationListBuilder()
                .issuer_name(self.ark.subject)
                .last_update(now - CRL_BACKDATE)
                .next_update(next_update)
                .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
                .sign(self._ark_private_key(), hashes.SHA384(), rsa_padding=_pss())
            )
            self._crl_der = crl.public_bytes(serialization.Encoding.DER)
            self._crl_next_update = next_update
            return self._crl_der

    # -- sealing ------------------------------------------------------------------------------
    def _sealing_secret(self) -> bytes:
        path = self.directory / SEALING_SECRET_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _KEY_MODE)
        except FileExistsError:
            pass   # made before (or by a concurrent start): use it
        except OSError as exc:
            raise ProviderError(f"sim platform in {self.directory}: cannot create its sealing secret: {exc}") from exc
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
        _check_key_mode(path)
        try:
            secret = path.read_bytes()
        except OSError as exc:
            raise ProviderError(f"sim platform in {self.directory}: its sealing secret is unreadable: {exc}") from exc
        if len(secret) != 32:
            raise ProviderError(f"sim platform in {self.directory}: its sealing secret must be 32 bytes")
        return secret

    def derived_key(self, context: bytes, *, measurement: bytes = SIM_MEASUREMENT, policy: int = GUEST_POLICY) -> bytes:
        """The sim's MSG_KEY_REQ: a 32-byte key from the platform's secret, the guest's measurement and policy.

        As on SNP, HOST_DATA is not mixed in: the firmware offers no such field, and the host chooses it at
        launch (the enclave checks it against its config instead). Another sim platform (another directory),
        measurement or policy gives another key. The secret lies in the sim directory, so the simulation
        protects nothing from whoever reads that directory: it only runs the same code path as hardware.
        """
        if not isinstance(context, bytes) or not context:
            raise ProviderError("derived_key needs a non-empty context")
        if len(measurement) != 48:
            raise ValueError("measurement must be 48 bytes")
        info = _SEALING_LABEL + measurement + struct.pack("<Q", policy) + context
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(self._sealing_secret())

    # -- reports -----------------------------------------------------------------------------
    def report(
        self,
        report_data: bytes,
        *,
        measurement: bytes = SIM_MEASUREMENT,
        host_data: bytes = bytes(32),
        vmpl: int = 0,
        guest_svn: int = 0,
        policy: int = GUEST_POLICY,
    ) -> tuple[bytes, list[bytes]]:
        """A signed SNP-layout report carrying ``report_data``, and [vcek_der, ask_der, ark_der]."""
        if not isinstance(report_data, (bytes, bytearray)) or len(report_data) != 64:
            raise ValueError("report_data must be exactly 64 bytes")
        if len(measurement) != 48 or len(host_data) != 32:
            raise ValueError("measurement must be 48 bytes and host_data 32 bytes")
        raw = bytearray(REPORT_SIZE)
        tcb = sim_tcb_value(self.tcb)
        struct.pack_into("<IIQ", raw, 0x000, REPORT_VERSION, guest_svn, policy)
        struct.pack_into("<II", raw, 0x030, vmpl, 1)  # VMPL, SIGNATURE_ALGO = ECDSA P-384 SHA-384
        struct.pack_into("<QQ", raw, 0x038, tcb, PLATFORM_INFO)
        struct.pack_into("<I", raw, 0x048, 0)  # signer info: VCEK, chip id not masked, no author key
        raw[0x050:0x090] = report_data
        raw[0x090:0x0C0] = measurement
        raw[0x0C0:0x0E0] = host_data
        raw[0x140:0x160] = hashlib.sha256(b"sim report id" + self.chip_id).digest()
        raw[0x160:0x180] = b"\xff" * 32  # REPORT_ID_MA: no migration agent
        struct.pack_into("<Q", raw, 0x180, tcb)  # REPORTED_TCB
        raw[0x188:0x18B] = bytes(SIM_CPUID)
        raw[0x1A0:0x1E0] = self.chip_id
        struct.pack_into("<Q", raw, 0x1E0, tcb)  # COMMITTED_TCB
        raw[0x1E8:0x1EB] = bytes((4, 55, 1))  # current build/minor/major: firmware 1.55.4
        raw[0x1EC:0x1EF] = bytes((4, 55, 1))  # committed
        struct.pack_into("<Q", raw, 0x1F0, tcb)  # LAUNCH_TCB
        der = self.vcek_key.sign(bytes(raw[:SIGNED_SIZE]), ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        raw[0x2A0:0x2E8] = r.to_bytes(72, "little")
        raw[0x2E8:0x330] = s.to_bytes(72, "little")
        return bytes(raw), self.certificates
