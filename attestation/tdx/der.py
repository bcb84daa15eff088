"""A minimal strict DER reader: just enough to walk Intel's SGX certificate extension.

cryptography hands us the extension as raw bytes (UnrecognizedExtension) and has no public generic DER
decoder; the extension is a short, fixed tree of SEQUENCE / OID / INTEGER / OCTET STRING / ENUMERATED /
BOOLEAN, so a 60-line reader that rejects indefinite lengths, non-minimal lengths and trailing bytes is
smaller, faster and stricter than pulling in a general ASN.1 library.
"""

from __future__ import annotations

from functools import lru_cache

from ..errors import ParseError

TAG_BOOLEAN = 0x01
TAG_INTEGER = 0x02
TAG_OCTET_STRING = 0x04
TAG_OID = 0x06
TAG_ENUMERATED = 0x0A
TAG_SEQUENCE = 0x30


def read_tlv(data: bytes, pos: int, limit: int | None = None) -> tuple[int, int, int]:
    """Read one TLV at pos, inside data[:limit]: (tag, content_start, content_end). Single-byte tags only."""
    if limit is None:
        limit = len(data)
    if pos + 2 > limit:
        raise ParseError("DER: truncated TLV header")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ParseError("DER: multi-byte tags are not expected here")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise ParseError("DER: indefinite or oversized length")
        if pos + count > limit:
            raise ParseError("DER: truncated length")
        length = int.from_bytes(data[pos : pos + count], "big")
        if length < 0x80 or data[pos] == 0:
            raise ParseError("DER: non-minimal length encoding")
        pos += count
    end = pos + length
    if end > limit:
        raise ParseError("DER: content runs past the end of its container")
    return tag, pos, end


def children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """All TLVs exactly filling data[start:end]."""
    items = []
    pos = start
    while pos < end:
        tag, cstart, cend = read_tlv(data, pos, end)
        items.append((tag, cstart, cend))
        pos = cend
    return items


def expect(tag: int, want: int, what: str) -> None:
    if tag != want:
        raise ParseError(f"DER: {what} has tag 0x{tag:02x}, expected 0x{want:02x}")


@lru_cache(maxsize=128)
def decode_oid(content: bytes) -> str:
    if not content or content[-1] & 0x80:
        raise ParseError("DER: malformed OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    fresh = True
    for byte in content:
        if fresh and byte == 0x80:
            raise ParseError("DER: non-minimal OBJECT IDENTIFIER arc")
        value = (value << 7) | (byte & 0x7F)
        fresh = not byte & 0x80
        if fresh:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def decode_unsigned(content: bytes, what: str) -> int:
    """A non-negative INTEGER/ENUMERATED with minimal encoding."""
    if not content:
        raise ParseError(f"DER: empty {what}")
    if content[0] & 0x80:
        raise ParseError(f"DER: negative {what}")
    if len(content) > 1 and content[0] == 0 and not content[1] & 0x80:
        raise ParseError(f"DER: non-minimal {what}")
    return int.from_bytes(content, "big")
