"""TDX evidence carrying the CC event log: the provider attaches it, the verifier replays it against the
quote's RTMRs (a mismatch is refused), and policies pin boot events (kernel, initrd, command line) instead
of raw RTMR values.  Real data: the COS 113 quote and its CCEL (GRUB boot, no initrd)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from attestation.appraise import appraise
from attestation.errors import EvidenceError, PolicyError, ProviderError
from attestation.evidence import TDX_CCEL_FILE, Evidence, decode_cmw, encode_cmw
from attestation.policy import policy_from_yaml
from attestation.providers import ConfigfsTsmProvider
from attestation.tdx.eventlog import boot_state, parse_event_log, replay
from attestation.tdx.verify import verify_quote
from attestation.verifier import _replay_event_log, verify_evidence
from tests.attestation.test_cli import run
from tests.attestation.test_eventlog import COS_LOG, COS_QUOTE, DUPE_UNPADDED, _flip_first_digest_byte
from tests.attestation.test_providers import FakeTsmKernel

COS_KERNEL = "b1012372f421ad28c9f542e5a1b8c4d312a0d1c8637ffba5e52b632d4b632e504da1b73964f6e8ba047bcd4f1d5a1dfe"


@pytest.fixture(scope="module")
def cos(vectors_dir: Path) -> dict:
    quote = (vectors_dir / COS_QUOTE).read_bytes()
    raw_log = (vectors_dir / COS_LOG).read_bytes()
    log = parse_event_log(raw_log)
    state = boot_state(log)
    claims = verify_quote(quote).claims
    return {"quote": quote, "log": raw_log[:log.length], "padded_log": raw_log, "state": state,
            "mrtd": claims["mrtd"], "claims": claims}


def _policy(cos: dict, **boot: str) -> str:
    state = cos["state"]
    fields = {"kernel": f"'{state['kernel']['digest']}'", "initrd": "null",
              "cmdline": "'" + state["cmdline"]["value"].replace("'", "''") + "'",
              "efi_applications": "[" + ", ".join(f"'{a['digest']}'" for a in state["efi_applications"]) + "]",
              "other_events": "[" + ", ".join(f"'{e['digest']}'" for e in _unexplained(state)) + "]"}
    fields.update(boot)
    lines = "".join(f"        {k}: {v}\n" for k, v in fields.items() if v != "OMIT")
    return ("platforms: [tdx]\n"
            "tdx:\n"
            "  require_collateral: false\n"
            "  require_sept_ve_disable: false\n"
            "  allow_service_td: true\n"
            "  measurements:\n"
            f"    - mrtd: '{cos['mrtd']}'\n"
            "      boot:\n" + lines)


def _unexplained(state: dict) -> list[dict]:
    """COS's opaque RTMR1/RTMR2 events that are not the kernel or an EFI application: MokList*, grub.cfg."""
    known = {state["kernel"]["digest"], *(a["digest"] for a in state["efi_applications"])}
    return [e for e in state["opaque_events"] if e["digest"] not in known]


def _evidence(cos: dict, log: bytes | None) -> Evidence:
    return Evidence(platform="tdx", report=cos["quote"], collateral={TDX_CCEL_FILE: log} if log is not None else {})


def test_cos_boot_state_is_what_grub_measured(cos):
    state = cos["state"]
    assert state["kernel"] == {"path": "/syslinux/vmlinuz.A", "digest": COS_KERNEL, "source": "grub"}
    assert state["cmdline"]["source"] == "grub"
    # GRUB extends SHA-384 of the text: the text is reported because it hashes to the replayed digest
    assert hashlib.sha384(state["cmdline"]["value"].encode()).hexdigest() == state["cmdline"]["digest"]
    assert [a["path"] for a in state["efi_applications"]] == ["\\EFI\\BOOT\\BOOTX64.EFI", "\\EFI\\BOOT\\grub-lakitu.efi"]


def test_evidence_with_the_ccel_replays_and_carries_the_events(cos):
    verdict = verify_evidence(_evidence(cos, cos["log"]), policy=policy_from_yaml(_policy(cos)))
    assert verdict.ok, verdict.error
    replay_check = next(c for c in verdict.checks if c.name == "eventlog_replay")
    assert replay_check.ok and "43" in replay_check.detail
    assert len(verdict.claims["eventlog"]) == 43
    assert verdict.claims["boot_state"]["kernel"]["digest"] == COS_KERNEL
    measurement = next(c for c in verdict.checks if c.name == "measurement")
    assert measurement.ok and "boot events" in measurement.detail


