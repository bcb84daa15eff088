"""The TDX CC event log (CCEL): parse, replay to RTMR0-3, and extract the boot state it records.

The CCEL is a TCG PC Client crypto-agile log: a legacy SHA-1-format EV_NO_ACTION header event
carrying the "Spec ID Event03" structure (which digest algorithms each event holds, and their sizes),
then TCG_PCR_EVENT2 records.  In a TDX log the "PCR index" is the CC measurement register index:
1..4 are RTMR0..3 (0 would be MRTD, which the TD module measures itself and no event extends).
The log as read from the ACPI CCEL area is padded to the area's size; the end is the first record
header that is all 0x00 or all 0xFF, and everything after it must be that same filler.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from ..errors import BootStateError, ParseError

SHA384_ALG_ID = 0x000C
SHA384_SIZE = 48
RTMR_COUNT = 4
SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"

EV_NO_ACTION = 0x3
EV_SEPARATOR = 0x4
EV_EVENT_TAG = 0x6
EV_IPL = 0xD
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_GPT_EVENT = 0x80000006
EV_EFI_ACTION = 0x80000007

EVENT_TYPE_NAMES = {
    0x0: "EV_PREBOOT_CERT", 0x1: "EV_POST_CODE", 0x2: "EV_UNUSED", 0x3: "EV_NO_ACTION", 0x4: "EV_SEPARATOR",
    0x5: "EV_ACTION", 0x6: "EV_EVENT_TAG", 0x7: "EV_S_CRTM_CONTENTS", 0x8: "EV_S_CRTM_VERSION",
    0x9: "EV_CPU_MICROCODE", 0xA: "EV_PLATFORM_CONFIG_FLAGS", 0xB: "EV_TABLE_OF_DEVICES",
    0xC: "EV_COMPACT_HASH", 0xD: "EV_IPL", 0xE: "EV_IPL_PARTITION_DATA", 0xF: "EV_NONHOST_CODE",
    0x10: "EV_NONHOST_CONFIG", 0x11: "EV_NONHOST_INFO", 0x12: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG", 0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION", 0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER", 0x80000006: "EV_EFI_GPT_EVENT", 0x80000007: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB", 0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2", 0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x8000000C: "EV_EFI_VARIABLE_BOOT2", 0x80000010: "EV_EFI_HCRTM_EVENT",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY", 0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}

# Linux's EFI stub measures the initrd and the command line (LoadOptions) as tagged events.
LINUX_INITRD_TAG = 0x8F3B22ED
LINUX_LOAD_OPTIONS_TAG = 0x8F3B22EC
# GRUB measures its commands and the files it loads as EV_IPL events with these texts.
GRUB_COMMAND_PREFIX = b"grub_cmd: "
GRUB_KERNEL_CMDLINE_PREFIX = b"kernel_cmdline: "
ROLE_NAMES = {"kernel": "kernel", "initrd": "initrd", "cmdline": "kernel command line"}


@dataclass(frozen=True)
class Event:
    """One measured event. ``mr_index`` is the CC MR index (RTMR n is index n + 1)."""

    number: int  # position in the log, the header event being 0
    mr_index: int
    event_type: int
    digest: bytes  # the SHA-384 digest that was extended
    data: bytes

    @property
    def type_name(self) -> str:
        return EVENT_TYPE_NAMES.get(self.event_type, f"0x{self.event_type:08x}")

    @property
    def rtmr(self) -> int | None:
        """The RTMR this event extends, or None (EV_NO_ACTION, or MR index 0)."""
        if self.event_type == EV_NO_ACTION or not 1 <= self.mr_index <= RTMR_COUNT:
            return None
        return self.mr_index - 1


@dataclass(frozen=True)
class EventLog:
    digest_sizes: dict[int, int]  # algorithm id -> digest size, from the Spec ID header
    events: tuple[Event, ...]  # TCG_PCR_EVENT2 records (the header event is not among them)
    length: int  # bytes used by the events; the rest was padding


class _Reader:
    """Bounds-checked little-endian reads: every short read is a ParseError naming the field."""

    def __init__(self, data: bytes, offset: int = 0) -> None:
        self.data = data
        self.offset = offset

    def take(self, size: int, what: str) -> bytes:
        end = self.offset + size
        if size < 0 or end > len(self.data):
            raise ParseError(f"event log truncated: {what} needs bytes {self.offset}..{end}, have {len(self.data)}")
        chunk = self.data[self.offset:end]
        self.offset = end
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "little")

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")


def _parse_spec_id_header(reader: _Reader) -> dict[int, int]:
    mr_index = reader.u32("header MR index")
    event_type = reader.u32("header event type")
    reader.take(20, "header SHA-1 digest")
    size = reader.u32("header event size")
    if event_type != EV_NO_ACTION:
        raise ParseError(f"first event has type 0x{event_type:x}, not EV_NO_ACTION (the Spec ID header)")
    if mr_index > RTMR_COUNT:
        raise ParseError(f"header MR index {mr_index} out of range")
    spec = _Reader(reader.take(size, "Spec ID event data"))
    if spec.take(16, "Spec ID signature") != SPEC_ID_SIGNATURE:
        raise ParseError("first event is not a 'Spec ID Event03' header (not a crypto-agile log)")
    spec.take(8, "Spec ID platform class and version")  # platformClass u32, minor, major, errata, uintnSize
    count = spec.u32("Spec ID algorithm count")
    if not 1 <= count <= 16:
        raise ParseError(f"Spec ID header names {count} digest algorithms (expected 1..16)")
    sizes: dict[int, int] = {}
    for _ in range(count):
        alg, digest_size = spec.u16("algorithm id"), spec.u16("digest size")
        if alg in sizes or not 1 <= digest_size <= 64:
            raise ParseError(f"Spec ID header: algorithm 0x{alg:04x} repeated or with digest size {digest_size}")
        sizes[alg] = digest_size
    vendor_size = spec.u8("vendor info size")
    spec.take(vendor_size, "vendor info")
    if spec.offset != len(spec.data):
        raise ParseError("Spec ID header has bytes after its vendor info")
    if sizes.get(SHA384_ALG_ID) != SHA384_SIZE:
        raise ParseError("event log does not carry SHA-384 digests (algorithm 0x000C, 48 bytes)")
    return sizes


def _is_filler(data: bytes, offset: int) -> bool:
    """The rest of the buffer is padding: all 0x00 or all 0xFF from ``offset`` on.

    The whole rest is only scanned once a record header (8 bytes) looks like filler, and such a
    header that is not followed by filler is not a valid event either: at most one scan per log.
    """
    head = data[offset:offset + 8]
    if head.strip(b"\x00") and head.strip(b"\xff"):
        return False
    rest = data[offset:]
    return not rest.strip(b"\x00") or not rest.strip(b"\xff")


def _parse_event(reader: _Reader, number: int, sizes: dict[int, int]) -> Event:
    mr_index = reader.u32("MR index")
    event_type = reader.u32("event type")
    count = reader.u32("digest count")
    if mr_index > RTMR_COUNT:
        raise ParseError(f"event {number}: MR index {mr_index} is not 0..{RTMR_COUNT}")
    if count != len(sizes):
        raise ParseError(f"event {number}: {count} digests, the header names {len(sizes)} algorithms")
    digests: dict[int, bytes] = {}
    for _ in range(count):
        alg = reader.u16("digest algorithm id")
        if alg not in sizes or alg in digests:
            raise ParseError(f"event {number}: digest algorithm 0x{alg:04x} unknown to the header or repeated")
        digests[alg] = reader.take(sizes[alg], "digest")
    size = reader.u32("event data size")
    data = reader.take(size, "event data")
    return Event(number=number, mr_index=mr_index, event_type=event_type, digest=digests[SHA384_ALG_ID], data=data)


def parse_event_log(data: bytes, *, allow_padding: bool = True) -> EventLog:
    """Bytes -> EventLog; ParseError on anything that is not a well-formed crypto-agile SHA-384 log.

    With ``allow_padding`` (the log as read from the ACPI CCEL area) the log may end with filler
    (all 0x00 or all 0xFF); without it the last event must end the buffer.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError("event log must be bytes")
    data = bytes(data)
    reader = _Reader(data)
    sizes = _parse_spec_id_header(reader)
    events: list[Event] = []
    while reader.offset < len(data):
        if _is_filler(data, reader.offset):
            if not allow_padding:
                raise ParseError(f"event log has {len(data) - reader.offset} bytes of padding after its last event")
            break
        events.append(_parse_event(reader, len(events) + 1, sizes))
    return EventLog(digest_sizes=sizes, events=tuple(events), length=reader.offset)


