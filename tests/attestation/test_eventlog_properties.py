"""Hypothesis properties of the CC event log parser and replay: round trips through an independent writer,
every flip of a replayed byte (digest or MR index) is caught, and only typed errors ever come out."""

from __future__ import annotations

import hashlib
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.errors import ParseError
from attestation.tdx.eventlog import EV_NO_ACTION, parse_event_log, replay
from tests.attestation.test_eventlog import exercise

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EVENT_TYPES = (0x1, 0x3, 0x4, 0x5, 0x6, 0xD, 0x80000001, 0x80000003, 0x80000007, 0x8000000B, 0x12345678)

Event = tuple[int, int, bytes, bytes]  # MR index, type, SHA-384 digest, data


def build_event_log(events: list[Event], padding: bytes = b"") -> bytes:
    """A crypto-agile SHA-384 CCEL: the legacy-format Spec ID header, then TCG_PCR_EVENT2 records."""
    spec = (b"Spec ID Event03\x00" + struct.pack("<IBBBB", 0, 0, 2, 0, 2) + struct.pack("<I", 1)
            + struct.pack("<HH", 0x000C, 48) + b"\x00")
    out = struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(spec)) + spec
    for mr_index, event_type, digest, data in events:
        out += struct.pack("<IIIH", mr_index, event_type, 1, 0x000C) + digest + struct.pack("<I", len(data)) + data
    return out + padding


def reference_replay(events: list[Event]) -> list[bytes]:
    rtmrs = [bytes(48)] * 4
    for mr_index, event_type, digest, _ in events:
        if event_type != EV_NO_ACTION and 1 <= mr_index <= 4:
            rtmrs[mr_index - 1] = hashlib.sha384(rtmrs[mr_index - 1] + digest).digest()
    return rtmrs


events_strategy = st.lists(st.tuples(st.integers(0, 4), st.sampled_from(EVENT_TYPES), st.binary(min_size=48, max_size=48),
                                     st.binary(max_size=64)), max_size=12)


@PROPERTY_SETTINGS
@given(events=events_strategy, pad=st.integers(0, 300), fill=st.sampled_from([b"\x00", b"\xff"]))
def test_round_trip_through_an_independent_writer(events, pad, fill):
    raw = build_event_log(events)
    log = parse_event_log(raw, allow_padding=False)
    assert [(e.mr_index, e.event_type, e.digest, e.data) for e in log.events] == events
    assert log.length == len(raw) and list(replay(log)) == reference_replay(events)
    padded = parse_event_log(raw + fill * pad)
    assert padded.events == log.events and padded.length == len(raw)
    if pad:  # refused when padding is not expected
        try:
            parse_event_log(raw + fill * pad, allow_padding=False)
            raise AssertionError("padding accepted without allow_padding")
        except ParseError:
            pass


def _replayed_byte_offsets(events: list[Event]) -> list[int]:
    """Offsets of the bytes the replay depends on: MR index and digest of every extending event."""
    offsets, at = [], len(build_event_log([]))
    for mr_index, event_type, digest, data in events:
        if event_type != EV_NO_ACTION and 1 <= mr_index <= 4:
            offsets += list(range(at, at + 4)) + list(range(at + 14, at + 14 + 48))
        at += 14 + 48 + 4 + len(data)
    return offsets


@PROPERTY_SETTINGS
@given(events=events_strategy.filter(lambda ev: any(t != EV_NO_ACTION and 1 <= m <= 4 for m, t, _, _ in ev)),
       pick=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_every_flip_of_a_replayed_byte_is_caught(events, pick, bit):
    raw = bytearray(build_event_log(events))
    offsets = _replayed_byte_offsets(events)
    raw[offsets[pick % len(offsets)]] ^= 1 << bit
    try:
        flipped = parse_event_log(bytes(raw), allow_padding=False)
    except ParseError:
        return  # e.g. an MR index flipped out of range
    assert list(replay(flipped)) != reference_replay(events)


@PROPERTY_SETTINGS
@given(events=events_strategy, cut=st.integers(0, 2000), junk=st.binary(max_size=64))
def test_damaged_logs_raise_only_typed_errors(events, cut, junk):
    raw = build_event_log(events)
    for candidate in (raw[:cut], raw + junk, raw[:cut] + junk + raw[cut:]):
        exercise(candidate)
