"""Evidence providers: configfs-tsm against a kernel-like fake, sev-guest struct packing, sim, detection."""

from __future__ import annotations

import dataclasses
import errno
import struct
from pathlib import Path

import pytest

from attestation.errors import ProviderError
from attestation.evidence import SNP_CRL_FILE, Evidence, decode_cmw, encode_cmw
from attestation.providers import (
    ConfigfsTsmProvider,
    EvidenceProvider,
    SevGuestProvider,
    SimProvider,
    detect_provider,
)
from attestation.providers import sev_guest
from attestation.snp.certtable import build_cert_table
from attestation.verifier import verify_evidence


class FakeTsmKernel:
    """A configfs-tsm report directory that behaves as the kernel's (drivers/virt/coco/tsm.c).

    Faithful points: ``mkdir`` creates an entry with the attributes ``inblob`` (write-only, at most
    64 bytes, else EINVAL), ``outblob``/``auxblob`` (read-only, generated on first read after an
    inblob write and then cached), ``provider`` ("sev_guest"/"tdx_guest"), ``generation`` (bumped on
    every inblob/privlevel write) and ``privlevel`` (0..3); unknown attributes -> ENOENT; ``rmdir``
    removes the entry.  Reports come from the simulated platform (SNP layout) or a fixed TDX quote.
    Test hooks: ``race_on_outblob`` (another writer writes inblob just before our outblob read)
    and ``outblob_errno`` (the kernel fails the read, as when the PSP/QGS refuses).
    """

    def __init__(self, root: Path, *, sim=None, tdx_quote: bytes | None = None) -> None:
        self.root = root
        self.sim = sim
        self.tdx_quote = tdx_quote
        self.entries: dict[Path, dict] = {}
        self.race_on_outblob = 0
        self.outblob_errno: int | None = None
        self.outblob_reads = 0
        self.removed = 0

    # TsmFs
    def mkdir(self, path: Path) -> None:
        if path.parent != self.root:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        if path in self.entries:
            raise FileExistsError(errno.EEXIST, "File exists", str(path))
        self.entries[path] = {"generation": 0, "inblob": None, "privlevel": 0, "out": None, "aux": b""}

    def rmdir(self, path: Path) -> None:
        if path not in self.entries:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        del self.entries[path]
        self.removed += 1

    def _entry(self, path: Path) -> dict:
        entry = self.entries.get(path.parent)
        if entry is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return entry

    def write(self, path: Path, data: bytes) -> None:
        entry = self._entry(path)
        if path.name == "inblob":
            if len(data) > 64:
                raise OSError(errno.EINVAL, "Invalid argument", str(path))
            entry["inblob"] = bytes(data).ljust(64, b"\x00")
        elif path.name == "privlevel":
            level = int(data.decode().strip())
            if not 0 <= level <= 3:
                raise OSError(errno.EINVAL, "Invalid argument", str(path))
            entry["privlevel"] = level
        elif path.name in ("outblob", "auxblob", "provider", "generation"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        else:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        entry["generation"] += 1
        entry["out"] = None

    def read(self, path: Path) -> bytes:
        entry = self._entry(path)
        if path.name == "provider":
            return b"tdx_guest\n" if self.tdx_quote is not None else b"sev_guest\n"
        if path.name == "generation":
            return f"{entry['generation']}\n".encode()
        if path.name in ("outblob", "auxblob"):
            if path.name == "outblob":
                self.outblob_reads += 1
                if self.race_on_outblob:
                    self.race_on_outblob -= 1
                    self.write(path.parent / "inblob", b"someone else's nonce")
                if self.outblob_errno is not None:
                    raise OSError(self.outblob_errno, "kernel refused", str(path))
            if entry["inblob"] is None:
                raise OSError(errno.EINVAL, "Invalid argument", str(path))
            if entry["out"] is None:
                self._generate(entry)
            return entry["out"] if path.name == "outblob" else entry["aux"]
        if path.name == "inblob":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))

    def _generate(self, entry: dict) -> None:
        if self.tdx_quote is not None:
            entry["out"], entry["aux"] = self.tdx_quote, b""
            return
        report, (vcek, ask, ark) = self.sim.report(entry["inblob"], vmpl=entry["privlevel"])
        entry["out"] = report
        entry["aux"] = build_cert_table({"VCEK": vcek, "ASK": ask, "ARK": ark})


@pytest.fixture
def kernel(tmp_path, sim_platform):
    return FakeTsmKernel(tmp_path / "report", sim=sim_platform)


