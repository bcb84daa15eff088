"""TCB evaluation rules (QVL semantics) on real quotes with edited, already-parsed TCB info / QE identity.

The edited collateral is never signed: these tests drive attestation.tdx.tcb directly, after the signature
checks that verify_quote would have made, to pin down level selection and status convergence.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from attestation.errors import VerificationError
from attestation.tdx import load_collateral_dir, parse_quote
from attestation.tdx.collateral import ModuleTcbLevel, QeTcbLevel
from attestation.tdx.tcb import check_qe_identity, check_tdx_module, evaluate_tcb
from attestation.verdict import CheckLog

from .test_tdx_helpers import COLLATERAL_DIR, TDX_DIR

V5 = parse_quote((TDX_DIR / "go-tdx-guest--quote_v5_sample.dat").read_bytes())  # TEE_TCB_SVN 0b01 04.., TD 1.5
Q6 = parse_quote((TDX_DIR / "trustee--tdx_quote_6.dat").read_bytes())  # TEE_TCB_SVN 05 03 02.., v4
Q4 = parse_quote((TDX_DIR / "trustee--tdx_quote_4.dat").read_bytes())  # TEE_TCB_SVN 03 00 05.., legacy module
C_V5 = load_collateral_dir(COLLATERAL_DIR / "pcs-2026-02")
C_Q6 = load_collateral_dir(COLLATERAL_DIR / "pcs-2026-01", "00a06d080000")
C_Q4 = load_collateral_dir(COLLATERAL_DIR / "pcs-2023-06")


def _evaluate(quote, collateral, tcb_info=None, qe_identity=None):
    tcb_info = tcb_info or collateral.tcb_info
    log = CheckLog()
    module = check_tdx_module(log, quote, tcb_info)
    qe_status, qe_adv = check_qe_identity(log, quote.sig_data.qe_report, qe_identity or collateral.qe_identity)
    return evaluate_tcb(log, quote, tcb_info, module, qe_status, qe_adv)


def _module(tcb_info, module_id, **changes):
    identities = tuple(replace(m, **changes) if m.id == module_id else m for m in tcb_info.tdx_module_identities)
    return replace(tcb_info, tdx_module_identities=identities)


def test_real_evaluations() -> None:
    v5 = _evaluate(V5, C_V5)
    assert (v5.status, v5.platform_status, v5.module_id, v5.module_status, v5.qe_status) == (
        "UpToDate", "UpToDate", "TDX_01", "UpToDate", "UpToDate"
    )
    q4 = _evaluate(Q4, C_Q4)
    assert (q4.status, q4.module_id) == ("UpToDate", None)
    q6 = _evaluate(Q6, C_Q6)
    assert q6.module_id == "TDX_03"
    assert q6.status == q6.platform_status  # module UpToDate leaves the platform status as is


def test_indexes_0_and_1_are_skipped_for_module_major_versions() -> None:
    # the first level requires tdx component 0 = 5 while TEE_TCB_SVN[0] is 0x0b; component 1 = 0 vs 1.
    # with TEE_TCB_SVN[1] > 0 Intel compares from index 2 on: raise level-0 component 0 far above: still UpToDate
    levels = list(C_V5.tcb_info.tcb_levels)
    comps = list(levels[0].tdx_components)
    comps[0] = 200
    comps[1] = 200
    levels[0] = replace(levels[0], tdx_components=tuple(comps))
    result = _evaluate(V5, C_V5, tcb_info=replace(C_V5.tcb_info, tcb_levels=tuple(levels)))
    assert result.platform_status == "UpToDate"
    # but index 2 counts: demand more than TEE_TCB_SVN[2] = 4 on every level -> no level
    levels = [replace(lv, tdx_components=lv.tdx_components[:2] + (5,) + lv.tdx_components[3:]) for lv in levels]
    with pytest.raises(VerificationError) as info:
        _evaluate(V5, C_V5, tcb_info=replace(C_V5.tcb_info, tcb_levels=tuple(levels)))
    assert info.value.checks[-1].name == "tcb_level"
    assert "no matching TCB level" in info.value.checks[-1].detail


def test_first_matching_level_in_given_order_wins() -> None:
    levels = C_V5.tcb_info.tcb_levels
    demoted = (replace(levels[0], status="SWHardeningNeeded", advisory_ids=("INTEL-SA-X",)),) + levels[1:]
    result = _evaluate(V5, C_V5, tcb_info=replace(C_V5.tcb_info, tcb_levels=demoted))
    assert result.status == "SWHardeningNeeded"
    assert result.advisory_ids == ("INTEL-SA-X",)
    # the SGX part alone failing on level 0 moves to the next level
    sgx = list(levels[0].sgx_components)
    sgx[0] = 99
    shifted = (replace(levels[0], sgx_components=tuple(sgx)),) + levels[1:]
    result = _evaluate(V5, C_V5, tcb_info=replace(C_V5.tcb_info, tcb_levels=shifted))
    assert result.platform_status == "OutOfDate"
    assert "INTEL-SA-01036" in result.advisory_ids


@pytest.mark.parametrize(
    "platform,module,expected",
    [
        ("UpToDate", "OutOfDate", "OutOfDate"),
        ("SWHardeningNeeded", "OutOfDate", "OutOfDate"),
        ("ConfigurationNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
        ("ConfigurationAndSWHardeningNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
        ("UpToDate", "Revoked", "Revoked"),
        ("ConfigurationNeeded", "UpToDate", "ConfigurationNeeded"),
    ],
)
def test_module_status_convergence(platform: str, module: str, expected: str) -> None:
    # Q6 is a v4 (TD 1.0) quote, so no relaunch advice interferes; every platform level gets `platform`
    tcb = replace(C_Q6.tcb_info, tcb_levels=tuple(replace(lv, status=platform) for lv in C_Q6.tcb_info.tcb_levels))
    mod = next(m for m in tcb.tdx_module_identities if m.id == "TDX_03")
    tcb = _module(tcb, "TDX_03", tcb_levels=tuple(replace(lv, status=module) for lv in mod.tcb_levels))
    result = _evaluate(Q6, C_Q6, tcb_info=tcb)
    assert (result.platform_status, result.module_status, result.status) == (platform, module, expected)


def test_missing_module_identity_is_a_mismatch() -> None:
    tcb = replace(
        C_V5.tcb_info, tdx_module_identities=tuple(m for m in C_V5.tcb_info.tdx_module_identities if m.id != "TDX_01")
    )
    with pytest.raises(VerificationError) as info:
        _evaluate(V5, C_V5, tcb_info=tcb)
    assert info.value.checks[-1].name == "tdx_module"
    assert "TDX_01" in info.value.checks[-1].detail


def test_module_signer_and_attributes_are_checked() -> None:
    for changes in ({"mrsigner": b"\x01" * 48}, {"attributes": b"\x00" * 7 + b"\x01"}):
        with pytest.raises(VerificationError) as info:
            _evaluate(V5, C_V5, tcb_info=_module(C_V5.tcb_info, "TDX_01", **changes))
        assert info.value.checks[-1].name == "tdx_module"
    legacy = replace(C_Q4.tcb_info, tdx_module=replace(C_Q4.tcb_info.tdx_module, mrsigner=b"\x02" * 48))
    with pytest.raises(VerificationError):
        _evaluate(Q4, C_Q4, tcb_info=legacy)


def test_module_isvsvn_below_every_level_is_not_supported() -> None:
    mod = next(m for m in C_V5.tcb_info.tdx_module_identities if m.id == "TDX_01")
    high = tuple(replace(lv, isvsvn=200) for lv in mod.tcb_levels)
    with pytest.raises(VerificationError) as info:
        _evaluate(V5, C_V5, tcb_info=_module(C_V5.tcb_info, "TDX_01", tcb_levels=high))
    assert info.value.checks[-1].name == "tcb_level"
    assert "TCB not supported" in info.value.checks[-1].detail


def test_td15_relaunch_advised() -> None:
    # module OutOfDate for the running module (TEE_TCB_SVN[0] = 0x0b) but TEE_TCB_SVN_2 (0x0d, TDX_01) is at the
    # latest module level and its index 2 (4) is at the latest platform level: Intel advises a TD relaunch.
    mod = next(m for m in C_V5.tcb_info.tdx_module_identities if m.id == "TDX_01")
    levels = (ModuleTcbLevel(13, mod.tcb_levels[0].tcb_date, "UpToDate", ()),) + tuple(
        replace(lv, status="OutOfDate") if lv.isvsvn == 6 else lv for lv in mod.tcb_levels
    )
    tcb = _module(C_V5.tcb_info, "TDX_01", tcb_levels=levels)
    result = _evaluate(V5, C_V5, tcb_info=tcb)
    assert result.module_status == "OutOfDate"
    assert result.status == "TDRelaunchAdvised"
    # with a configuration-needed platform the advice carries it
    plat = (replace(tcb.tcb_levels[0], status="ConfigurationNeeded"),) + tcb.tcb_levels[1:]
    result = _evaluate(V5, C_V5, tcb_info=replace(tcb, tcb_levels=plat))
    assert result.status == "TDRelaunchAdvisedConfigurationNeeded"
    # newest module level above TEE_TCB_SVN_2[0]: no advice, plain OutOfDate
    levels_hi = (ModuleTcbLevel(14, mod.tcb_levels[0].tcb_date, "UpToDate", ()),) + levels[1:]
    result = _evaluate(V5, C_V5, tcb_info=_module(C_V5.tcb_info, "TDX_01", tcb_levels=levels_hi))
    assert result.status == "OutOfDate"
    # a QE that is out of date suppresses the advice (and makes the whole TCB OutOfDate)
    qe = C_V5.qe_identity
    old_qe = replace(qe, tcb_levels=(replace(qe.tcb_levels[0], status="OutOfDate"),))
    assert _evaluate(V5, C_V5, tcb_info=tcb, qe_identity=old_qe).status == "OutOfDate"


@pytest.mark.parametrize(
    "qe_status,expected", [("OutOfDate", "OutOfDate"), ("Revoked", "Revoked"), ("UpToDate", "UpToDate")]
)
def test_qe_status_convergence(qe_status: str, expected: str) -> None:
    qe = C_V5.qe_identity
    levels = (QeTcbLevel(qe.tcb_levels[0].isvsvn, qe.tcb_levels[0].tcb_date, qe_status, ("INTEL-SA-QE",)),)
    result = _evaluate(V5, C_V5, qe_identity=replace(qe, tcb_levels=levels))
    assert result.qe_status == qe_status
    assert result.status == expected
    assert "INTEL-SA-QE" in result.advisory_ids


def test_qe_identity_mismatches() -> None:
    qe = C_V5.qe_identity
    for changes in (
        {"mrsigner": b"\x00" * 32},
        {"isvprodid": 1},
        {"miscselect": 1},
        {"attributes": b"\x00" * 16},
    ):
        with pytest.raises(VerificationError) as info:
            _evaluate(V5, C_V5, qe_identity=replace(qe, **changes))
        assert info.value.checks[-1].name == "qe_identity"
    high = (replace(qe.tcb_levels[0], isvsvn=99),)
    with pytest.raises(VerificationError) as info:
        _evaluate(V5, C_V5, qe_identity=replace(qe, tcb_levels=high))
    assert info.value.checks[-1].name == "tcb_level"