def test_the_ccel_survives_the_wire_forms(cos):
    evidence = decode_cmw(encode_cmw(_evidence(cos, cos["log"])))
    assert evidence.collateral[TDX_CCEL_FILE] == cos["log"]
    assert verify_evidence(evidence, policy=policy_from_yaml(_policy(cos))).ok


@pytest.mark.parametrize("mr_index, name", [(1, "RTMR0"), (2, "RTMR1"), (3, "RTMR2")])
def test_a_log_that_does_not_replay_is_invalid(cos, mr_index, name):
    damaged = _flip_first_digest_byte(cos["log"], mr_index)
    verdict = verify_evidence(_evidence(cos, damaged), policy=policy_from_yaml(_policy(cos)))
    assert not verdict.ok and verdict.status == "invalid"
    failed = next(c for c in verdict.checks if c.name == "eventlog_replay")
    assert not failed.ok and name in failed.detail and name in (verdict.error or "")
    # ... whatever the policy: a log is checked whenever the evidence carries one
    assert not verify_evidence(_evidence(cos, damaged)).ok


def test_every_single_byte_flip_of_an_event_digest_is_caught(cos):
    log = parse_event_log(cos["log"])
    rtmrs = replay(log)
    for event in log.events:
        if event.rtmr is None:
            continue
        at = cos["log"].index(event.digest)
        for offset in range(len(event.digest)):
            data = bytearray(cos["log"])
            data[at + offset] ^= 0x80
            assert replay(parse_event_log(bytes(data))) != rtmrs, (event.number, offset)


def test_a_malformed_log_is_malformed_evidence(cos):
    verdict = verify_evidence(_evidence(cos, b"\x01\x00\x00\x00" * 10))
    assert verdict.status == "malformed" and not verdict.ok


def test_boot_pins_require_a_ccel(cos):
    verdict = verify_evidence(_evidence(cos, None), policy=policy_from_yaml(_policy(cos)))
    assert not verdict.ok and "carries no CC event log" in (verdict.error or "")


@pytest.mark.parametrize("override, reason", [
    ({"kernel": "'" + "11" * 48 + "'"}, "kernel"),
    ({"initrd": "'" + "22" * 48 + "'"}, "records no initrd"),
    ({"cmdline": "'console=ttyS0'"}, "command line"),
    ({"efi_applications": "[]"}, "EFI application \\EFI\\BOOT\\BOOTX64.EFI ran"),
])
def test_each_boot_pin_is_enforced(cos, override, reason):
    verdict = verify_evidence(_evidence(cos, cos["log"]), policy=policy_from_yaml(_policy(cos, **override)))
    assert not verdict.ok
    failed = next(c for c in verdict.checks if c.name == "measurement")
    assert not failed.ok and reason in failed.detail


def test_cmdline_may_be_pinned_by_digest(cos):
    digest = cos["state"]["cmdline"]["digest"]
    good = policy_from_yaml(_policy(cos, cmdline="OMIT", cmdline_sha384=f"'{digest}'"))
    assert verify_evidence(_evidence(cos, cos["log"]), policy=good).ok
    bad = policy_from_yaml(_policy(cos, cmdline="OMIT", cmdline_sha384="'" + "33" * 48 + "'"))
    assert not verify_evidence(_evidence(cos, cos["log"]), policy=bad).ok


def test_a_boot_pinned_entry_counts_as_measured(cos):
    policy = policy_from_yaml(_policy(cos))
    assert policy.measurement_gaps() == {} and policy.is_measured("tdx")
    mrtd_only = policy_from_yaml(_policy(cos).split("      boot:")[0])
    assert "RTMR0-2" in mrtd_only.measurement_gaps()["tdx"]


@pytest.mark.parametrize("override, message", [
    ({"cmdline_sha384": "'" + "44" * 48 + "'"}, "exactly one"),
    ({"cmdline": "OMIT"}, "exactly one"),
    ({"initrd": "OMIT"}, "initrd: required"),
    ({"kernel": "'abc'"}, "kernel: must be 96 hex digits"),
    ({"surprise": "1"}, "unknown key"),
])
def test_boot_pins_are_validated(cos, override, message):
    with pytest.raises(PolicyError, match=message):
        policy_from_yaml(_policy(cos, **override))


