"""TCB evaluation of a TDX quote against Intel TCB Info v3 and QE Identity v2, as Intel's QVL does it.

Order and rules follow the QVL (QuoteVerifier, TcbLevelCheck, TdxModuleCheck, TDRelaunchCheck,
EnclaveReportVerifier): FMSPC / PCE-ID match; TDX module identity (MRSIGNERSEAM, SEAMATTRIBUTES); QE report
against QE identity; platform TCB level; TDX module TCB level; TD 1.5 relaunch advice; status convergence.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..verdict import CheckLog
from .collateral import QeIdentity, TcbInfo, TcbLevel, TdxModuleIdentity
from .pck import PckExtension
from .quote import BODY_TYPE_TD15, QeReport, Quote

UP_TO_DATE = "UpToDate"
SW_HARDENING = "SWHardeningNeeded"
CONFIG_NEEDED = "ConfigurationNeeded"
CONFIG_SW_HARDENING = "ConfigurationAndSWHardeningNeeded"
OUT_OF_DATE = "OutOfDate"
OUT_OF_DATE_CONFIG = "OutOfDateConfigurationNeeded"
REVOKED = "Revoked"
RELAUNCH = "TDRelaunchAdvised"
RELAUNCH_CONFIG = "TDRelaunchAdvisedConfigurationNeeded"

_CONFIG_STATUSES = {CONFIG_NEEDED, OUT_OF_DATE_CONFIG, CONFIG_SW_HARDENING, RELAUNCH_CONFIG}


@dataclass(frozen=True)
class TcbEvaluation:
    status: str
    platform_status: str  # status of the TDX TCB level selected for the platform
    sgx_status: str  # status of the first level matching the SGX components + PCESVN
    module_id: str | None  # "TDX_01" ... or None for the legacy tdxModule (TEE_TCB_SVN[1] == 0)
    module_status: str
    qe_status: str
    advisory_ids: tuple[str, ...]
    tcb_date: str
    tcb_evaluation_data_number: int


def check_platform_match(log: CheckLog, ext: PckExtension, tcb_info: TcbInfo) -> None:
    log.require(
        ext.fmspc == tcb_info.fmspc,
        "fmspc",
        f"FMSPC {ext.fmspc.hex()} matches TCB info",
        f"PCK FMSPC {ext.fmspc.hex()} differs from TCB info FMSPC {tcb_info.fmspc.hex()}",
    )
    log.require(
        ext.pceid == tcb_info.pce_id,
        "pceid",
        f"PCE-ID {ext.pceid.hex()} matches TCB info",
        f"PCK PCE-ID {ext.pceid.hex()} differs from TCB info PCE-ID {tcb_info.pce_id.hex()}",
    )


def module_identity_for(quote: Quote, tcb_info: TcbInfo) -> TdxModuleIdentity | None:
    """The TDX module identity for TEE_TCB_SVN[1] (None for major version 0: legacy tdxModule entry)."""
    major = quote.body.tee_tcb_svn[1]
    if major == 0:
        return None
    wanted = "TDX_%02X" % major
    for identity in tcb_info.tdx_module_identities:
        if identity.id.upper() == wanted:
            return identity
    return None


def check_tdx_module(log: CheckLog, quote: Quote, tcb_info: TcbInfo) -> TdxModuleIdentity | None:
    """MRSIGNERSEAM and SEAMATTRIBUTES against the module identity (QVL 4.1.2.4.11)."""
    major = quote.body.tee_tcb_svn[1]
    identity = module_identity_for(quote, tcb_info)
    if major and identity is None:
        log.fail("tdx_module", "TDX module mismatch: TCB info has no identity TDX_%02X" % major)
    reference = identity or tcb_info.tdx_module
    if quote.body.mrsignerseam != reference.mrsigner:
        log.fail("tdx_module", f"MRSIGNERSEAM {quote.body.mrsignerseam.hex()} is not {reference.mrsigner.hex()}")
    seam = int.from_bytes(quote.body.seam_attributes, "big")
    mask = int.from_bytes(reference.attributes_mask, "big")
    if seam & mask != int.from_bytes(reference.attributes, "big"):
        log.fail("tdx_module", f"SEAMATTRIBUTES {quote.body.seam_attributes.hex()} do not match the module identity")
    log.ok("tdx_module", f"TDX module identity {identity.id if identity else 'tdxModule'} matches")
    return identity


def check_qe_identity(log: CheckLog, qe: QeReport, identity: QeIdentity) -> tuple[str, tuple[str, ...]]:
    """QE report vs QE identity (QVL 4.1.2.9.5-10); returns the QE TCB status and its advisory IDs."""
    if qe.miscselect & identity.miscselect_mask != identity.miscselect:
        log.fail("qe_identity", f"QE MISCSELECT 0x{qe.miscselect:08x} does not match the QE identity")
    masked = bytes(a & m for a, m in zip(qe.attributes, identity.attributes_mask))
    if masked != identity.attributes:
        log.fail("qe_identity", f"QE attributes {qe.attributes.hex()} do not match the QE identity")
    if qe.mrsigner != identity.mrsigner:
        log.fail("qe_identity", f"QE MRSIGNER {qe.mrsigner.hex()} is not {identity.mrsigner.hex()}")
    if qe.isvprodid != identity.isvprodid:
        log.fail("qe_identity", f"QE ISVPRODID {qe.isvprodid} is not {identity.isvprodid}")
    for level in identity.tcb_levels:
        if qe.isvsvn >= level.isvsvn:
            status = level.status if level.status in (UP_TO_DATE, REVOKED) else OUT_OF_DATE
            log.ok("qe_identity", f"QE matches TD_QE identity; ISVSVN {qe.isvsvn} -> {level.status}")
            return status, level.advisory_ids
    log.fail("tcb_level", f"TCB not supported: no QE identity TCB level for QE ISVSVN {qe.isvsvn}")
    raise AssertionError("unreachable")


def _sgx_ok(ext: PckExtension, level: TcbLevel) -> bool:
    return ext.pcesvn >= level.pcesvn and all(a >= b for a, b in zip(ext.tcb_components, level.sgx_components))


def _tdx_ok(tee_tcb_svn: bytes, level: TcbLevel) -> bool:
    start = 2 if tee_tcb_svn[1] > 0 else 0
    return all(tee_tcb_svn[i] >= level.tdx_components[i] for i in range(start, 16))


def _converge(status: str, component: str) -> str:
    """Fold a component's status (TDX module, then QE) into the platform status: the same rule for both."""
    if component == OUT_OF_DATE:
        if status in (UP_TO_DATE, SW_HARDENING):
            return OUT_OF_DATE
        if status in (CONFIG_NEEDED, CONFIG_SW_HARDENING):
            return OUT_OF_DATE_CONFIG
    if component == REVOKED:
        return REVOKED
    return status