def test_configfs_tsm_snp_evidence_verifies(kernel, sim_platform, sim_policy):
    provider = ConfigfsTsmProvider(kernel.root, fs=kernel)
    rd = bytes(range(64))
    evidence = provider.get_evidence(rd)
    assert provider.platform == "snp"
    assert evidence.platform == "snp" and len(evidence.certificates) == 3
    assert kernel.entries == {} and kernel.removed == 1
    # The fake kernel signs with the sim platform: verify it as sim evidence through the same path.
    as_sim = Evidence("sim", evidence.report, evidence.certificates, product="Sim",
                      collateral={SNP_CRL_FILE: sim_platform.crl()})  # the sim policy requires a CRL
    verdict = verify_evidence(as_sim, policy=sim_policy, expected_report_data=rd)
    assert verdict.ok, verdict.error


def test_configfs_tsm_generation_race_retries(kernel, sim_platform, sim_policy):
    kernel.race_on_outblob = 2
    provider = ConfigfsTsmProvider(kernel.root, fs=kernel)
    rd = b"\x42" * 64
    evidence = provider.get_evidence(rd)
    assert kernel.outblob_reads == 3  # two raced attempts, one clean
    verdict = verify_evidence(Evidence("sim", evidence.report, evidence.certificates,
                                       collateral={SNP_CRL_FILE: sim_platform.crl()}),
                              policy=sim_policy, expected_report_data=rd)
    assert verdict.ok, verdict.error
    assert kernel.entries == {}


def test_configfs_tsm_gives_up_on_endless_race(kernel):
    kernel.race_on_outblob = 100
    with pytest.raises(ProviderError, match="another writer"):
        ConfigfsTsmProvider(kernel.root, fs=kernel, max_attempts=3).get_evidence(bytes(64))
    assert kernel.entries == {}


def test_configfs_tsm_kernel_error(kernel):
    kernel.outblob_errno = errno.EIO
    with pytest.raises(ProviderError, match="reading outblob failed: EIO"):
        ConfigfsTsmProvider(kernel.root, fs=kernel).get_evidence(bytes(64))
    assert kernel.entries == {}  # cleaned up after the failure


def test_configfs_tsm_missing_root_and_bad_input(tmp_path, kernel):
    with pytest.raises(ProviderError, match="mkdir"):
        ConfigfsTsmProvider(tmp_path / "nope", fs=kernel).get_evidence(bytes(64))
    with pytest.raises(ProviderError, match="64 bytes"):
        ConfigfsTsmProvider(kernel.root, fs=kernel).get_evidence(b"short")


def test_configfs_tsm_privlevel(kernel):
    from attestation.snp.report import parse_report

    evidence = ConfigfsTsmProvider(kernel.root, fs=kernel, privlevel=2).get_evidence(bytes(64))
    assert parse_report(evidence.report).vmpl == 2


def test_configfs_tsm_tdx(tmp_path, vectors_dir):
    quote = (vectors_dir / "tdx" / "go-tdx-guest--quote_v5_sample.dat").read_bytes()
    kernel = FakeTsmKernel(tmp_path / "report", tdx_quote=quote)
    provider = ConfigfsTsmProvider(kernel.root, fs=kernel)
    assert provider.probe() == "tdx"
    evidence = provider.get_evidence(bytes(64))
    assert evidence.platform == "tdx" and evidence.report == quote and not evidence.certificates


def test_configfs_tsm_unknown_provider(tmp_path, kernel):
    class OtherKernel(FakeTsmKernel):
        def read(self, path):
            return b"arm_cca_guest\n" if path.name == "provider" else super().read(path)

    other = OtherKernel(kernel.root, sim=kernel.sim)
    with pytest.raises(ProviderError, match="unsupported TSM provider"):
        ConfigfsTsmProvider(other.root, fs=other).get_evidence(bytes(64))


def test_configfs_tsm_on_a_real_directory_tree(tmp_path):
    """The OsFs path: a plain directory is not configfs, so the entry has no provider attribute."""
    root = tmp_path / "report"
    root.mkdir()
    with pytest.raises(ProviderError, match="reading provider"):
        ConfigfsTsmProvider(root).get_evidence(bytes(64))
    assert list(root.iterdir()) == []


def test_bad_auxblob_is_a_provider_error(kernel):
    class BadAux(FakeTsmKernel):
        def read(self, path):
            data = super().read(path)
            return b"\x01" * 40 if path.name == "auxblob" else data

    bad = BadAux(kernel.root, sim=kernel.sim)
    with pytest.raises(ProviderError, match="auxblob"):
        ConfigfsTsmProvider(bad.root, fs=bad).get_evidence(bytes(64))