def test_a_duplicate_separator_log_gives_no_boot_state_to_pin(cos, vectors_dir):
    """Replayed against RTMRs that match it, the buggy log still yields no boot state: refused."""
    raw = (vectors_dir / DUPE_UNPADDED).read_bytes()
    verified = verify_quote(cos["quote"])
    for i, value in enumerate(replay(parse_event_log(raw))):
        verified.claims[f"rtmr{i}"] = value.hex()
    _replay_event_log(verified, raw)
    assert verified.claims["boot_state"] is None and "duplicate separator" in verified.claims["boot_state_error"]
    verdict = appraise(verified, policy_from_yaml(_policy(cos)))
    assert not verdict.ok and "no trustworthy boot state" in (verdict.error or "")


def test_snp_evidence_cannot_carry_a_ccel(cos):
    with pytest.raises(EvidenceError, match="collateral"):
        Evidence(platform="snp", report=b"x" * 1184, collateral={TDX_CCEL_FILE: cos["log"]})


def test_provider_attaches_the_ccel_without_its_padding(cos, tmp_path):
    ccel = tmp_path / "CCEL"
    ccel.write_bytes(cos["padded_log"])
    kernel = FakeTsmKernel(tmp_path / "report", tdx_quote=cos["quote"])
    evidence = ConfigfsTsmProvider(kernel.root, fs=kernel, ccel_path=ccel).get_evidence(bytes(64))
    assert evidence.collateral[TDX_CCEL_FILE] == cos["log"] and len(cos["log"]) < len(cos["padded_log"])
    assert verify_evidence(evidence, policy=policy_from_yaml(_policy(cos))).ok
    # no CCEL table on this TD, or none wanted: the evidence carries none
    for path in (tmp_path / "absent", None):
        bare = ConfigfsTsmProvider(kernel.root, fs=kernel, ccel_path=path).get_evidence(bytes(64))
        assert TDX_CCEL_FILE not in bare.collateral
    ccel.write_bytes(b"\x07" * 64)
    with pytest.raises(ProviderError, match="CC event log"):
        ConfigfsTsmProvider(kernel.root, fs=kernel, ccel_path=ccel).get_evidence(bytes(64))


def test_cli_appraises_boot_pins(capsys, cos, vectors_dir, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(_policy(cos))
    quote, log = str(vectors_dir / COS_QUOTE), str(vectors_dir / COS_LOG)
    code, doc = run(capsys, "verify-quote", quote, "--eventlog", log, "--policy", str(policy), "--json")
    assert code == 0 and doc["ok"], doc["error"]
    assert doc["claims"]["boot_state"]["kernel"]["digest"] == COS_KERNEL
    code, doc = run(capsys, "verify-quote", quote, "--policy", str(policy), "--json")
    assert code == 1 and "carries no CC event log" in doc["error"]
    policy.write_text(_policy(cos, kernel="'" + "55" * 48 + "'"))
    code, doc = run(capsys, "verify-quote", quote, "--eventlog", log, "--policy", str(policy), "--json")
    assert code == 1 and "kernel" in doc["error"]


def test_cos_opaque_events_are_the_ones_grub_and_shim_load(cos):
    assert [e["index"] for e in _unexplained(cos["state"])] == [19, 20, 23, 25]  # MokList, MokListX, ..Trusted, grub.cfg
    verdict = verify_evidence(_evidence(cos, cos["log"]), policy=policy_from_yaml(_policy(cos, other_events="[]")))
    assert not verdict.ok and "event 19 (RTMR2" in (verdict.error or "") and "+3 more" in (verdict.error or "")


def test_a_relabelled_application_event_still_replays_but_is_refused(cos):
    """Event types and data are not covered by the replay: relabelling GRUB's EFI application event as an
    EV_EFI_ACTION hides it from efi_applications, but its digest is then unexplained."""
    log = parse_event_log(cos["log"])
    grub = next(e for e in log.events if e.number == 24)
    at = cos["log"].index(grub.digest) - 10  # the type: before the digest count u32 and algorithm u16
    assert cos["log"][at:at + 4] == (0x80000003).to_bytes(4, "little")
    relabelled = cos["log"][:at] + (0x80000007).to_bytes(4, "little") + cos["log"][at + 4:]
    shim_only = "['" + cos["state"]["efi_applications"][0]["digest"] + "']"
    verdict = verify_evidence(_evidence(cos, relabelled), policy=policy_from_yaml(_policy(cos, efi_applications=shim_only)))
    assert next(c for c in verdict.checks if c.name == "eventlog_replay").ok
    assert verdict.claims["boot_state"]["efi_applications"][1:] == []
    assert not verdict.ok and "event 24 (RTMR1, EV_EFI_ACTION)" in (verdict.error or "")
