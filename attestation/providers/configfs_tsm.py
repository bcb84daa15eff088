"""Linux configfs-tsm report interface (Documentation/ABI/testing/configfs-tsm).

Protocol, per report:

1. ``mkdir /sys/kernel/config/tsm/report/<entry>`` (the kernel populates the entry's attributes);
2. read ``generation``; write the 64-byte ``inblob`` (this bumps ``generation``);
3. read ``outblob`` (SNP: the raw ATTESTATION_REPORT; TDX: the quote), ``auxblob`` (SNP: the
   GHCB certificate table, when the host supplies certificates) and ``provider``
   ("sev_guest" / "tdx_guest");
4. read ``generation`` again: anything but the value after our own write means another process
   wrote to the entry meanwhile and the blobs may belong to it -> retry;
5. ``rmdir`` the entry.

All file access goes through a small ``TsmFs`` object so tests can run this exact code against a
directory that behaves as the kernel's does (see tests/attestation/test_providers.py).

Given a ``KdsClient``, SNP evidence also carries the product's AMD CRL (see ``snp_crl``); given a
``PcsClient``, TDX evidence carries the quote's Intel collateral (see ``tdx_collateral``).  TDX evidence
also carries the CC event log from the ACPI CCEL table's log area (``ccel_path``), so a verifier can
replay it against the quote's RTMRs and appraise the boot events it records.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import NoSealingKey, ProviderError
from ..evidence import TDX_CCEL_FILE, Evidence
from .collateral import with_collateral
from .snp_crl import with_snp_crl
from .tdx_collateral import with_tdx_collateral

if TYPE_CHECKING:  # pragma: no cover
    from ..snp.kds import KdsClient
    from ..tdx.pcs import PcsClient

TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
INBLOB_SIZE = 64
MAX_BLOB_BYTES = 1 << 20
MAX_ATTEMPTS = 5
PROVIDER_PLATFORMS = {"sev_guest": "snp", "tdx_guest": "tdx"}
# The log area the ACPI CCEL table describes, as the kernel exposes it (zero-padded to the area's size).
CCEL_PATH = Path("/sys/firmware/acpi/tables/data/CCEL")


class TsmFs(Protocol):
    def mkdir(self, path: Path) -> None: ...
    def rmdir(self, path: Path) -> None: ...
    def read(self, path: Path) -> bytes: ...
    def write(self, path: Path, data: bytes) -> None: ...


class OsFs:
    """The real thing: configfs attributes read and written whole with single system calls."""

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o700)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def read(self, path: Path) -> bytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            chunks = []
            total = 0
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                total += len(chunk)
                if total > MAX_BLOB_BYTES:
                    raise OSError(errno.EFBIG, "attribute larger than expected", str(path))
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def write(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.EIO, f"short write ({written} of {len(data)} bytes)", str(path))
        finally:
            os.close(fd)


def _oserror(what: str, exc: OSError) -> ProviderError:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return ProviderError(f"configfs-tsm: {what} failed: {name} ({exc.strerror or exc})")


def certificates_from_auxblob(aux: bytes) -> tuple[bytes, ...]:
    """SNP auxblob (GHCB certificate table) -> DER certificates ordered VEK, ASK|ASVK, ARK."""
    if not aux or not aux.strip(b"\x00"):
        return ()
    from ..snp.certtable import cert_table_by_name

    try:
        by_name = cert_table_by_name(aux)
        return tuple(by_name[n] for n in ("VCEK", "VLEK", "ASK", "ARK") if n in by_name)
    except ProviderError:
        raise
    except Exception as exc:  # ParseError from the table parser, or anything odd in the host's blob
        raise ProviderError(f"configfs-tsm: auxblob is not a usable certificate table: {exc}") from None


def read_event_log(path: Path) -> bytes | None:
    """The CC event log at ``path`` without its padding; None when this TD has no CCEL table.

    A log that exists but does not parse is a ProviderError: evidence without it would hide the boot
    events from a verifier whose policy pins them.
    """
    from ..errors import ParseError
    from ..tdx.eventlog import parse_event_log

    try:
        raw = OsFs().read(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _oserror(f"reading the CC event log {path}", exc) from None
    try:
        return raw[:parse_event_log(raw).length]
    except ParseError as exc:
        raise ProviderError(f"configfs-tsm: the CC event log {path} is not usable: {exc}") from None


def with_event_log(evidence: Evidence, path: Path) -> Evidence:
    log = read_event_log(path)
    if log is None:
        return evidence
    return with_collateral(evidence, {TDX_CCEL_FILE: log})


class ConfigfsTsmProvider:
    """Evidence through configfs-tsm; works for SEV-SNP (sev_guest) and TDX (tdx_guest)."""

    def __init__(self, root: Path = TSM_REPORT_ROOT, *, fs: TsmFs | None = None, privlevel: int | None = None,
                 max_attempts: int = MAX_ATTEMPTS, kds: KdsClient | None = None,
                 pcs: PcsClient | None = None, ccel_path: Path | None = CCEL_PATH,
                 sev_device: Path = Path("/dev/sev-guest"), seal_tcb_version: int | None = None) -> None:
        self.root = Path(root)
        self.ccel_path = ccel_path  # None: TDX evidence carries no event log
        self.sev_device = Path(sev_device)   # SNP: configfs-tsm has no key request; the sealing key comes from here
        self.seal_tcb_version = seal_tcb_version
        self.fs = fs or OsFs()
        self.privlevel = privlevel
        self.max_attempts = max_attempts
        self.kds = kds  # when set, SNP evidence carries the product's CRL (a fetch failure is a ProviderError)
        self.pcs = pcs  # when set, TDX evidence carries the quote's Intel collateral (likewise)
        self._platform: str | None = None

    @property
    def platform(self) -> str:
        if self._platform is None:
            self.probe()
        assert self._platform is not None
        return self._platform

    def probe(self) -> str:
        """Create and remove one entry to learn which TSM provider the kernel has."""
        entry = self._new_entry()
        try:
            self._platform = self._read_provider(entry)
        finally:
            self._remove(entry)
        return self._platform

    @property
    def sealing_binding(self) -> str:
        from .snp_derived_key import binding_description

        return binding_description(self.seal_tcb_version) if self.platform == "snp" else "none"

    def derived_key(self, context: bytes) -> bytes:
        """SNP: the firmware's derived key through /dev/sev-guest (see snp_derived_key). TDX has no sealing key."""
        if self.platform != "snp":
            raise NoSealingKey("TDX has no hardware sealing key: the platform secrets must come from an attested "
                               "peer (cube-enclave serve --join https://PEER)")
        from .snp_derived_key import firmware_derived_key, key_for_context

        key = firmware_derived_key(self.sev_device, vmpl=self.privlevel or 0, tcb_version=self.seal_tcb_version)
        return key_for_context(key, context)

    def _new_entry(self) -> Path:
        entry = self.root / f"cube-ai-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            self.fs.mkdir(entry)
        except OSError as exc:
            raise _oserror(f"mkdir {entry}", exc) from None
        return entry

    def _remove(self, entry: Path) -> None:
        try:
            self.fs.rmdir(entry)
        except OSError:
            pass  # best effort: a leftover entry holds no secret, only a report

    def _read_provider(self, entry: Path) -> str:
        try:
            name = self.fs.read(entry / "provider").decode("ascii", "replace").strip()
        except OSError as exc:
            raise _oserror("reading provider", exc) from None
        platform = PROVIDER_PLATFORMS.get(name)
        if platform is None:
            raise ProviderError(f"configfs-tsm: unsupported TSM provider {name!r}")
        return platform

    def _generation(self, entry: Path) -> int:
        try:
            text = self.fs.read(entry / "generation").decode("ascii").strip()
            return int(text)
        except OSError as exc:
            raise _oserror("reading generation", exc) from None
        except (UnicodeDecodeError, ValueError):
            raise ProviderError("configfs-tsm: generation is not a number") from None

    def get_evidence(self, report_data: bytes) -> Evidence:
        evidence = self._report(report_data)
        if self.kds is not None and evidence.platform == "snp":
            evidence = with_snp_crl(evidence, self.kds)  # after the entry is gone: nothing held while fetching
        if evidence.platform == "tdx" and self.ccel_path is not None:
            evidence = with_event_log(evidence, self.ccel_path)
        if self.pcs is not None and evidence.platform == "tdx":
            evidence = with_tdx_collateral(evidence, self.pcs)
        return evidence

    def _report(self, report_data: bytes) -> Evidence:
        if not isinstance(report_data, (bytes, bytearray)) or len(report_data) != INBLOB_SIZE:
            raise ProviderError(f"report_data must be exactly {INBLOB_SIZE} bytes")
        entry = self._new_entry()
        try:
            platform = self._read_provider(entry)
            self._platform = platform
            for _attempt in range(self.max_attempts):
                got = self._attempt(entry, bytes(report_data), platform)
                if got is not None:
                    return got
            raise ProviderError(
                f"configfs-tsm: another writer kept changing the report entry ({self.max_attempts} attempts)"
            )
        finally:
            self._remove(entry)

    def _attempt(self, entry: Path, report_data: bytes, platform: str) -> Evidence | None:
        if self.privlevel is not None and platform == "snp":
            try:
                self.fs.write(entry / "privlevel", f"{self.privlevel}\n".encode())
            except OSError as exc:
                raise _oserror("writing privlevel", exc) from None
        before = self._generation(entry)
        try:
            self.fs.write(entry / "inblob", report_data)
        except OSError as exc:
            raise _oserror("writing inblob", exc) from None
        try:
            out = self.fs.read(entry / "outblob")
        except OSError as exc:
            raise _oserror("reading outblob", exc) from None
        aux = b""
        if platform == "snp":
            try:
                aux = self.fs.read(entry / "auxblob")
            except FileNotFoundError:
                aux = b""
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENODATA, errno.EOPNOTSUPP):
                    raise _oserror("reading auxblob", exc) from None
        after = self._generation(entry)
        if after != before + 1:
            return None  # someone else wrote inblob/privlevel between our write and our reads
        if not out:
            raise ProviderError("configfs-tsm: the kernel returned an empty outblob")
        if platform == "snp":
            return Evidence(platform="snp", report=out, certificates=certificates_from_auxblob(aux))
        return Evidence(platform="tdx", report=out)