def test_sev_guest_struct_packing():
    assert sev_guest.SNP_GET_REPORT == 0xC0205300
    assert sev_guest.SNP_GET_EXT_REPORT == 0xC0205302
    req = sev_guest.pack_ext_report_req(b"\xaa" * 64, 1, 0x1122334455667788, 0x4000)
    assert len(req) == 112
    assert req[:64] == b"\xaa" * 64
    assert struct.unpack_from("<I", req, 64)[0] == 1 and req[68:96] == bytes(28)
    assert struct.unpack_from("<QI", req, 96) == (0x1122334455667788, 0x4000)
    ioc = sev_guest.pack_guest_request(0x1000, 0x2000)
    assert len(ioc) == 32 and ioc[0] == 1 and ioc[1:8] == bytes(7)
    assert struct.unpack_from("<QQQ", ioc, 8) == (0x1000, 0x2000, 0)
    returned = ioc[:24] + struct.pack("<II", 0x16, 1)
    assert sev_guest.unpack_exitinfo2(returned) == (0x16, 1)


def test_sev_guest_response_parsing(sim_platform):
    report, _ = sim_platform.report(bytes(64))
    resp = struct.pack("<II", 0, len(report)) + bytes(24) + report
    resp = resp.ljust(sev_guest.REPORT_RESP_SIZE, b"\x00")
    assert sev_guest.parse_report_response(resp) == report
    with pytest.raises(ProviderError, match="status 0x16"):
        sev_guest.parse_report_response(struct.pack("<II", 0x16, 0) + bytes(4000))
    with pytest.raises(ProviderError, match="size"):
        sev_guest.parse_report_response(struct.pack("<II", 0, 100) + bytes(4000))
    with pytest.raises(ProviderError, match="short"):
        sev_guest.parse_report_response(b"\x00" * 10)


def test_sim_provider(sim_dir, sim_policy):
    provider = SimProvider(sim_dir)
    assert isinstance(provider, EvidenceProvider) and provider.platform == "sim"
    evidence = provider.get_evidence(b"\x07" * 64)
    assert evidence.product == "Sim" and len(evidence.certificates) == 3
    assert verify_evidence(evidence, policy=sim_policy, expected_report_data=b"\x07" * 64).ok
    with pytest.raises(ProviderError):
        provider.get_evidence(b"\x07" * 63)


def test_sim_provider_evidence_carries_a_crl_that_verifies(sim_dir, sim_policy):
    """The development policy requires the CRL; the sim provider attaches its own, which is checked."""
    assert sim_policy.snp.require_crl and sim_policy.snp.vmpl == 0
    evidence = SimProvider(sim_dir).get_evidence(b"\x07" * 64)
    assert set(evidence.collateral) == {SNP_CRL_FILE}
    verdict = verify_evidence(decode_cmw(encode_cmw(evidence)), policy=sim_policy, expected_report_data=b"\x07" * 64)
    assert verdict.ok, verdict.error
    assert [c.ok for c in verdict.checks if c.name == "crl"] == [True]


def test_sim_policy_refuses_evidence_with_the_crl_stripped(sim_dir, sim_policy):
    """A host that drops the CRL from the bundle cannot skip revocation against the development policy."""
    evidence = SimProvider(sim_dir).get_evidence(b"\x07" * 64)
    stripped = dataclasses.replace(evidence, collateral={})
    verdict = verify_evidence(decode_cmw(encode_cmw(stripped)), policy=sim_policy, expected_report_data=b"\x07" * 64)
    assert not verdict.ok and verdict.status == "collateral_unavailable"
    assert "CRL" in verdict.error


@pytest.fixture
def fake_kds():
    from tests.attestation.test_snp_kds import FakeKds

    fake = FakeKds()
    url = fake.start()
    yield fake, url
    fake.stop()


def test_configfs_tsm_with_kds_attaches_the_product_crl(kernel, sim_platform, sim_policy, fake_kds):
    """The product comes from the report (CPUID) or its VEK: here the fake kernel's VCEK says "Sim"."""
    from attestation.snp.kds import KdsClient

    fake, url = fake_kds
    fake.crls[("vcek", "Sim")] = sim_platform.crl()
    with KdsClient(base_url=url) as kds:
        provider = ConfigfsTsmProvider(kernel.root, fs=kernel, kds=kds)
        rd = bytes(range(64))
        evidence = provider.get_evidence(rd)
        again = provider.get_evidence(rd)
    assert fake.requests == ["/vcek/v1/Sim/crl"]  # fetched once, then served from the client's cache
    assert evidence.platform == "snp" and evidence.collateral[SNP_CRL_FILE] == sim_platform.crl()
    assert again.collateral[SNP_CRL_FILE] == sim_platform.crl()
    assert kernel.entries == {}
    as_sim = Evidence("sim", evidence.report, evidence.certificates, collateral=evidence.collateral)
    verdict = verify_evidence(decode_cmw(encode_cmw(as_sim)), policy=sim_policy, expected_report_data=rd)
    assert verdict.ok, verdict.error
    assert [c.ok for c in verdict.checks if c.name == "crl"] == [True]


