"""TDX CC event log: parsing (padded and not), replay to the quote's RTMRs, boot state, CLI, robustness."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.errors import BootStateError, ParseError
from attestation.tdx.eventlog import (EV_NO_ACTION, EV_SEPARATOR, boot_state, parse_event_log, replay,
                                      replay_mismatches)
from attestation.tdx.quote import parse_quote
from tests.attestation.test_cli import run

COS_LOG = "tdx/eventlog/go-eventlog--cos-113-intel-tdx.bin"
COS_QUOTE = "tdx/go-tdx-guest--cos-113-tdx-quote.dat"
DUPE_PADDED = "tdx/eventlog/go-eventlog--cos-113-intel-tdx-dupe-separator.bin"
DUPE_UNPADDED = "tdx/eventlog/go-eventlog--cos-113-intel-tdx-dupe-separator-unpadded.bin"
LOG_SETTINGS = settings(max_examples=300, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _log_bytes(vectors_dir: Path, rel: str) -> bytes:
    return (vectors_dir / rel).read_bytes()


def _quote_rtmrs(vectors_dir: Path) -> tuple[bytes, bytes, bytes, bytes]:
    body = parse_quote((vectors_dir / COS_QUOTE).read_bytes()).body
    return body.rtmr0, body.rtmr1, body.rtmr2, body.rtmr3


def _flip_first_digest_byte(raw: bytes, mr_index: int) -> bytes:
    """The log with one byte of the first extending event of ``mr_index`` flipped (found by parsing)."""
    log = parse_event_log(raw)
    event = next(e for e in log.events if e.mr_index == mr_index and e.event_type != EV_NO_ACTION)
    at = raw.index(event.digest)
    return raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1:]


def test_every_vector_replays_to_its_expected_values(vectors_dir, expected):
    entries = expected["eventlog"]
    assert len(entries) >= 3
    for entry in entries:
        rtmrs = replay(parse_event_log(_log_bytes(vectors_dir, entry["log"])))
        want = entry["replays_to"]
        for i, value in enumerate(rtmrs):
            assert value.hex() == want.get(f"rtmr{i}", "00" * 48), (entry["log"], i)


def test_cos_log_replays_to_its_quote(vectors_dir):
    log = parse_event_log(_log_bytes(vectors_dir, COS_LOG))
    assert replay_mismatches(log, _quote_rtmrs(vectors_dir)) == []
    assert log.digest_sizes == {0x000C: 48}
    assert {e.rtmr for e in log.events} == {0, 1, 2}  # RTMR3 stays zero
    other = parse_event_log(_log_bytes(vectors_dir, DUPE_PADDED))
    assert replay_mismatches(other, _quote_rtmrs(vectors_dir)) == ["rtmr0", "rtmr1"]


def test_padded_and_unpadded_parse_to_the_same_events(vectors_dir):
    padded_raw = _log_bytes(vectors_dir, DUPE_PADDED)
    unpadded_raw = _log_bytes(vectors_dir, DUPE_UNPADDED)
    assert len(padded_raw) > len(unpadded_raw)
    padded = parse_event_log(padded_raw)
    unpadded = parse_event_log(unpadded_raw)
    assert padded.events == unpadded.events and len(padded.events) > 10
    assert unpadded.length == len(unpadded_raw)
    assert parse_event_log(unpadded_raw, allow_padding=False).events == unpadded.events
    with pytest.raises(ParseError, match="padding"):
        parse_event_log(padded_raw, allow_padding=False)
    zero_padded = unpadded_raw + bytes(4096)
    assert parse_event_log(zero_padded).events == unpadded.events


@pytest.mark.parametrize("tail", [b"\x00" * 64 + b"\x01", b"\xff" * 8 + b"\x00" * 8, b"\x00" * 7 + b"\x01"])
def test_padding_must_be_uniform_filler(vectors_dir, tail):
    raw = _log_bytes(vectors_dir, DUPE_UNPADDED) + tail
    with pytest.raises(ParseError):
        parse_event_log(raw)


def test_malformed_logs_raise_parse_error(vectors_dir):
    raw = _log_bytes(vectors_dir, DUPE_UNPADDED)
    for bad in (b"", raw[:20], raw[:-5], b"\x00" * 64, b"\x01\x00\x00\x00\x04" + raw[5:]):
        with pytest.raises(ParseError):
            parse_event_log(bad)
    # An event naming MR index 5 (there are only RTMR0..3 = 1..4).
    log = parse_event_log(raw)
    first = raw.index(log.events[0].digest) - 14  # MR index u32, type u32, count u32, alg id u16
    assert struct.unpack_from("<I", raw, first)[0] == log.events[0].mr_index
    with pytest.raises(ParseError, match="MR index 5"):
        parse_event_log(raw[:first] + struct.pack("<I", 5) + raw[first + 4:])


def test_boot_state_of_the_cos_log(vectors_dir):
    state = boot_state(parse_event_log(_log_bytes(vectors_dir, COS_LOG)))
    assert state["kernel"]["path"] == "/syslinux/vmlinuz.A" and len(state["kernel"]["digest"]) == 96
    assert state["cmdline"]["value"].startswith("/syslinux/vmlinuz.A init=/usr/lib/systemd/systemd")
    assert state["initrd"] is None  # COS boots without one
    assert [a["path"] for a in state["efi_applications"]] == ["\\EFI\\BOOT\\BOOTX64.EFI",
                                                              "\\EFI\\BOOT\\grub-lakitu.efi"]


@pytest.mark.parametrize("rel", [DUPE_PADDED, DUPE_UNPADDED])
def test_duplicate_separator_refuses_boot_state_but_replays(vectors_dir, expected, rel):
    log = parse_event_log(_log_bytes(vectors_dir, rel))
    assert sum(e.event_type == EV_SEPARATOR and e.mr_index == 1 for e in log.events) == 2
    with pytest.raises(BootStateError, match="duplicate separator in RTMR0"):
        boot_state(log)
    entry = next(e for e in expected["eventlog"] if e["log"] == rel)
    assert replay(log)[0].hex() == entry["replays_to"]["rtmr0"]


def test_cli_verify_quote_with_eventlog(capsys, vectors_dir):
    quote = str(vectors_dir / COS_QUOTE)
    code, plain = run(capsys, "verify-quote", quote, "--json")
    code_with, doc = run(capsys, "verify-quote", quote, "--eventlog", str(vectors_dir / COS_LOG), "--json")
    assert code_with == code  # the log replays: the verdict is the quote's own
    replay_check = [c for c in doc["checks"] if c["name"] == "eventlog_replay"]
    assert replay_check and replay_check[0]["ok"]
    events = doc["claims"]["eventlog"]
    assert len(events) == 43 and {e["rtmr"] for e in events} == {0, 1, 2}
    assert set(events[0]) == {"index", "mr_index", "rtmr", "type", "digest"}
    assert events[0]["type"] == "EV_EFI_HANDOFF_TABLES2"
    assert doc["claims"]["boot_state"]["kernel"]["path"] == "/syslinux/vmlinuz.A"
    assert doc["claims"]["rtmr0"] == plain["claims"]["rtmr0"]


@pytest.mark.parametrize("mr_index, name", [(1, "RTMR0"), (3, "RTMR2")])
def test_cli_flipped_digest_is_refused_naming_the_rtmr(capsys, vectors_dir, tmp_path, mr_index, name):
    damaged = tmp_path / "ccel.bin"
    damaged.write_bytes(_flip_first_digest_byte(_log_bytes(vectors_dir, COS_LOG), mr_index))
    code, doc = run(capsys, "verify-quote", str(vectors_dir / COS_QUOTE), "--eventlog", str(damaged), "--json")
    assert code == 1 and not doc["ok"]
    failed = [c for c in doc["checks"] if c["name"] == "eventlog_replay"]
    assert failed and not failed[0]["ok"] and name in failed[0]["detail"] and name in doc["error"]
    others = {"RTMR0", "RTMR1", "RTMR2", "RTMR3"} - {name}
    assert not any(o in failed[0]["detail"] for o in others)


def test_cli_malformed_eventlog_is_an_input_error(capsys, vectors_dir, tmp_path):
    bad = tmp_path / "ccel.bin"
    bad.write_bytes(b"\x01\x00\x00\x00" * 10)
    code, doc = run(capsys, "verify-quote", str(vectors_dir / COS_QUOTE), "--eventlog", str(bad), "--json")
    assert code == 2 and doc["status"] == "input_error" and "--eventlog" in doc["error"]


@LOG_SETTINGS
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_parse_or_raise_parse_error(data):
    for candidate in (data, b"\x01\x00\x00\x00\x03\x00\x00\x00" + bytes(20) + data):
        try:
            parse_event_log(candidate)
        except ParseError:
            pass


@pytest.fixture(scope="module")
def real_log(vectors_dir) -> bytes:
    return _log_bytes(vectors_dir, DUPE_UNPADDED)


@LOG_SETTINGS
@given(edits=st.lists(st.tuples(st.integers(0, 18100), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.integers(0, 18101), padded=st.booleans())
def test_mutated_real_log_parses_or_raises_parse_error(real_log, edits, cut, padded):
    data = bytearray(real_log)
    for pos, value in edits:
        data[pos % len(data)] = value
    for candidate in (bytes(data), bytes(data[:cut]), bytes(data) + b"\xff" * 64):
        exercise(candidate, allow_padding=padded)


def exercise(candidate: bytes, *, allow_padding: bool = True) -> None:
    """Parse, replay and read the boot state of untrusted bytes: only the typed errors may come out."""
    try:
        log = parse_event_log(candidate, allow_padding=allow_padding)
    except ParseError:
        return
    replay(log)
    try:
        boot_state(log)
    except BootStateError:
        pass