def _relaunch(log: CheckLog, quote: Quote, tcb_info: TcbInfo, sgx: str, tdx: str, module: str, qe: str) -> str:
    """TD 1.5: a TD whose module was updated in place (TEE_TCB_SVN_2 current) may be told to relaunch."""
    svn2 = quote.body.tee_tcb_svn2 or bytes(16)
    if qe in (OUT_OF_DATE, REVOKED):
        return tdx
    if sgx not in (UP_TO_DATE, SW_HARDENING, CONFIG_NEEDED, CONFIG_SW_HARDENING):
        return tdx
    if tdx not in (OUT_OF_DATE, OUT_OF_DATE_CONFIG) or module != OUT_OF_DATE:
        return tdx
    latest = tcb_info.tcb_levels[0]
    if svn2[1] == 0:
        current = svn2[0] >= latest.tdx_components[0] and svn2[2] >= latest.tdx_components[2]
    else:
        wanted = "TDX_%02X" % svn2[1]
        identity2 = next((m for m in tcb_info.tdx_module_identities if m.id.upper() == wanted), None)
        if identity2 is None:
            log.fail("tdx_module", f"TDX module mismatch: TCB info has no identity {wanted} (TEE_TCB_SVN_2)")
        assert identity2 is not None
        if not identity2.tcb_levels:
            log.fail("tcb_level", f"TCB not supported: {wanted} has no TCB levels")
        current = svn2[0] >= identity2.tcb_levels[0].isvsvn and svn2[2] >= latest.tdx_components[2]
    if not current:
        return tdx
    return RELAUNCH_CONFIG if sgx in _CONFIG_STATUSES or tdx in _CONFIG_STATUSES else RELAUNCH


def evaluate_tcb(
    log: CheckLog,
    quote: Quote,
    tcb_info: TcbInfo,
    module: TdxModuleIdentity | None,
    qe_status: str,
    qe_advisory_ids: tuple[str, ...] = (),
) -> TcbEvaluation:
    """Platform level + module level + convergence (QVL 4.1.2.4.17). No level -> failed check tcb_level."""
    ext = quote.pck_extension
    svn = quote.body.tee_tcb_svn
    sgx_level: TcbLevel | None = None
    tdx_level: TcbLevel | None = None
    for level in tcb_info.tcb_levels:
        if not _sgx_ok(ext, level):
            continue
        sgx_level = sgx_level or level
        if _tdx_ok(svn, level):
            tdx_level = level
            break
    if sgx_level is None or tdx_level is None:
        part = "SGX components/PCESVN" if sgx_level is None else "TEE_TCB_SVN"
        log.fail("tcb_level", f"TCB not supported: no matching TCB level ({part} below every level)")
    assert sgx_level is not None and tdx_level is not None
    advisories: list[str] = list(tdx_level.advisory_ids)
    module_id = None
    if svn[1] == 0:
        module_status = UP_TO_DATE
    else:
        assert module is not None  # check_tdx_module refused a missing identity
        module_id = module.id
        mlevel = next((m for m in module.tcb_levels if svn[0] >= m.isvsvn), None)
        if mlevel is None:
            log.fail("tcb_level", f"TCB not supported: no {module.id} TCB level for module ISVSVN {svn[0]}")
        assert mlevel is not None
        module_status = mlevel.status
        advisories.extend(mlevel.advisory_ids)
    status = _converge(tdx_level.status, module_status)
    if status != REVOKED and quote.body_type == BODY_TYPE_TD15:
        status = _relaunch(log, quote, tcb_info, sgx_level.status, status, module_status, qe_status)
    status = _converge(status, qe_status)
    advisories.extend(qe_advisory_ids)
    unique = tuple(dict.fromkeys(advisories))
    log.ok(
        "tcb_level",
        f"platform {tdx_level.status} (tcbDate {tdx_level.tcb_date.date()}), "
        f"module {module_id or 'tdxModule'} {module_status}, QE {qe_status} -> {status}",
    )
    return TcbEvaluation(
        status=status,
        platform_status=tdx_level.status,
        sgx_status=sgx_level.status,
        module_id=module_id,
        module_status=module_status,
        qe_status=qe_status,
        advisory_ids=unique,
        tcb_date=tdx_level.tcb_date.isoformat(),
        tcb_evaluation_data_number=tcb_info.tcb_evaluation_data_number,
    )
