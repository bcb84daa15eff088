"""SEV-SNP evidence through ``/dev/sev-guest`` (SNP_GET_EXT_REPORT), for kernels without configfs-tsm.

Linux uapi ``include/uapi/linux/sev-guest.h`` (x86-64 layout)::

    struct snp_report_req        { u8 user_data[64]; u32 vmpl; u8 rsvd[28]; }            // 96 bytes
    struct snp_ext_report_req    { struct snp_report_req data; u64 certs_address;
                                   u32 certs_len; /* 4 bytes padding */ }                 // 112 bytes
    struct snp_report_resp       { u8 data[4000]; }
    struct snp_guest_request_ioctl { u8 msg_version; /* 7 bytes padding */ u64 req_data;
                                     u64 resp_data; u64 exitinfo2 (u32 fw_error, u32 vmm_error); }  // 32 bytes

    SNP_GET_EXT_REPORT = _IOWR('S', 0x2, struct snp_guest_request_ioctl)
                       = (3 << 30) | (32 << 16) | (ord('S') << 8) | 0x2 = 0xC0205302

The response ``data`` holds MSG_REPORT_RSP: u32 status, u32 report_size, 24 reserved bytes, then the
report (0x4A0 bytes).  When the certificate buffer is too small the ioctl fails with vmm_error
SNP_GUEST_VMM_ERR_INVALID_LEN (1) and ``certs_len`` says how much is needed; retry with that.
The certificate buffer holds the GHCB certificate table (same format as configfs-tsm's auxblob).

Given a ``KdsClient``, the evidence also carries the product's AMD CRL (see ``snp_crl``).

Hardware is needed to run this; tests cover the structure packing and the response parsing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ProviderError
from ..evidence import Evidence
from .configfs_tsm import certificates_from_auxblob
from .snp_crl import with_snp_crl

if TYPE_CHECKING:  # pragma: no cover
    from ..snp.kds import KdsClient

SEV_GUEST_DEVICE = Path("/dev/sev-guest")


def _iowr(type_char: str, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord(type_char) << 8) | nr


GUEST_REQUEST_IOCTL_SIZE = 32
SNP_GET_REPORT = _iowr("S", 0x0, GUEST_REQUEST_IOCTL_SIZE)  # 0xC0205300
SNP_GET_EXT_REPORT = _iowr("S", 0x2, GUEST_REQUEST_IOCTL_SIZE)  # 0xC0205302
MSG_VERSION = 1
REPORT_RESP_SIZE = 4000
REPORT_RSP_HEADER = 0x20
SNP_REPORT_SIZE = 0x4A0
VMM_ERR_INVALID_LEN = 1
VMM_ERR_BUSY = 2
PAGE = 4096
MAX_CERTS_BYTES = 16 * PAGE

_REPORT_REQ = struct.Struct("<64sI28x")  # 96
_EXT_REPORT_REQ = struct.Struct("<96sQI4x")  # 112
_GUEST_REQUEST = struct.Struct("<B7xQQQ")  # 32


def pack_ext_report_req(report_data: bytes, vmpl: int, certs_address: int, certs_len: int) -> bytes:
    return _EXT_REPORT_REQ.pack(_REPORT_REQ.pack(report_data, vmpl), certs_address, certs_len)


def pack_guest_request(req_address: int, resp_address: int, msg_version: int = MSG_VERSION) -> bytes:
    return _GUEST_REQUEST.pack(msg_version, req_address, resp_address, 0)


def unpack_exitinfo2(guest_request: bytes) -> tuple[int, int]:
    """(fw_error, vmm_error) from a returned snp_guest_request_ioctl."""
    _, _, _, exitinfo2 = _GUEST_REQUEST.unpack(guest_request)
    return exitinfo2 & 0xFFFFFFFF, exitinfo2 >> 32


def parse_report_response(resp: bytes) -> bytes:
    """MSG_REPORT_RSP -> the raw attestation report; ProviderError on a firmware error status."""
    if len(resp) < REPORT_RSP_HEADER + SNP_REPORT_SIZE:
        raise ProviderError("sev-guest: report response too short")
    status, size = struct.unpack_from("<II", resp, 0)
    if status != 0:
        raise ProviderError(f"sev-guest: firmware refused the report request (status {status:#x})")
    if size != SNP_REPORT_SIZE:
        raise ProviderError(f"sev-guest: unexpected report size {size}")
    return bytes(resp[REPORT_RSP_HEADER:REPORT_RSP_HEADER + size])


class SevGuestProvider:
    platform = "snp"

    def __init__(self, device: Path = SEV_GUEST_DEVICE, *, vmpl: int = 0, kds: KdsClient | None = None,
                 seal_tcb_version: int | None = None) -> None:
        self.device = Path(device)
        self.vmpl = vmpl
        self.kds = kds  # when set, evidence carries the product's CRL (a fetch failure is a ProviderError)
        self.seal_tcb_version = seal_tcb_version  # see snp_derived_key: the lowest TCB that derives the key

    @property
    def sealing_binding(self) -> str:
        from .snp_derived_key import binding_description

        return binding_description(self.seal_tcb_version)

    def derived_key(self, context: bytes) -> bytes:
        """A 32-byte sealing key for ``context`` that only this guest image under this policy derives."""
        from .snp_derived_key import firmware_derived_key, key_for_context

        return key_for_context(firmware_derived_key(self.device, vmpl=self.vmpl, tcb_version=self.seal_tcb_version),
                               context)

    def get_evidence(self, report_data: bytes) -> Evidence:
        evidence = self._report(report_data)
        return with_snp_crl(evidence, self.kds) if self.kds is not None else evidence

    def _report(self, report_data: bytes) -> Evidence:  # pragma: no cover - needs SEV-SNP hardware
        import fcntl

        if not isinstance(report_data, (bytes, bytearray)) or len(report_data) != 64:
            raise ProviderError("report_data must be exactly 64 bytes")
        try:
            fd = os.open(self.device, os.O_RDWR)
        except OSError as exc:
            raise ProviderError(f"sev-guest: cannot open {self.device}: {exc.strerror}") from None
        try:
            certs_len = 4 * PAGE
            for _ in range(3):
                certs = ctypes.create_string_buffer(certs_len)
                resp = ctypes.create_string_buffer(REPORT_RESP_SIZE)
                req = ctypes.create_string_buffer(
                    pack_ext_report_req(bytes(report_data), self.vmpl, ctypes.addressof(certs), certs_len),
                    _EXT_REPORT_REQ.size)
                ioc = bytearray(pack_guest_request(ctypes.addressof(req), ctypes.addressof(resp)))
                try:
                    fcntl.ioctl(fd, SNP_GET_EXT_REPORT, ioc, True)
                except OSError as exc:
                    fw_error, vmm_error = unpack_exitinfo2(bytes(ioc))
                    if vmm_error == VMM_ERR_INVALID_LEN:
                        needed = _EXT_REPORT_REQ.unpack(req.raw)[2]
                        if not 0 < needed <= MAX_CERTS_BYTES:
                            raise ProviderError(f"sev-guest: host asks for a {needed}-byte certificate buffer") from None
                        certs_len = -(-needed // PAGE) * PAGE
                        continue
                    if exc.errno == errno.EAGAIN or vmm_error == VMM_ERR_BUSY:
                        continue
                    raise ProviderError(
                        f"sev-guest: SNP_GET_EXT_REPORT failed: {exc.strerror} (fw_error {fw_error:#x}, vmm_error {vmm_error:#x})"
                    ) from None
                report = parse_report_response(resp.raw)
                return Evidence(platform="snp", report=report, certificates=certificates_from_auxblob(certs.raw))
            raise ProviderError("sev-guest: SNP_GET_EXT_REPORT kept failing (busy or certificate length)")
        finally:
            os.close(fd)