def replay(log: EventLog) -> tuple[bytes, bytes, bytes, bytes]:
    """RTMR[i] = SHA384(RTMR[i] || digest) from 48 zero bytes, over every event that extends RTMR i."""
    rtmrs = [bytes(SHA384_SIZE)] * RTMR_COUNT
    for event in log.events:
        if event.rtmr is not None:
            rtmrs[event.rtmr] = hashlib.sha384(rtmrs[event.rtmr] + event.digest).digest()
    return rtmrs[0], rtmrs[1], rtmrs[2], rtmrs[3]


def replay_mismatches(log: EventLog, expected: tuple[bytes, bytes, bytes, bytes]) -> list[str]:
    """Names ("rtmr0".."rtmr3") of the registers the log does not replay to."""
    return [f"rtmr{i}" for i, (got, want) in enumerate(zip(replay(log), expected))
            if not hmac.compare_digest(got, want)]


def event_claims(event: Event) -> dict:
    return {"index": event.number, "mr_index": event.mr_index, "rtmr": event.rtmr, "type": event.type_name,
            "digest": event.digest.hex()}


# -- boot state ---------------------------------------------------------------------------------------

def _text(data: bytes) -> str:
    return data.rstrip(b"\x00").decode("utf-8", errors="replace")


def _efi_file_path(data: bytes) -> str | None:
    """The media file path node of a UEFI_IMAGE_LOAD_EVENT's device path, if any (best effort)."""
    if len(data) < 32:
        return None
    path_length = int.from_bytes(data[24:32], "little")
    path = data[32:32 + path_length]
    offset, parts = 0, []
    while offset + 4 <= len(path):
        node_type, subtype, length = path[offset], path[offset + 1], int.from_bytes(path[offset + 2:offset + 4], "little")
        if node_type == 0x7F or length < 4 or offset + length > len(path):
            break
        if node_type == 0x04 and subtype == 0x04:
            parts.append(path[offset + 4:offset + length].decode("utf-16-le", errors="replace").rstrip("\x00"))
        offset += length
    return "".join(parts) or None


