"""The GHCB extended-report certificate table (SNP_GET_EXT_REPORT / MSG_REPORT_REQ certificates).

Layout: entries of {GUID (16 bytes, RFC 4122 byte order), offset u32 LE, length u32 LE}, ended by an
all-zero entry; offsets are relative to the start of the table. Every entry is bounds-checked.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ParseError

VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
VLEK_GUID = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
ARK_GUID = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
GUID_NAMES = {VCEK_GUID: "VCEK", VLEK_GUID: "VLEK", ASK_GUID: "ASK", ARK_GUID: "ARK"}
NAME_GUIDS = {name: guid for guid, name in GUID_NAMES.items()}

_ENTRY = struct.Struct("<16sII")
ENTRY_SIZE = _ENTRY.size
MAX_ENTRIES = 64


@dataclass(frozen=True)
class CertTableEntry:
    guid: uuid.UUID
    data: bytes

    @property
    def name(self) -> str | None:
        """"VCEK", "VLEK", "ASK", "ARK" or None for a GUID this module does not know."""
        return GUID_NAMES.get(self.guid)


def parse_cert_table(blob: bytes) -> list[CertTableEntry]:
    """Entries of a certificate table in order; ParseError on a missing terminator, an entry that
    points outside the blob or into the entry area, or a duplicated GUID."""
    blob = bytes(blob)
    entries: list[tuple[uuid.UUID, int, int]] = []
    pos = 0
    while True:
        if pos + ENTRY_SIZE > len(blob):
            raise ParseError("certificate table has no all-zero terminator entry")
        raw_guid, offset, length = _ENTRY.unpack_from(blob, pos)
        pos += ENTRY_SIZE
        if raw_guid == bytes(16) and offset == 0 and length == 0:
            break
        if raw_guid == bytes(16):
            raise ParseError("certificate table entry with a zero GUID is not a terminator")
        if len(entries) >= MAX_ENTRIES:
            raise ParseError(f"certificate table has more than {MAX_ENTRIES} entries")
        entries.append((uuid.UUID(bytes=raw_guid), offset, length))
    header_end = pos
    seen: set[uuid.UUID] = set()
    out = []
    for guid, offset, length in entries:
        if guid in seen:
            raise ParseError(f"certificate table lists {guid} twice")
        seen.add(guid)
        if length == 0:
            raise ParseError(f"certificate table entry {guid} is empty")
        if offset < header_end or offset + length > len(blob):
            raise ParseError(f"certificate table entry {guid} ({offset}+{length}) lies outside the "
                             f"certificate area {header_end}..{len(blob)}")
        out.append(CertTableEntry(guid, blob[offset:offset + length]))
    return out


def cert_table_by_name(blob: bytes) -> dict[str, bytes]:
    """{"VCEK"|"VLEK"|"ASK"|"ARK": DER} for the known GUIDs of a table (unknown ones dropped)."""
    return {e.name: e.data for e in parse_cert_table(blob) if e.name is not None}


def build_cert_table(entries: Mapping[str | uuid.UUID, bytes] | list[CertTableEntry]) -> bytes:
    """A table holding the given certificates (keys: names "VCEK"/"VLEK"/"ASK"/"ARK" or GUIDs)."""
    if isinstance(entries, Mapping):
        items = []
        for key, data in entries.items():
            guid = key if isinstance(key, uuid.UUID) else NAME_GUIDS.get(key)
            if guid is None:
                raise ValueError(f"unknown certificate table name {key!r}")
            items.append((guid, bytes(data)))
    else:
        items = [(e.guid, e.data) for e in entries]
    if len({g for g, _ in items}) != len(items):
        raise ValueError("duplicate GUID in certificate table")
    offset = ENTRY_SIZE * (len(items) + 1)
    header = bytearray()
    body = bytearray()
    for guid, data in items:
        if not data:
            raise ValueError("empty certificate in certificate table")
        header += _ENTRY.pack(guid.bytes, offset + len(body), len(data))
        body += data
    header += bytes(ENTRY_SIZE)
    return bytes(header + body)
