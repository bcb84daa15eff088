"""Appraisal knobs for what a measurement cannot pin (item 9), on real vectors: each passes and fails under
its own named check, and VMPL defaults to 0."""

from __future__ import annotations

import pytest

from attestation.appraise import appraise
from attestation.errors import PolicyError
from attestation.policy import DEFAULT_POLICY, policy_from_yaml
from attestation.verdict import VerifiedEvidence
from attestation.verifier import verify_evidence

MILAN = "virtee-sev--report_milan.hex"      # policy 0x30000, PLATFORM_INFO 0x1, firmware 1.52.4, VMPL 0
ID_BLOCK = "trustee--test-report.bin"       # ID block: id_key_digest 0356..., family_id 01.., image_id 02..
VLEK = "trustee--test-vlek-report.bin"      # VMPL 1, PLATFORM_INFO 0x27, LAUNCH_TCB bl 4 snp 24 ucode 219
V5 = "go-tdx-guest--quote_v5_sample.dat"    # TDATTRIBUTES 0000001000000000 (SEPT_VE_DISABLE), XFAM e702060000000000
SPR = "go-tdx-guest--tdx_prod_quote_SPR_E4.dat"  # TDATTRIBUTES 0000004000000000 (PKS), XFAM e71a060000000000


def _failed(verdict) -> set[str]:
    return {c.name for c in verdict.checks if not c.ok}


def _check(verdict, name: str):
    return next(c for c in verdict.checks if c.name == name)


def _snp(snp_vector, name: str, rules: str):
    evidence, entry, at = snp_vector(name)
    return verify_evidence(evidence, policy=policy_from_yaml("snp:\n  allow_smt: true\n" + rules), at=at), entry


def _tdx(tdx_vector, name: str, rules: str):
    evidence, entry, at = tdx_vector(name)
    # these tests are about the attribute rules: quotes without collateral are appraised on signatures alone
    policy = policy_from_yaml("tdx:\n  require_sept_ve_disable: false\n  require_collateral: false\n" + rules)
    return verify_evidence(evidence, policy=policy, at=at), entry


def test_vmpl_defaults_to_zero_so_the_aws_vmpl1_report_is_refused(snp_vector):
    evidence, entry, at = snp_vector(VLEK)
    measured = policy_from_yaml(
        f"snp:\n  allow_smt: true\n  measurements: [{{measurement: '{entry['measurement']}', kernel_hashes: true}}]\n")
    assert measured.snp.vmpl == 0 and policy_from_yaml("{}").snp.vmpl == 0
    verdict = verify_evidence(evidence, policy=measured, at=at)
    assert _failed(verdict) == {"vmpl"} and "policy requires VMPL 0" in verdict.error
    allowed = measured.model_copy(update={"snp": measured.snp.model_copy(update={"vmpl": 1})})
    assert verify_evidence(evidence, policy=allowed, at=at).ok
    # the evidence-only inspection policy says so explicitly (vmpl: null) and accepts it
    assert DEFAULT_POLICY.snp.vmpl is None and verify_evidence(evidence, at=at).ok
    assert policy_from_yaml("snp: {vmpl: null}").snp.vmpl is None


@pytest.mark.parametrize("rules, ok", [
    ("{require: [SMT]}", True), ("{forbid: [CXL_ALLOW, MIGRATE_MA, DEBUG]}", True),
    ("{forbid: [SMT]}", False), ("{require: [SINGLE_SOCKET]}", False), ("{require: [MEM_AES_256_XTS]}", False),
    ("{require: [CIPHERTEXT_HIDING_DRAM]}", False), ("{require: [PAGE_SWAP_DISABLE]}", False),
    ("{require: [RAPL_DIS]}", False),
])
def test_guest_policy_bits(snp_vector, rules, ok):
    verdict, _ = _snp(snp_vector, MILAN, f"  guest_policy: {rules}\n")
    assert verdict.ok is ok, verdict.error
    assert _failed(verdict) == (set() if ok else {"guest_policy_bits"})
    if not ok:
        assert "guest POLICY 0x30000 refused" in _check(verdict, "guest_policy_bits").detail


@pytest.mark.parametrize("rules, ok", [
    ("{require: [SMT_EN, TSME_EN, ECC_EN, ALIAS_CHECK_COMPLETE]}", True), ("{exact: 0x27}", True),
    ("{forbid: [CIPHERTEXT_HIDING_DRAM_EN, SEV_TIO_EN, RAPL_DIS]}", True),
    ("{forbid: [SMT_EN]}", False), ("{require: [CIPHERTEXT_HIDING_DRAM_EN]}", False), ("{exact: 0x25}", False),
])
def test_platform_info(snp_vector, rules, ok):
    verdict, _ = _snp(snp_vector, VLEK, f"  vmpl: 1\n  platform_info: {rules}\n")
    assert verdict.ok is ok, verdict.error
    assert _failed(verdict) == (set() if ok else {"platform_info"})