def _grub_command_argument(line: bytes, command: bytes) -> bytes | None:
    """For "grub_cmd: linux /path args" and command b"linux": b"/path"."""
    body = line[len(GRUB_COMMAND_PREFIX):].rstrip(b"\x00")
    words = body.split()
    if len(words) >= 2 and words[0] == command:
        return words[1]
    return None


def _grub_text(data: bytes, prefix: bytes) -> bytes | None:
    """The text of a GRUB text event (after ``prefix``, without its NUL), or None if it is not UTF-8 text."""
    text = data[len(prefix):].rstrip(b"\x00")
    if b"\x00" in text:
        return None
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text


def _printable_ascii(data: bytes) -> bool:
    return all(0x20 <= b < 0x7F for b in data)


def _data_vouches(event: Event) -> bool:
    """The event's digest is that of a harmless record its data shows: a separator, an EFI action's text, a
    GPT header (SHA-384 of the data) or a GRUB command's text.

    The data is the log writer's choice, so "SHA-384 of the data" alone explains nothing: the writer knows
    the preimage of every digest it had measured (a command line's UTF-16 text, a small EFI application's
    Authenticode input) and could relabel that event as data.  Only records of a shape no loaded component
    or command line has (4-byte separator, printable ASCII, a GPT header: the firmware's, in RTMR0/RTMR1;
    NUL-free UTF-8 text: GRUB's, in RTMR2) explain.
    """
    if event.event_type == EV_IPL:
        for prefix in (GRUB_COMMAND_PREFIX, GRUB_KERNEL_CMDLINE_PREFIX):
            if event.rtmr == 2 and event.data.startswith(prefix):
                text = _grub_text(event.data, prefix)
                return text is not None and hmac.compare_digest(hashlib.sha384(text).digest(), event.digest)
        return False
    # the firmware's records (PCR 0-7): in RTMR0/RTMR1, never in RTMR2 (GRUB's and the EFI stub's PCR 8/9)
    shaped = event.rtmr in (0, 1) and (
        (event.event_type == EV_SEPARATOR and len(event.data) == 4)
        or (event.event_type == EV_EFI_ACTION and _printable_ascii(event.data))
        or (event.event_type == EV_EFI_GPT_EVENT and event.data.startswith(b"EFI PART")))
    return shaped and hmac.compare_digest(hashlib.sha384(event.data).digest(), event.digest)


