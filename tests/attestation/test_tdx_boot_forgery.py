"""Forged CC event logs against boot-event pins, as a host (or a TD it booted its own way) would write them.

The replay binds only each event's digest and RTMR; the type and data of every event, and the order of
events across RTMRs, are the writer's choice.  A TD booted with the pinned kernel and initrd but another
command line (``rdinit=`` or arguments after ``--`` run code of the host's choosing) can have digests of its
choice extended (RTMR0 carries host-chosen configuration; a TD running such code can extend RTMR2/RTMR3 at
run time) and relabel its events.  Each forgery below replays by construction (the appraisal sees the
boot state of a log that matched the quote's RTMRs) and must still be refused.
"""

from __future__ import annotations

import hashlib
import struct

import pytest

from attestation.appraise import appraise
from attestation.errors import BootStateError
from attestation.policy import policy_from_yaml
from attestation.tdx.eventlog import (EV_EFI_ACTION, EV_EFI_BOOT_SERVICES_APPLICATION, EV_EVENT_TAG, EV_IPL,
                                      EV_SEPARATOR, LINUX_INITRD_TAG, LINUX_LOAD_OPTIONS_TAG, boot_state,
                                      cmdline_digests, parse_event_log)
from attestation.verdict import VerifiedEvidence
from tests.attestation.test_eventlog_properties import build_event_log

KERNEL = hashlib.sha384(b"the pinned kernel's Authenticode").digest()
INITRD = hashlib.sha384(b"the pinned initrd").digest()
CMDLINE = "console=ttyS0 cube.data=/dev/vda initrd=initrd"
EVIL_CMDLINE = "console=ttyS0 cube.data=/dev/vda rdinit=/usr/bin/python3.11 initrd=initrd -- -c exec(input())"
MRTD = "11" * 48
RTMR0, RTMR1, RTMR2, RTMR3 = 1, 2, 3, 4  # CC MR indices
SEP = (EV_SEPARATOR, hashlib.sha384(bytes(4)).digest(), bytes(4))


def _tag(tag: int, text: bytes) -> bytes:
    return struct.pack("<II", tag, len(text)) + text


def _action(text: bytes) -> tuple[int, bytes, bytes]:
    return EV_EFI_ACTION, hashlib.sha384(text).digest(), text


def _utf16(text: str) -> bytes:
    return text.encode("utf-16-le") + b"\x00\x00"


def _load_options(cmdline: str) -> tuple[int, bytes, bytes]:
    return EV_EVENT_TAG, cmdline_digests(cmdline)["efi_stub"], _tag(LINUX_LOAD_OPTIONS_TAG, b"LOADED_IMAGE::LoadOptions\x00")


def _log(events: list[tuple[int, tuple[int, bytes, bytes]]]) -> bytes:
    return build_event_log([(mr, t, d, data) for mr, (t, d, data) in events])


def _genuine(cmdline: str = CMDLINE) -> list[tuple[int, tuple[int, bytes, bytes]]]:
    """A direct boot as TDVF and the Linux EFI stub log it."""
    return [
        (RTMR0, SEP),
        (RTMR1, _action(b"Calling EFI Application from Boot Option")),
        (RTMR1, SEP),
        (RTMR1, (EV_EFI_BOOT_SERVICES_APPLICATION, KERNEL, bytes(32))),
        (RTMR2, _load_options(cmdline)),
        (RTMR2, (EV_EVENT_TAG, INITRD, _tag(LINUX_INITRD_TAG, b"Linux initrd\x00"))),
        (RTMR1, _action(b"Exit Boot Services Invocation")),
        (RTMR1, _action(b"Exit Boot Services Returned with Success")),
    ]


POLICY = policy_from_yaml(f"""
platforms: [tdx]
tdx:
  require_collateral: false
  require_sept_ve_disable: false
  measurements:
    - mrtd: "{MRTD}"
      boot:
        kernel: "{KERNEL.hex()}"
        initrd: "{INITRD.hex()}"
        cmdline: "{CMDLINE}"
        efi_applications: []
        other_events: []
""")


def _appraise(raw: bytes):
    """The appraisal of a log whose replay matched the quote (so only its boot state is left to judge)."""
    try:
        state = boot_state(parse_event_log(raw, allow_padding=False))
    except BootStateError as exc:
        return None, str(exc)
    claims = {"mrtd": MRTD, "td_attributes": "0000000000000000", "mrservicetd": "00" * 48, "eventlog": [],
              "boot_state": state}
    verdict = appraise(VerifiedEvidence("tdx", None, claims), POLICY)
    return verdict, verdict.error


def test_the_genuine_direct_boot_passes_and_another_command_line_does_not():
    verdict, error = _appraise(_log(_genuine()))
    assert verdict is not None and verdict.ok, error
    verdict, error = _appraise(_log(_genuine(EVIL_CMDLINE)))
    assert verdict is not None and not verdict.ok and "command line" in error


def _relabelled_evil_boot() -> list[tuple[int, tuple[int, bytes, bytes]]]:
    """The evil command line's event relabelled as an action whose data is its digest's preimage."""
    events = _genuine(EVIL_CMDLINE)
    at = next(i for i, (_, (t, _d, _x)) in enumerate(events) if t == EV_EVENT_TAG)
    events[at] = (RTMR2, (EV_EFI_ACTION, cmdline_digests(EVIL_CMDLINE)["efi_stub"], _utf16(EVIL_CMDLINE)))
    return events


