"""appraise() on hand-made VerifiedEvidence: rules that the vectors cannot reach."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from attestation.appraise import appraise, snp_tcb_components
from attestation.policy import DEFAULT_POLICY, policy_from_yaml
from attestation.verdict import Check, VerifiedEvidence

NOW = datetime(2026, 2, 3, tzinfo=timezone.utc)


def snp(**claims) -> VerifiedEvidence:
    base = {"policy": "0x30000", "vmpl": 0, "guest_svn": 1, "signing_key": "VCEK", "measurement": "aa" * 48,
            "reported_tcb": "0x5100000004010101", "host_data": "00" * 32, "report_data": "11" * 64}
    base.update(claims)
    return VerifiedEvidence(platform="snp", product="Turin", claims=base, checks=[Check("report_signature", True, "")])


def tdx(status=None, issued=None, **claims) -> VerifiedEvidence:
    base = {"td_attributes": "0000001000000000", "mrtd": "bb" * 48, "tee_tcb_svn": "0b010400000000000000000000000000",
            "pcesvn": 13, "qe_isvsvn": 7, "mrconfigid": "00" * 48, "mrowner": "00" * 48, "report_data": "22" * 64}
    for i in range(4):
        base[f"rtmr{i}"] = f"{i:02x}" * 48
    base.update(claims)
    return VerifiedEvidence(platform="tdx", product=None, claims=base, tcb_status=status,
                            collateral_issued_at=issued, advisory_ids=["INTEL-SA-00837"] if status else [])


def failed(verdict) -> set[str]:
    return {c.name for c in verdict.checks if not c.ok}


def test_turin_tcb_layout():
    assert snp_tcb_components(0x5100000004010101, "Turin") == {"fmc": 1, "bootloader": 1, "tee": 1, "snp": 4, "microcode": 0x51}
    assert snp_tcb_components(0x7308000000000003, "Milan") == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 0x73}
    ok = appraise(snp(), policy_from_yaml("snp: {allow_smt: true, min_tcb: {fmc: 1, snp: 4, microcode: 81}}"))
    assert ok.ok, ok.error
    low = appraise(snp(), policy_from_yaml("snp: {allow_smt: true, min_tcb: {fmc: 2}}"))
    assert failed(low) == {"min_tcb"} and "fmc 1 < 2" in low.error
    milan = VerifiedEvidence("snp", "Milan", snp().claims | {"reported_tcb": "0x7308000000000003"})
    no_fmc = appraise(milan, policy_from_yaml("snp: {allow_smt: true, min_tcb: {fmc: 0}}"))
    assert failed(no_fmc) == {"min_tcb"} and "not in this product" in no_fmc.error


def test_migration_agent_and_debug_bits():
    v = snp(policy=hex(0x30000 | (1 << 18)))
    assert failed(appraise(v, policy_from_yaml("snp: {allow_smt: true}"))) == {"migrate_ma"}
    assert appraise(v, DEFAULT_POLICY).ok
    dbg = snp(policy=hex(0x30000 | (1 << 19)))
    assert failed(appraise(dbg, DEFAULT_POLICY)) == {"debug_disabled"}
    assert failed(appraise(snp(policy=None), DEFAULT_POLICY)) == {"guest_policy"}


def test_verification_checks_come_first_and_status_words():
    verdict = appraise(snp(), DEFAULT_POLICY)
    assert verdict.checks[0].name == "report_signature"
    assert verdict.ok and verdict.status == "verified" and verdict.error is None
    refused = appraise(snp(vmpl=2), policy_from_yaml("snp: {allow_smt: true, vmpl: 0}"))
    assert not refused.ok and refused.status == "refused" and "vmpl" in refused.error


def test_tdx_status_rules():
    assert appraise(tdx("UpToDate"), DEFAULT_POLICY).status == "UpToDate"
    out = appraise(tdx("OutOfDate"), DEFAULT_POLICY)
    assert not out.ok and out.status == "OutOfDate" and failed(out) == {"tcb_status"}
    assert "INTEL-SA-00837" in out.error
    allowed = appraise(tdx("SWHardeningNeeded"), policy_from_yaml("accepted_tcb_statuses: [UpToDate, SWHardeningNeeded]"))
    assert allowed.ok and allowed.status == "SWHardeningNeeded"


def test_collateral_age():
    policy = policy_from_yaml("max_collateral_age_days: 30")
    assert appraise(tdx("UpToDate", issued=NOW - timedelta(days=29)), policy, at=NOW).ok
    old = appraise(tdx("UpToDate", issued=NOW - timedelta(days=31)), policy, at=NOW)
    assert failed(old) == {"collateral_age"}
    bare = policy_from_yaml("max_collateral_age_days: 30\ntdx: {require_collateral: false}")
    assert appraise(tdx(), bare, at=NOW).ok  # no collateral (allowed): nothing to age
    assert failed(appraise(tdx(), policy, at=NOW)) == {"collateral_present"}  # required by default


def test_tdx_measurement_entries_and_svns():
    v = tdx("UpToDate")
    entry = {"mrtd": "bb" * 48, "rtmr1": "01" * 48}
    ok = policy_from_yaml({"tdx": {"measurements": [entry]}}.__repr__().replace("'", '"'))
    assert appraise(v, ok).ok
    for bad, name in [({"mrtd": "cc" * 48}, "measurement"), ({"mrtd": "bb" * 48, "rtmr3": "ff" * 48}, "measurement")]:
        p = policy_from_yaml(str({"tdx": {"measurements": [bad]}}).replace("'", '"'))
        assert failed(appraise(v, p)) == {name}
    svn = policy_from_yaml("tdx: {min_pcesvn: 14, min_qe_isvsvn: 8, mrowner: '%s'}" % ("01" * 48))
    assert failed(appraise(v, svn)) == {"min_pcesvn", "min_qe_isvsvn", "mrowner"}
    assert failed(appraise(tdx(td_attributes="bad"), DEFAULT_POLICY)) == {"td_attributes"}


def test_report_data_from_policy_and_caller():
    v = snp()
    both = policy_from_yaml("report_data: '%s'\nsnp: {allow_smt: true}" % ("11" * 64))
    assert appraise(v, both, expected_report_data=bytes.fromhex("11" * 64)).ok
    verdict = appraise(v, both, expected_report_data=bytes(64))
    assert failed(verdict) == {"report_data"}
    assert "caller" in verdict.error