def test_configfs_tsm_with_failing_kds_is_a_provider_error(kernel, fake_kds):
    from attestation.snp.kds import KdsClient

    fake, url = fake_kds  # serves no CRL: 404, which KDS answers at once (not retried)
    with KdsClient(base_url=url, max_attempts=1) as kds:
        with pytest.raises(ProviderError, match=r"cannot fetch the AMD CRL of Sim \(VCEK\).*HTTP 404.*not published"):
            ConfigfsTsmProvider(kernel.root, fs=kernel, kds=kds).get_evidence(bytes(64))
    assert kernel.entries == {}
    fake.crls[("vcek", "Sim")] = b"not a CRL"
    with KdsClient(base_url=url, max_attempts=1) as kds:
        with pytest.raises(ProviderError, match="unusable data"):
            ConfigfsTsmProvider(kernel.root, fs=kernel, kds=kds).get_evidence(bytes(64))
    with KdsClient(base_url="http://127.0.0.1:9", max_attempts=1, timeout=2.0) as kds:  # nothing listens
        with pytest.raises(ProviderError, match="cannot fetch the AMD CRL"):
            ConfigfsTsmProvider(kernel.root, fs=kernel, kds=kds).get_evidence(bytes(64))


def test_configfs_tsm_with_kds_needs_to_know_the_product(kernel, fake_kds):
    """No CPUID (zero) and no VEK from the host: which CRL to attach cannot be told -> ProviderError."""
    from attestation.snp.kds import KdsClient

    class NoCerts(FakeTsmKernel):
        def read(self, path):
            data = super().read(path)
            return b"" if path.name == "auxblob" else data

    bare = NoCerts(kernel.root, sim=kernel.sim)
    _fake, url = fake_kds
    with KdsClient(base_url=url) as kds:
        with pytest.raises(ProviderError, match="which product"):
            ConfigfsTsmProvider(bare.root, fs=bare, kds=kds).get_evidence(bytes(64))
    assert ConfigfsTsmProvider(bare.root, fs=bare).get_evidence(bytes(64)).collateral == {}  # without kds: as before


def test_detect_provider(tmp_path, sim_dir):
    assert isinstance(detect_provider(simulate=True, sim_dir=sim_dir), SimProvider)
    with pytest.raises(ProviderError, match="--simulate"):
        detect_provider(tsm_root=tmp_path / "no-tsm", sev_device=tmp_path / "no-dev")
    device = tmp_path / "sev-guest"
    device.write_bytes(b"")
    found = detect_provider(tsm_root=tmp_path / "no-tsm", sev_device=device)
    assert isinstance(found, SevGuestProvider) and found.platform == "snp"
    # a directory that is not a working configfs-tsm falls back to the device
    (tmp_path / "tsm").mkdir()
    assert isinstance(detect_provider(tsm_root=tmp_path / "tsm", sev_device=device), SevGuestProvider)
    assert isinstance(SevGuestProvider(device), EvidenceProvider)


def test_detect_provider_prefers_configfs_tsm(kernel, tmp_path):
    kernel.root.mkdir()
    device = tmp_path / "sev-guest"
    device.write_bytes(b"")
    found = detect_provider(tsm_root=kernel.root, sev_device=device, tsm_fs=kernel)
    assert isinstance(found, ConfigfsTsmProvider) and found.platform == "snp"
    assert isinstance(found, EvidenceProvider)
    assert kernel.entries == {}


def test_detect_provider_hands_the_kds_client_to_snp_providers(kernel, tmp_path, sim_dir):
    from attestation.snp.kds import KdsClient

    kds = KdsClient(base_url="http://127.0.0.1:9")
    kernel.root.mkdir()
    device = tmp_path / "sev-guest"
    device.write_bytes(b"")
    assert detect_provider(tsm_root=kernel.root, sev_device=device, tsm_fs=kernel, kds=kds).kds is kds
    assert detect_provider(tsm_root=tmp_path / "no-tsm", sev_device=device, kds=kds).kds is kds
    assert detect_provider(tsm_root=kernel.root, sev_device=device, tsm_fs=kernel).kds is None
    assert isinstance(detect_provider(simulate=True, sim_dir=sim_dir, kds=kds), SimProvider)  # the sim has its own