@pytest.mark.parametrize("where, reason", [
    (RTMR0, "the event log records no kernel command line"),
    (RTMR3, "the event log records no kernel command line"),
    (RTMR2, "event 5 (RTMR2, EV_EFI_ACTION) has a digest its data does not explain"),
], ids=["rtmr0-host-config", "rtmr3-runtime", "rtmr2-runtime"])
def test_a_pinned_command_line_event_beside_a_relabelled_real_one_is_refused(where, reason):
    """The host's command line was measured in RTMR2; its event is relabelled (data = the UTF-16 text, so it
    hashes to its digest) and the pinned command line's digest, extended elsewhere, is logged as LoadOptions."""
    forged = _relabelled_evil_boot() + [(where, _load_options(CMDLINE))]
    verdict, error = _appraise(_log(forged))
    assert verdict is not None and not verdict.ok, "a forged command line passed the boot pins"
    assert reason in error


def test_a_second_command_line_event_is_refused():
    """An appended LoadOptions event with the pinned digest after the real (other) one: not 'the last one wins'."""
    forged = _genuine(EVIL_CMDLINE) + [(RTMR2, _load_options(CMDLINE))]
    verdict, error = _appraise(_log(forged))
    assert verdict is None and "command line" in error


def test_a_second_initrd_event_is_refused():
    evil_initrd = hashlib.sha384(b"the host's initrd").digest()
    events = _genuine()
    events[5] = (RTMR2, (EV_EVENT_TAG, evil_initrd, _tag(LINUX_INITRD_TAG, b"Linux initrd\x00")))
    forged = events + [(RTMR2, (EV_EVENT_TAG, INITRD, _tag(LINUX_INITRD_TAG, b"Linux initrd\x00")))]
    verdict, error = _appraise(_log(forged))
    assert verdict is None and "initrd" in error


def test_a_small_efi_application_relabelled_with_its_preimage_is_refused():
    """A small EFI application of the host's (its Authenticode preimage fits in the log) relabelled as an
    action with that preimage as data, the pinned kernel's digest extended after it."""
    preimage = b"MZ\x90\x00\x03\x00\x00\x00" + bytes(56) + b"PE\x00\x00" + b"\xcc" * 4000
    events = _genuine()
    events.insert(3, (RTMR1, (EV_EFI_ACTION, hashlib.sha384(preimage).digest(), preimage)))
    verdict, error = _appraise(_log(events))
    assert verdict is not None and not verdict.ok and "event 4 (RTMR1, EV_EFI_ACTION)" in error


def test_a_binary_relabelled_as_a_grub_command_is_refused():
    """GRUB text events are explained by the SHA-384 of their text: binary 'text' explains nothing."""
    preimage = b"MZ\x90\x00\x03\x00\x00\x00" + bytes(56) + b"PE\x00\x00" + b"\xcc" * 4000
    events = _genuine()
    events.insert(4, (RTMR2, (EV_IPL, hashlib.sha384(preimage).digest(), b"grub_cmd: " + preimage + b"\x00")))
    verdict, error = _appraise(_log(events))
    assert verdict is not None and not verdict.ok and "event 5 (RTMR2, EV_IPL)" in error


def test_the_kernel_is_taken_only_from_rtmr1():
    """An EFI application event in RTMR0 (host-chosen configuration) is not the kernel."""
    events = _genuine()
    evil = hashlib.sha384(b"the host's kernel").digest()
    events[3] = (RTMR1, (EV_EFI_BOOT_SERVICES_APPLICATION, evil, bytes(32)))
    forged = events + [(RTMR0, (EV_EFI_BOOT_SERVICES_APPLICATION, KERNEL, bytes(32)))]
    verdict, error = _appraise(_log(forged))
    assert verdict is not None and not verdict.ok and "kernel" in error


def test_a_grub_command_line_relabelled_as_an_efi_action_in_rtmr2_is_refused():
    """GRUB's command line digest is SHA-384 of ASCII text: in RTMR2 an EFI action (a firmware record, RTMR0/1
    only) explains nothing, so the host's command line cannot hide as one beside an appended pinned one."""
    evil = b"/vmlinuz rdinit=/usr/bin/python3.11 -- -c exec(input())"
    events = _genuine()
    events.insert(4, (RTMR2, _action(evil)))
    verdict, error = _appraise(_log(events))
    assert verdict is not None and not verdict.ok and "event 5 (RTMR2, EV_EFI_ACTION)" in error
    # the same record in RTMR1, where the firmware writes its actions, is explained
    events[4] = (RTMR1, _action(b"Exit Boot Services Invocation"))
    verdict, error = _appraise(_log(events))
    assert verdict is not None and verdict.ok, error


def test_an_efi_application_after_the_kernel_is_refused():
    """Direct boot: the kernel is the last EFI application, so one appended after the pinned kernel (a second
    kernel load) becomes 'the kernel' and is not the pinned one; listing it would not make it the kernel."""
    events = _genuine()
    second = hashlib.sha384(b"a second kernel").digest()
    events.insert(4, (RTMR1, (EV_EFI_BOOT_SERVICES_APPLICATION, second, bytes(32))))
    verdict, error = _appraise(_log(events))
    assert verdict is not None and not verdict.ok and f"kernel {second.hex()} is not the pinned one" in error
