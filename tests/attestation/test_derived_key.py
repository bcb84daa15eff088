"""Sealing keys: the SNP MSG_KEY_REQ ioctl against a fake /dev/sev-guest, the sim's derived key, TDX's refusal."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import hmac
import struct
from pathlib import Path

import pytest

from attestation.errors import NoSealingKey, ProviderError
from attestation.providers import ConfigfsTsmProvider, SealingKeyProvider, SevGuestProvider, SimProvider
from attestation.providers import snp_derived_key as kd
from attestation.sim import SIM_MEASUREMENT, SimPlatform


class FakeSevGuest:
    """The kernel's SNP_GET_DERIVED_KEY as seen from user space: it reads ``struct snp_derived_key_req`` at
    ``req_data`` and writes MSG_KEY_RSP at ``resp_data``; the "firmware" key is an HMAC of a chip secret over
    the request's guest fields and this guest's (measurement, policy), as the firmware mixes the selected ones."""

    def __init__(self, *, measurement: bytes = b"M" * 48, policy: int = 0x30000, status: int = 0,
                 fail_errno: int | None = None, busy: int = 0) -> None:
        self.chip_secret = b"chip" * 8
        self.measurement, self.policy, self.status = measurement, policy, status
        self.fail_errno, self.busy = fail_errno, busy
        self.requests: list[tuple[int, int, int, int, int, int]] = []
        self.msg_versions: list[int] = []

    def __call__(self, fd: int, request: int, buf: bytearray) -> int:
        assert request == kd.SNP_GET_DERIVED_KEY and len(buf) == 32
        msg_version, req_addr, resp_addr, _ = struct.unpack("<B7xQQQ", bytes(buf))
        self.msg_versions.append(msg_version)
        if self.busy:
            self.busy -= 1
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        if self.fail_errno is not None:
            buf[24:32] = struct.pack("<II", 0x16, 0)
            raise OSError(self.fail_errno, "Input/output error")
        req = ctypes.string_at(req_addr, kd.DERIVED_KEY_REQ_SIZE)
        fields = struct.unpack("<IIQIIQ", req)
        self.requests.append(fields)
        root, _rsvd, select, vmpl, svn, tcb = fields
        mixed = struct.pack("<IQII", root, select, vmpl, svn)
        if select & kd.FIELD_MEASUREMENT:
            mixed += self.measurement
        if select & kd.FIELD_GUEST_POLICY:
            mixed += struct.pack("<Q", self.policy)
        if select & kd.FIELD_TCB_VERSION:
            mixed += struct.pack("<Q", tcb)
        key = hmac.new(self.chip_secret, mixed, hashlib.sha256).digest()
        resp = struct.pack("<I", self.status) + bytes(28) + (key if self.status == 0 else bytes(32))
        ctypes.memmove(resp_addr, resp, len(resp))
        return 0


@pytest.fixture()
def device(tmp_path: Path) -> Path:
    path = tmp_path / "sev-guest"
    path.write_bytes(b"")
    return path


def _snp_provider(device: Path, fake: FakeSevGuest, monkeypatch, **kwargs) -> SevGuestProvider:
    monkeypatch.setattr(kd, "_fcntl_ioctl", fake)
    return SevGuestProvider(device, **kwargs)


def test_struct_layout_matches_the_linux_uapi():
    assert kd.SNP_GET_DERIVED_KEY == 0xC0205301
    req = kd.pack_derived_key_req(root_key_select=1, guest_field_select=0x2B, vmpl=2, guest_svn=7,
                                  tcb_version=0x1122334455667788)
    assert len(req) == 32
    assert struct.unpack("<I", req[0:4]) == (1,) and req[4:8] == bytes(4)
    assert struct.unpack("<Q", req[8:16]) == (0x2B,)
    assert struct.unpack("<II", req[16:24]) == (2, 7)
    assert struct.unpack("<Q", req[24:32]) == (0x1122334455667788,)
    assert kd.FIELDS_BOUND == 0b011111   # policy, image id, family id, measurement, guest svn; not the TCB


def test_response_parsing():
    key = bytes(range(1, 33))
    assert kd.parse_derived_key_response(bytes(32) + key) == key
    with pytest.raises(ProviderError, match="status 0x16"):
        kd.parse_derived_key_response(struct.pack("<I", 0x16) + bytes(60))
    with pytest.raises(ProviderError, match="short"):
        kd.parse_derived_key_response(bytes(40))
    with pytest.raises(ProviderError, match="all-zero"):
        kd.parse_derived_key_response(bytes(64))


def test_snp_provider_requests_the_bound_fields_and_mixes_the_context(device, monkeypatch):
    fake = FakeSevGuest()
    provider = _snp_provider(device, fake, monkeypatch)
    assert isinstance(provider, SealingKeyProvider)
    first = provider.derived_key(b"cube-ai/sealed-state/v1")
    assert len(first) == 32
    assert fake.requests == [(kd.ROOT_KEY_VCEK, 0, kd.FIELDS_BOUND, 0, 0, 0)] and fake.msg_versions == [1]
    assert provider.derived_key(b"cube-ai/sealed-state/v1") == first
    assert provider.derived_key(b"another purpose") != first
    assert "measurement" in provider.sealing_binding and "tcb" not in provider.sealing_binding


def test_snp_key_differs_with_measurement_policy_and_tcb(device, monkeypatch):
    ctx = b"cube-ai/sealed-state/v1"
    base = _snp_provider(device, FakeSevGuest(), monkeypatch).derived_key(ctx)
    assert _snp_provider(device, FakeSevGuest(measurement=b"N" * 48), monkeypatch).derived_key(ctx) != base
    assert _snp_provider(device, FakeSevGuest(policy=0x30001), monkeypatch).derived_key(ctx) != base
    fake = FakeSevGuest()
    bound = _snp_provider(device, fake, monkeypatch, seal_tcb_version=0x1B).derived_key(ctx)
    assert bound != base
    assert fake.requests[-1][2] == kd.FIELDS_BOUND | kd.FIELD_TCB_VERSION and fake.requests[-1][5] == 0x1B


def test_snp_firmware_errors_are_provider_errors(device, monkeypatch):
    with pytest.raises(ProviderError, match="status 0x16"):
        _snp_provider(device, FakeSevGuest(status=0x16), monkeypatch).derived_key(b"c")
    with pytest.raises(ProviderError, match=r"SNP_GET_DERIVED_KEY failed.*fw_error 0x16"):
        _snp_provider(device, FakeSevGuest(fail_errno=errno.EIO), monkeypatch).derived_key(b"c")
    busy = FakeSevGuest(busy=1)
    assert len(_snp_provider(device, busy, monkeypatch).derived_key(b"c")) == 32   # EAGAIN: retried
    with pytest.raises(ProviderError, match="cannot open"):
        SevGuestProvider(device.parent / "absent").derived_key(b"c")
    with pytest.raises(ProviderError, match="context"):
        _snp_provider(device, FakeSevGuest(), monkeypatch).derived_key(b"")


def test_configfs_tsm_snp_uses_the_sev_guest_device_and_tdx_has_no_key(device, monkeypatch, tmp_path):
    fake = FakeSevGuest()
    monkeypatch.setattr(kd, "_fcntl_ioctl", fake)
    snp = ConfigfsTsmProvider(tmp_path / "tsm", sev_device=device)
    snp._platform = "snp"   # what probe() learns from the provider attribute
    direct = SevGuestProvider(device).derived_key(b"ctx")
    assert snp.derived_key(b"ctx") == direct
    tdx = ConfigfsTsmProvider(tmp_path / "tsm", sev_device=device)
    tdx._platform = "tdx"
    with pytest.raises(NoSealingKey, match="attested peer.*--join"):
        tdx.derived_key(b"ctx")
    assert issubclass(NoSealingKey, ProviderError)


def test_sim_derived_key(sim_dir, tmp_path):
    provider = SimProvider(sim_dir)
    assert isinstance(provider, SealingKeyProvider)
    key = provider.derived_key(b"cube-ai/sealed-state/v1")
    assert len(key) == 32 and provider.derived_key(b"cube-ai/sealed-state/v1") == key
    assert provider.derived_key(b"other") != key
    secret = sim_dir / "sealing_secret"
    assert secret.stat().st_mode & 0o777 == 0o600 and key not in secret.read_bytes()
    sim = provider.sim
    assert sim.derived_key(b"cube-ai/sealed-state/v1", measurement=SIM_MEASUREMENT) == key
    assert sim.derived_key(b"cube-ai/sealed-state/v1", measurement=b"\x01" * 48) != key
    assert sim.derived_key(b"cube-ai/sealed-state/v1", policy=0x30001) != key
    # Another simulated platform (another chip) derives another key for the same guest.
    other = SimPlatform.load_or_create(tmp_path / "other-sim")
    assert other.derived_key(b"cube-ai/sealed-state/v1") != key