def boot_state(log: EventLog) -> dict:
    """What the log says was booted: EFI applications, kernel, initrd and command line where identified.

    Every digest here is one the log extended (so, once the log replays, one the quote vouches for);
    texts are only reported where they hash to their digest. ``source`` says which loader measured
    an item: "grub" (file and command events), "efi_stub" (the Linux EFI stub's tagged events: the
    LoadOptions digest covers UTF-16LE text and its NUL, the event itself carries no text) or
    "efi_application" (no GRUB kernel event: the kernel is the last EFI application the firmware
    measured, as in direct boot where TDVF loads QEMU's -kernel).  ``opaque_events`` lists the RTMR1/RTMR2
    events whose digest their data does not explain (applications, files, blobs; see ``_data_vouches``): a
    policy must account for each, since the type and data of an event are not covered by the replay.  The
    kernel comes only from RTMR1, initrd and command line only from RTMR2, one of each.

    BootStateError when the log cannot be trusted for this: a duplicate EV_SEPARATOR in one MR (a known
    firmware bug after which events may be attributed to the wrong boot phase), or a second initrd,
    command line or GRUB-loaded kernel.
    """
    separators: set[int] = set()
    for event in log.events:
        if event.event_type == EV_SEPARATOR:
            if event.mr_index in separators:
                raise BootStateError(f"duplicate separator in RTMR{event.mr_index - 1} (event {event.number})")
            separators.add(event.mr_index)
    state: dict = {"efi_applications": [], "kernel": None, "initrd": None, "cmdline": None}
    wanted: dict[bytes, str] = {}  # file path GRUB was told to load -> "kernel" / "initrd"

    def found(role: str, item: dict, event: Event) -> None:
        # One of each: a second one (an event appended at run time, say) would otherwise replace the first.
        if state[role] is not None:
            raise BootStateError(f"a second {ROLE_NAMES[role]} event (event {event.number}): the log records "
                                 "more than one boot")
        state[role] = item

    for event in log.events:
        # Each loader measures into one RTMR (EFI applications: PCR4 -> RTMR1; GRUB and the EFI stub: PCR8/9
        # -> RTMR2); an event of such a type elsewhere (RTMR0: host-chosen configuration, RTMR3: run time)
        # identifies nothing.
        if event.rtmr == 1 and event.event_type == EV_EFI_BOOT_SERVICES_APPLICATION:
            state["efi_applications"].append({"path": _efi_file_path(event.data), "digest": event.digest.hex()})
        elif event.rtmr == 2 and event.event_type == EV_IPL:
            line = event.data
            if line.startswith(GRUB_KERNEL_CMDLINE_PREFIX):
                # GRUB extends SHA-384 of the text after the prefix (without its NUL).
                text = _grub_text(line, GRUB_KERNEL_CMDLINE_PREFIX)
                vouched = text is not None and hmac.compare_digest(hashlib.sha384(text).digest(), event.digest)
                found("cmdline", {"value": _text(text) if vouched and text is not None else None,
                                  "digest": event.digest.hex(), "source": "grub"}, event)
            elif line.startswith(GRUB_COMMAND_PREFIX):
                for command, role in ((b"linux", "kernel"), (b"linuxefi", "kernel"), (b"initrd", "initrd"),
                                      (b"initrdefi", "initrd")):
                    path = _grub_command_argument(line, command)
                    if path is not None:
                        wanted[path] = role
            elif line.rstrip(b"\x00") in wanted:
                path = line.rstrip(b"\x00")
                found(wanted.pop(path), {"path": _text(path), "digest": event.digest.hex(), "source": "grub"}, event)
        elif event.rtmr == 2 and event.event_type == EV_EVENT_TAG and len(event.data) >= 8:
            tag = struct.unpack_from("<I", event.data)[0]
            if tag == LINUX_INITRD_TAG:
                found("initrd", {"path": None, "digest": event.digest.hex(), "source": "efi_stub"}, event)
            elif tag == LINUX_LOAD_OPTIONS_TAG:
                found("cmdline", {"value": None, "digest": event.digest.hex(), "source": "efi_stub"}, event)
    # An event's type and data are not covered by the replay (only its digest and MR index are): an event
    # whose digest its data does not explain could be anything relabelled, so these are listed for policies.
    state["opaque_events"] = [{"index": e.number, "rtmr": e.rtmr, "type": e.type_name, "digest": e.digest.hex()}
                              for e in log.events if e.rtmr in (1, 2) and not _data_vouches(e)]
    if state["kernel"] is None and state["efi_applications"]:
        last = state["efi_applications"][-1]
        state["kernel"] = {"path": last["path"], "digest": last["digest"], "source": "efi_application"}
    return state


def cmdline_digests(text: str) -> dict[str, bytes]:
    """The digest each loader extends for this command line, by ``source`` (see ``boot_state``)."""
    return {"efi_stub": hashlib.sha384(text.encode("utf-16-le") + b"\x00\x00").digest(),
            "grub": hashlib.sha384(text.encode("utf-8")).digest()}


def replay_claims(log: EventLog) -> dict:
    """The claims a replayed log adds: its events and the boot state (or why there is none)."""
    claims: dict = {"eventlog": [event_claims(e) for e in log.events]}
    try:
        claims["boot_state"] = boot_state(log)
    except BootStateError as exc:
        claims["boot_state"] = None
        claims["boot_state_error"] = str(exc)
    return claims