def test_platform_info_without_tsme_or_alias_check_is_refused(snp_vector):
    verdict, _ = _snp(snp_vector, MILAN, "  platform_info: {require: [TSME_EN, ALIAS_CHECK_COMPLETE]}\n")
    assert _failed(verdict) == {"platform_info"}
    assert "TSME_EN is clear" in verdict.error and "ALIAS_CHECK_COMPLETE is clear" in verdict.error


@pytest.mark.parametrize("rules, failed", [
    ("  min_launch_tcb: {bootloader: 4, snp: 24, microcode: 219}\n", set()),
    ("  min_launch_tcb: {microcode: 220}\n", {"min_launch_tcb"}),
    ("  min_launch_tcb: {snp: 25}\n", {"min_launch_tcb"}),
    ("  min_firmware: '1.55.29'\n", set()),
    ("  min_firmware: '1.55'\n", set()),
    ("  min_firmware: '1.55.30'\n", {"min_firmware"}),
    ("  min_firmware: '1.56'\n", {"min_firmware"}),
])
def test_launch_tcb_and_minimum_firmware(snp_vector, rules, failed):
    verdict, _ = _snp(snp_vector, VLEK, "  vmpl: 1\n" + rules)
    assert _failed(verdict) == failed, verdict.error


def test_old_firmware_refused(snp_vector):
    verdict, _ = _snp(snp_vector, MILAN, "  min_firmware: '1.55'\n")
    assert _failed(verdict) == {"min_firmware"}
    assert "current 1.52.4, committed 1.52.4 below" in verdict.error


def test_id_block_digests_and_ids(snp_vector, expected):
    _, entry, _ = snp_vector(ID_BLOCK)
    good = (f"  id_key_digests: ['{'00' * 48}', '{entry['id_key_digest']}']\n"
            f"  family_id: '{entry['family_id']}'\n  image_id: '{entry['image_id']}'\n")
    verdict, _ = _snp(snp_vector, ID_BLOCK, good)
    assert verdict.ok, verdict.error
    for rules, name in ((f"  id_key_digests: ['{'11' * 48}']\n", "id_key_digest"),
                        (f"  family_id: '{'01' * 16}'\n", "family_id"),
                        (f"  image_id: '{'00' * 16}'\n", "image_id")):
        assert _failed(_snp(snp_vector, ID_BLOCK, rules)[0]) == {name}
    # a report without an ID block (all-zero digest) does not pass an ID key allowlist
    assert _failed(_snp(snp_vector, MILAN, f"  id_key_digests: ['{entry['id_key_digest']}']\n")[0]) == {"id_key_digest"}


def test_author_key_requires_author_key_en(snp_vector):
    evidence, entry, at = snp_vector(ID_BLOCK)
    rules = f"snp:\n  allow_smt: true\n  author_key_digests: ['{'ab' * 48}']\n"
    verdict = verify_evidence(evidence, policy=policy_from_yaml(rules), at=at)
    assert _failed(verdict) == {"author_key_digest"} and "AUTHOR_KEY_EN is clear" in verdict.error
    # the same claims with an author key (no vector has one): the digest must be in the list
    base = verify_evidence(evidence, policy=policy_from_yaml("snp: {allow_smt: true}"), at=at)
    signed = VerifiedEvidence("snp", base.product, base.claims | {"author_key_en": True, "author_key_digest": "ab" * 48})
    assert appraise(signed, policy_from_yaml(rules)).ok
    other = VerifiedEvidence("snp", base.product, signed.claims | {"author_key_digest": "cd" * 48})
    assert _failed(appraise(other, policy_from_yaml(rules))) == {"author_key_digest"}


@pytest.mark.parametrize("name, rules, ok", [
    (V5, "{forbid: [MIGRATABLE, PKS, KL, PERFMON, DEBUG]}", True),
    (V5, "{require: [SEPT_VE_DISABLE]}", True),
    (V5, "{exact: '0000001000000000'}", True),
    (V5, "{exact: '0000005000000000'}", False),
    (V5, "{require: [PKS]}", False),
    (SPR, "{forbid: [PKS]}", False),
    (SPR, "{require: [PKS], forbid: [MIGRATABLE, KL, PERFMON]}", True),
])
def test_td_attributes(tdx_vector, name, rules, ok):
    verdict, _ = _tdx(tdx_vector, name, f"  td_attributes: {rules}\n")
    assert verdict.ok is ok, verdict.error
    assert _failed(verdict) == (set() if ok else {"td_attributes_bits"})


def test_td_attributes_migratable_and_perfmon_bits_refused():
    from tests.attestation.test_appraise import tdx  # hand-made claims: no vector sets these bits

    policy = policy_from_yaml("tdx: {td_attributes: {forbid: [MIGRATABLE, PERFMON]}, require_collateral: false}")
    for attrs, word in (((1 << 28) | (1 << 29), "MIGRATABLE is set"), ((1 << 28) | (1 << 63), "PERFMON is set")):
        verdict = appraise(tdx(td_attributes=attrs.to_bytes(8, "little").hex()), policy)
        assert _failed(verdict) == {"td_attributes_bits"} and word in verdict.error


