"""SEV-SNP sealing key: MSG_KEY_REQ through ``/dev/sev-guest`` (ioctl SNP_GET_DERIVED_KEY).

The firmware derives a 32-byte key from a root key only it holds (the chip's VCEK, or the VM's VMRK) mixed with
the guest fields the request selects. The host cannot derive it: it never sees the root key, and it cannot
make the firmware derive the key for a guest whose measurement or policy differs from the one it launched.

Linux uapi ``include/uapi/linux/sev-guest.h`` (x86-64 layout)::

    struct snp_derived_key_req  { u32 root_key_select; u32 rsvd; u64 guest_field_select;
                                  u32 vmpl; u32 guest_svn; u64 tcb_version; }          // 32 bytes
    struct snp_derived_key_resp { u8 data[64]; }                                     // MSG_KEY_RSP
    SNP_GET_DERIVED_KEY = _IOWR('S', 0x1, struct snp_guest_request_ioctl) = 0xC0205301

MSG_KEY_RSP (SEV-SNP ABI): u32 STATUS at 0x00 (0 = success), reserved to 0x1F, DERIVED_KEY (32 bytes) at 0x20.
GUEST_FIELD_SELECT bits: 0 guest policy, 1 image ID, 2 family ID, 3 measurement, 4 guest SVN, 5 TCB version.

What the sealing key is bound to (``FIELDS_BOUND``): the launch measurement, the guest policy, the ID block's
image and family IDs, and the guest SVN (0: our images carry no ID block SVN). Root key: the VCEK (a key the
chip derives per TCB; the VMRK exists only with a migration agent). The TCB version is bound only when the
provider is given ``seal_tcb_version`` (the lowest TCB the operator accepts): the firmware then refuses to
derive the key below that TCB, so rolling the firmware back under it loses the key, while later firmware
(committed TCB at least that value) still derives the same key, so a TCB update needs no re-join. Without it
the key does not change with the TCB. Any change of image (measurement) or policy gives another key: an
upgraded image obtains the secrets from a peer (``--join``), never from the old sealed file.

The ``context`` a caller passes is mixed in afterwards (HKDF-SHA-256 over the firmware key), so one firmware
key serves several purposes without reuse.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ProviderError
from .sev_guest import GUEST_REQUEST_IOCTL_SIZE, MSG_VERSION, _iowr, pack_guest_request, unpack_exitinfo2

SNP_GET_DERIVED_KEY = _iowr("S", 0x1, GUEST_REQUEST_IOCTL_SIZE)  # 0xC0205301
DERIVED_KEY_REQ_SIZE = 32
DERIVED_KEY_RESP_SIZE = 64
KEY_RSP_KEY_OFFSET = 0x20
DERIVED_KEY_BYTES = 32

ROOT_KEY_VCEK = 0
FIELD_GUEST_POLICY = 1 << 0
FIELD_IMAGE_ID = 1 << 1
FIELD_FAMILY_ID = 1 << 2
FIELD_MEASUREMENT = 1 << 3
FIELD_GUEST_SVN = 1 << 4
FIELD_TCB_VERSION = 1 << 5
FIELDS_BOUND = FIELD_GUEST_POLICY | FIELD_IMAGE_ID | FIELD_FAMILY_ID | FIELD_MEASUREMENT | FIELD_GUEST_SVN
_CONTEXT_LABEL = b"cube-ai/snp-derived-key/v1\x00"

_DERIVED_KEY_REQ = struct.Struct("<IIQIIQ")  # 32

# ioctl(fd, request, buffer): fcntl.ioctl's shape with a mutable buffer; tests pass a fake device.
IoctlFn = Callable[[int, int, bytearray], object]


def pack_derived_key_req(*, root_key_select: int = ROOT_KEY_VCEK, guest_field_select: int = FIELDS_BOUND,
                         vmpl: int = 0, guest_svn: int = 0, tcb_version: int = 0) -> bytes:
    return _DERIVED_KEY_REQ.pack(root_key_select, 0, guest_field_select, vmpl, guest_svn, tcb_version)


def parse_derived_key_response(resp: bytes) -> bytes:
    """MSG_KEY_RSP -> the 32-byte derived key; ProviderError on a firmware error status."""
    if len(resp) < DERIVED_KEY_RESP_SIZE:
        raise ProviderError("sev-guest: derived key response too short")
    (status,) = struct.unpack_from("<I", resp, 0)
    if status != 0:
        raise ProviderError(f"sev-guest: firmware refused the key request (status {status:#x})")
    key = bytes(resp[KEY_RSP_KEY_OFFSET:KEY_RSP_KEY_OFFSET + DERIVED_KEY_BYTES])
    if not any(key):
        raise ProviderError("sev-guest: firmware returned an all-zero derived key")
    return key


def _fcntl_ioctl(fd: int, request: int, buf: bytearray) -> object:  # pragma: no cover - needs SEV-SNP hardware
    import fcntl

    return fcntl.ioctl(fd, request, buf, True)


def firmware_derived_key(device: Path, *, vmpl: int = 0, tcb_version: int | None = None,
                         ioctl: IoctlFn | None = None, attempts: int = 3) -> bytes:
    """The firmware's derived key for this guest (see the module docstring for what it is bound to)."""
    ioctl = ioctl or _fcntl_ioctl
    fields = FIELDS_BOUND | (FIELD_TCB_VERSION if tcb_version is not None else 0)
    try:
        fd = os.open(device, os.O_RDWR)
    except OSError as exc:
        raise ProviderError(f"sev-guest: cannot open {device}: {exc.strerror}") from None
    try:
        for _ in range(attempts):
            req = ctypes.create_string_buffer(pack_derived_key_req(guest_field_select=fields, vmpl=vmpl,
                                                                   tcb_version=tcb_version or 0),
                                              DERIVED_KEY_REQ_SIZE)
            resp = ctypes.create_string_buffer(DERIVED_KEY_RESP_SIZE)
            ioc = bytearray(pack_guest_request(ctypes.addressof(req), ctypes.addressof(resp), MSG_VERSION))
            try:
                ioctl(fd, SNP_GET_DERIVED_KEY, ioc)
            except OSError as exc:
                fw_error, vmm_error = unpack_exitinfo2(bytes(ioc))
                if exc.errno == errno.EAGAIN:
                    continue
                raise ProviderError(f"sev-guest: SNP_GET_DERIVED_KEY failed: {exc.strerror} "
                                    f"(fw_error {fw_error:#x}, vmm_error {vmm_error:#x})") from None
            try:
                return parse_derived_key_response(resp.raw)
            finally:
                ctypes.memset(resp, 0, DERIVED_KEY_RESP_SIZE)   # no copy of the key left in this buffer
        raise ProviderError("sev-guest: SNP_GET_DERIVED_KEY kept failing (busy)")
    finally:
        os.close(fd)


def key_for_context(firmware_key: bytes, context: bytes) -> bytes:
    """A 32-byte key for one purpose (``context``) from the firmware key."""
    if not isinstance(context, bytes) or not context:
        raise ProviderError("derived_key needs a non-empty context")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_CONTEXT_LABEL + context).derive(firmware_key)


def binding_description(tcb_version: int | None) -> str:
    """What an SNP sealing key is bound to, as the sealed state's header names it."""
    tcb = f", tcb>={tcb_version:#x}" if tcb_version is not None else ""
    return f"snp-vcek:measurement,policy,image_id,family_id,guest_svn{tcb}"