@pytest.mark.parametrize("name, rules, ok", [
    (V5, "{exact: 'e702060000000000'}", True),
    (V5, "{exact: 'e71a060000000000'}", False),
    (SPR, "{exact: 'e71a060000000000'}", True),
    # AMX tile state (XFAM bits 17-18) required, nothing from bit 20 up allowed (mask 0xfffffffffff60000)
    (V5, "{mask: '0000f6ffffffffff', value: '0000060000000000'}", True),
    # AVX-512 state (bits 5-7) forbidden: both quotes enable it
    (V5, "{mask: 'e000000000000000', value: '0000000000000000'}", False),
    (SPR, "{mask: '0018000000000000', value: '0000000000000000'}", False),
])
def test_xfam(tdx_vector, name, rules, ok):
    verdict, _ = _tdx(tdx_vector, name, f"  xfam: {rules}\n")
    assert verdict.ok is ok, verdict.error
    assert _failed(verdict) == (set() if ok else {"xfam"})


def test_unconstrained_knobs_pass_and_say_so(snp_vector, tdx_vector):
    verdict, _ = _snp(snp_vector, MILAN, "")
    for name in ("guest_policy_bits", "platform_info", "min_launch_tcb", "min_firmware", "id_key_digest",
                 "author_key_digest", "family_id", "image_id"):
        check = _check(verdict, name)
        assert check.ok and ("not constrained" in check.detail or "no minimum" in check.detail), check
    tdx_verdict, _ = _tdx(tdx_vector, V5, "")
    assert all(_check(tdx_verdict, n).ok for n in ("td_attributes_bits", "xfam"))


@pytest.mark.parametrize("text, key, why", [
    ("snp: {guest_policy: {require: [SMT], forbid: [SMT]}}", "snp.guest_policy", "both required and forbidden"),
    ("snp: {guest_policy: {require: [SMT_EN]}}", "snp.guest_policy.require.0", "SINGLE_SOCKET"),
    ("snp: {platform_info: {require: [SMT]}}", "snp.platform_info.require.0", "ALIAS_CHECK_COMPLETE"),
    ("snp: {platform_info: {exact: '0x27'}}", "snp.platform_info.exact", "integer"),
    ("snp: {min_firmware: '1.x'}", "snp.min_firmware", "MAJOR.MINOR"),
    ("snp: {min_firmware: '1.256'}", "snp.min_firmware", "0-255"),
    ("snp: {min_launch_tcb: {ucode: 1}}", "snp.min_launch_tcb.ucode", "unknown key"),
    ("snp: {family_id: '00'}", "snp.family_id", "32 hex digits"),
    ("snp: {id_key_digests: ['00']}", "snp.id_key_digests.0", "96 hex digits"),
    ("tdx: {td_attributes: {require: [FOO]}}", "tdx.td_attributes.require.0", "MIGRATABLE"),
    ("tdx: {td_attributes: {exact: '00'}}", "tdx.td_attributes.exact", "16 hex digits"),
    ("tdx: {xfam: {mask: 'ff00000000000000'}}", "tdx.xfam", "mask and value go together"),
    ("tdx: {xfam: {}}", "tdx.xfam", "give exact or mask/value"),
    ("tdx: {xfam: {exact: 'e702060000000000', mask: 'ff00000000000000', value: '0000000000000000'}}",
     "tdx.xfam", "not both"),
    ("tdx: {xfam: {mask: '0f00000000000000', value: 'f000000000000000'}}", "tdx.xfam", "outside mask"),
    ("snp: {measurements: [{measurement: '" + "ab" * 48 + "', kernel_hashes: 'yes'}]}",
     "snp.measurements.0.kernel_hashes", "boolean"),
])
def test_bad_rules_name_the_key(text, key, why):
    with pytest.raises(PolicyError) as info:
        policy_from_yaml(text)
    assert key in str(info.value) and why in str(info.value)


def test_min_tcb_evaluation_data_number_refuses_collateral_from_before_a_tcb_recovery(tdx_vector):
    # Superseded TCB info stays signed and before its nextUpdate for 30 days: a host serving the one from before
    # a TCB recovery (same signatures, a better status) passes every time check; only the counter tells.
    evidence, _, at = tdx_vector(V5, collateral="pcs-2026-02")  # tcbEvaluationDataNumber 18 in both documents
    base = "tdx:\n  require_sept_ve_disable: false\n"
    verdict = verify_evidence(evidence, policy=policy_from_yaml(base + "  min_tcb_evaluation_data_number: 18\n"), at=at)
    assert verdict.ok, verdict.error
    assert "TCB info 18, QE identity 18 >= 18" in _check(verdict, "min_tcb_evaluation_data_number").detail
    verdict = verify_evidence(evidence, policy=policy_from_yaml(base + "  min_tcb_evaluation_data_number: 19\n"), at=at)
    assert _failed(verdict) == {"min_tcb_evaluation_data_number"}
    assert "below the minimum 19 (TCB info, QE identity" in verdict.error
    # no collateral evaluated: nothing shows the counter, so a minimum refuses
    bare, _, at = tdx_vector(V5)
    policy = policy_from_yaml(base + "  require_collateral: false\n  min_tcb_evaluation_data_number: 1\n")
    assert "min_tcb_evaluation_data_number" in _failed(verify_evidence(bare, policy=policy, at=at))
