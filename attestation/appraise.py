"""Appraisal: apply a Policy to what verification proved, one Check per policy rule.

Verdict.status words (also documented in verifier.py):
- a TDX TCB status ("UpToDate", "OutOfDate", ...) whenever collateral was evaluated;
- otherwise "verified" when accepted, "refused" when a policy rule failed.
"""

from __future__ import annotations

import hmac
from datetime import datetime, timezone
from typing import Any

from .policy import (
    SNP_GUEST_POLICY_BITS,
    SNP_PLATFORM_INFO_BITS,
    TD_ATTRIBUTE_BITS,
    Policy,
    SnpMinTcb,
    SnpPlatformInfoRule,
    TdAttributesRule,
    TdxBootEvents,
    TdxMeasurement,
    XfamRule,
)
from .tdx.eventlog import cmdline_digests
from .verdict import Check, Verdict, VerifiedEvidence

# SEV-SNP guest policy bits
SNP_POLICY_SMT = 1 << 16
SNP_POLICY_MIGRATE_MA = 1 << 18
SNP_POLICY_DEBUG = 1 << 19
# TDX TDATTRIBUTES bits (little-endian u64)
TD_ATTR_DEBUG = 1 << 0
TD_ATTR_TUD_RESERVED = 0xFE  # bits 1-7 of the TD-under-debug byte: reserved, must be zero
TD_ATTR_SEPT_VE_DISABLE = 1 << 28
# Intel revoked the platform's keys: no policy may accept it (QVL and dcap-qvl fail verification).
TCB_REVOKED = "Revoked"


def _hex_eq(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    return hmac.compare_digest(a.lower().encode(), b.lower().encode())


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 16) if value.lower().startswith("0x") else int(value)
        except ValueError:
            return None
    return None


def _le_hex(value: Any) -> int | None:
    """A claim in quote byte order (hex of little-endian bytes) as an integer."""
    if not isinstance(value, str):
        return None
    try:
        return int.from_bytes(bytes.fromhex(value), "little")
    except ValueError:
        return None


def _version(text: Any) -> tuple[int, ...] | None:
    try:
        return tuple(int(x) for x in str(text).split("."))
    except ValueError:
        return None


def snp_tcb_components(tcb: int, product: str | None) -> dict[str, int]:
    """Decode a TCB_VERSION by product: Turin's layout differs from Milan/Genoa's."""
    b = tcb.to_bytes(8, "little")
    if product and product.lower().startswith("turin"):
        return {"fmc": b[0], "bootloader": b[1], "tee": b[2], "snp": b[3], "microcode": b[7]}
    return {"bootloader": b[0], "tee": b[1], "snp": b[6], "microcode": b[7]}


class _Appraisal:
    def __init__(self) -> None:
        self.checks: list[Check] = []

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def opt_in(self, name: str, risky: bool, allowed: bool, *, off: str, accepted: str, refused: str) -> None:
        """A risky setting passes when it is off or the policy opts in; the detail says which case held."""
        self.add(name, not risky or allowed, off if not risky else accepted if allowed else refused)

    def exact_hex(self, name: str, label: str, have: Any, want: str | None) -> None:
        """A hex value the policy may pin; unpinned passes."""
        if want is None:
            self.add(name, True, f"{label} not constrained by policy")
        else:
            ok = _hex_eq(have, want)
            self.add(name, ok, f"{label} matches" if ok else f"{label} {have} != required {want}")

    def one_of_hex(self, name: str, label: str, have: Any, allowed: list[str]) -> None:
        """A hex value that must be in the policy's list when it gives one."""
        if not allowed:
            self.add(name, True, f"{label} not constrained by policy")
        else:
            ok = any(_hex_eq(have, want) for want in allowed)
            self.add(name, ok, f"{label} {have} " + ("is allowed" if ok else f"is not among the {len(allowed)} allowed"))

    def bits(self, name: str, label: str, have: int | None, rule: Any, names: dict[str, int], *,
             exact: int | None = None, mask: tuple[int, int] | None = None, shown: str | None = None) -> None:
        """Appraise a bit field: named bits required set / forbidden, and an exact or masked value.

        ``shown`` is the value as the claims show it (TDX fields: hex in quote byte order)."""
        if rule is None:
            self.add(name, True, f"{label} not constrained by policy")
            return
        if have is None:
            self.add(name, False, f"{label} missing from the claims")
            return
        wrong = [f"{n} is clear" for n in getattr(rule, "require", ()) if not have >> names[n] & 1]
        wrong += [f"{n} is set" for n in getattr(rule, "forbid", ()) if have >> names[n] & 1]
        if exact is not None and have != exact:
            wrong.append(f"value {have:#x} != required {exact:#x}")
        if mask is not None and have & mask[0] != mask[1]:
            wrong.append(f"value {have:#x} under mask {mask[0]:#x} is {have & mask[0]:#x}, required {mask[1]:#x}")
        self.add(name, not wrong, f"{label} {shown or hex(have)} " + ("meets the policy" if not wrong
                                                                     else "refused: " + "; ".join(wrong)))

    def min_tcb(self, name: str, label: str, raw_claim: Any, minimum: SnpMinTcb, product: str | None) -> None:
        """Each TCB component the policy names is at least its minimum."""
        wanted = {k: val for k, val in minimum.model_dump().items() if val is not None}
        reported = _int(raw_claim)
        if not wanted:
            self.add(name, True, f"{label} {raw_claim} (no minimum in policy)")
            return
        if reported is None:
            self.add(name, False, f"the report's {label} is missing from the claims")
            return
        have = snp_tcb_components(reported, product)
        short = []
        for comp, least in wanted.items():
            if comp not in have:
                short.append(f"{comp} (not in this product's TCB)")
            elif have[comp] < least:
                short.append(f"{comp} {have[comp]} < {least}")
        self.add(name, not short, f"{label} " + (", ".join(f"{k} {have.get(k)}" for k in wanted) + " meets the minimum"
                                                 if not short else "below the minimum: " + ", ".join(short)))


def _appraise_snp(v: VerifiedEvidence, policy: Policy, a: _Appraisal) -> None:
    c = v.claims
    p = policy.snp
    guest_policy = _int(c.get("policy"))
    if guest_policy is None:
        a.add("guest_policy", False, "the report's guest policy is missing from the claims")
        return
    a.opt_in("debug_disabled", bool(guest_policy & SNP_POLICY_DEBUG), p.allow_debug,
             off="guest policy DEBUG is clear",
             accepted="guest policy DEBUG is set and the policy allows debug guests",
             refused="guest policy DEBUG is set: a debug guest's memory is readable by the host")
    a.opt_in("migrate_ma", bool(guest_policy & SNP_POLICY_MIGRATE_MA), p.allow_migrate_ma,
             off="MIGRATE_MA is clear",
             accepted="MIGRATE_MA is set (allowed)",
             refused="MIGRATE_MA is set but the policy does not allow a migration agent")
    a.opt_in("smt", bool(guest_policy & SNP_POLICY_SMT), p.allow_smt,
             off="SMT not allowed by guest policy",
             accepted="SMT allowed by guest policy (accepted)",
             refused="guest policy allows SMT but the policy requires SMT off (set snp.allow_smt to accept)")

    signing_key = c.get("signing_key")
    a.add("signing_key", signing_key in p.signing_keys,
          f"report signed by {signing_key}" + ("" if signing_key in p.signing_keys
                                               else f"; policy accepts only {', '.join(p.signing_keys)}"))

    vmpl = _int(c.get("vmpl"))
    if p.vmpl is None:
        a.add("vmpl", True, f"VMPL {vmpl} (policy accepts any VMPL: vmpl: null)")
    else:
        a.add("vmpl", vmpl == p.vmpl, f"VMPL {vmpl}" + ("" if vmpl == p.vmpl else
                                                         f", policy requires VMPL {p.vmpl} (set snp.vmpl to accept another)"))
    a.bits("guest_policy_bits", "guest POLICY", guest_policy, p.guest_policy, SNP_GUEST_POLICY_BITS)
    info_rule: SnpPlatformInfoRule | None = p.platform_info
    a.bits("platform_info", "PLATFORM_INFO", _int(c.get("platform_info")), info_rule, SNP_PLATFORM_INFO_BITS,
           exact=info_rule.exact if info_rule else None)

    svn = _int(c.get("guest_svn"))
    ok = svn is not None and svn >= p.min_guest_svn
    a.add("min_guest_svn", ok, f"guest SVN {svn}" + (f" >= {p.min_guest_svn}" if ok else f" < required {p.min_guest_svn}"))

    measurement = c.get("measurement")
    if not p.measurements:
        a.add("measurement", True, f"measurement {measurement} (no allowlist in policy)")
    else:
        hit = next((m for m in p.measurements if _hex_eq(measurement, m.measurement)), None)
        a.add("measurement", hit is not None, f"measurement {measurement} " + (
            ("is in the allowlist" + (" (with kernel hashes)" if hit.kernel_hashes else " (firmware only)"))
            if hit is not None else f"is not among the {len(p.measurements)} allowed"))

    a.min_tcb("min_tcb", "REPORTED_TCB", c.get("reported_tcb"), p.min_tcb, v.product)
    a.min_tcb("min_launch_tcb", "LAUNCH_TCB", c.get("launch_tcb"), p.min_launch_tcb, v.product)
    if p.min_firmware is None:
        a.add("min_firmware", True, f"SEV firmware {c.get('current_version')} (no minimum in policy)")
    else:
        need = _version(p.min_firmware)
        have = {k: _version(c.get(f"{k}_version")) for k in ("current", "committed")}
        low = [f"{k} {c.get(f'{k}_version')}" for k, ver in have.items() if ver is None or need is None or ver < need]
        a.add("min_firmware", not low, f"SEV firmware current {c.get('current_version')}, committed "
              f"{c.get('committed_version')} " + ("meet" if not low else f"below ({', '.join(low)})")
              + f" the minimum {p.min_firmware}")

    a.exact_hex("host_data", "HOST_DATA", c.get("host_data"), p.host_data)
    a.one_of_hex("id_key_digest", "ID_KEY_DIGEST", c.get("id_key_digest"), p.id_key_digests)
    if not p.author_key_digests:
        a.add("author_key_digest", True, "AUTHOR_KEY_DIGEST not constrained by policy")
    elif c.get("author_key_en") is not True:
        a.add("author_key_digest", False, "the policy requires an author key but AUTHOR_KEY_EN is clear")
    else:
        a.one_of_hex("author_key_digest", "AUTHOR_KEY_DIGEST", c.get("author_key_digest"), p.author_key_digests)
    a.exact_hex("family_id", "FAMILY_ID", c.get("family_id"), p.family_id)
    a.exact_hex("image_id", "IMAGE_ID", c.get("image_id"), p.image_id)


def _td_attributes(claims: dict[str, Any]) -> int | None:
    raw = claims.get("td_attributes")
    return _le_hex(raw) if isinstance(raw, str) and len(raw) == 16 else None


def _min_tcb_evaluation(claims: dict[str, Any], minimum: int | None, a: _Appraisal) -> None:
    """Both collateral documents (TCB info, QE identity) are at least the policy's TCB evaluation data number."""
    numbers = {"TCB info": _int(claims.get("tcb_evaluation_data_number")),
               "QE identity": _int(claims.get("qe_identity_tcb_evaluation_data_number"))}
    shown = ", ".join(f"{what} {n}" for what, n in numbers.items())
    if minimum is None:
        a.add("min_tcb_evaluation_data_number", True, f"tcbEvaluationDataNumber {shown} (no minimum in policy)")
        return
    low = [what for what, n in numbers.items() if n is None or n < minimum]
    a.add("min_tcb_evaluation_data_number", not low, f"tcbEvaluationDataNumber {shown} " + (
        f">= {minimum}" if not low else f"below the minimum {minimum} ({', '.join(low)}; no collateral evaluated "
                                        "counts as below): collateral from before a TCB recovery"))


def _boot_mismatch(state: dict, boot: TdxBootEvents) -> str | None:
    """Why the boot state a replayed CC event log records is not the pinned one (None: it is)."""
    kernel = state.get("kernel")
    if kernel is None:
        return "the event log identifies no kernel"
    if not _hex_eq(kernel.get("digest"), boot.kernel):
        return f"kernel {kernel.get('digest')} is not the pinned one"
    allowed = {d.lower() for d in boot.efi_applications}
    if kernel.get("source") == "efi_application":
        allowed.add(boot.kernel.lower())
    extra = [app for app in state.get("efi_applications", ()) if str(app.get("digest")).lower() not in allowed]
    if extra:
        return (f"EFI application {extra[0].get('path') or extra[0].get('digest')} ran and is neither the kernel "
                "nor in boot.efi_applications")
    initrd = state.get("initrd")
    if boot.initrd is None:
        if initrd is not None:
            return "an initrd was loaded but the policy allows none (boot.initrd: null)"
    elif initrd is None:
        return "the event log records no initrd but the policy pins one"
    elif not _hex_eq(initrd.get("digest"), boot.initrd):
        return f"initrd {initrd.get('digest')} is not the pinned one"
    cmdline = state.get("cmdline")
    if cmdline is None:
        return "the event log records no kernel command line"
    if boot.cmdline_sha384 is not None:
        want: str | None = boot.cmdline_sha384
    else:
        assert boot.cmdline is not None  # the policy model requires one of the two
        digest = cmdline_digests(boot.cmdline).get(str(cmdline.get("source")))
        want = digest.hex() if digest is not None else None
    if not _hex_eq(cmdline.get("digest"), want):
        return "the kernel command line is not the pinned one"
    # The pins above passed, so these digests are the pinned ones; any other event whose data does not explain
    # its digest (a relabelled application, say) must be listed.
    explained = allowed | {d.lower() for d in boot.other_events} | {
        str(item.get("digest")).lower() for item in (kernel, initrd, cmdline) if item is not None}
    unexplained = [e for e in state.get("opaque_events", ()) if str(e.get("digest")).lower() not in explained]
    if unexplained:
        e = unexplained[0]
        return (f"event {e.get('index')} (RTMR{e.get('rtmr')}, {e.get('type')}) has a digest its data does not "
                f"explain and the policy does not pin (boot.other_events){f' (+{len(unexplained) - 1} more)' if len(unexplained) > 1 else ''}")
    return None


def _tdx_entry_mismatch(claims: dict[str, Any], m: TdxMeasurement) -> str | None:
    """Why a verified quote (and its replayed CC event log, if any) does not match one allowlist entry."""
    if not _hex_eq(claims.get("mrtd"), m.mrtd):
        return "MRTD differs"
    wrong = [r.upper() for r in ("rtmr0", "rtmr1", "rtmr2", "rtmr3")
             if getattr(m, r) is not None and not _hex_eq(claims.get(r), getattr(m, r))]
    if wrong:
        return f"{', '.join(wrong)} differ{'s' if len(wrong) == 1 else ''}"
    if m.boot is None:
        return None
    if "eventlog" not in claims:
        return "the entry pins boot events but the evidence carries no CC event log"
    if claims.get("boot_state") is None:
        return f"no trustworthy boot state in the CC event log ({claims.get('boot_state_error', 'unknown')})"
    return _boot_mismatch(claims["boot_state"], m.boot)


def _appraise_tdx(v: VerifiedEvidence, policy: Policy, a: _Appraisal) -> None:
    c = v.claims
    p = policy.tdx
    attrs = _td_attributes(c)
    if attrs is None:
        a.add("td_attributes", False, "TDATTRIBUTES missing from the claims")
        return
    a.opt_in("debug_disabled", bool(attrs & TD_ATTR_DEBUG), p.allow_debug,
             off="TDATTRIBUTES.DEBUG is clear",
             accepted="TDATTRIBUTES.DEBUG is set and the policy allows debug TDs",
             refused="TDATTRIBUTES.DEBUG is set: a debug TD's state is readable by the host")
    reserved = attrs & TD_ATTR_TUD_RESERVED
    a.add("td_attributes_reserved", not reserved,
          "reserved TUD bits 1-7 are clear" if not reserved
          else f"TDATTRIBUTES sets reserved TUD bits {reserved:#04x} (bits 1-7 must be zero)")
    # here the risk is the bit being clear
    a.opt_in("sept_ve_disable", not attrs & TD_ATTR_SEPT_VE_DISABLE, not p.require_sept_ve_disable,
             off="SEPT_VE_DISABLE is set",
             accepted="SEPT_VE_DISABLE is clear (allowed by policy)",
             refused="SEPT_VE_DISABLE is clear: the TD may take #VE on EPT violations "
                     "(set tdx.require_sept_ve_disable: false to accept)")

    attr_rule: TdAttributesRule | None = p.td_attributes
    a.bits("td_attributes_bits", "TDATTRIBUTES", attrs, attr_rule, TD_ATTRIBUTE_BITS, shown=c.get("td_attributes"),
           exact=_le_hex(attr_rule.exact) if attr_rule and attr_rule.exact else None)
    xfam_rule: XfamRule | None = p.xfam
    xfam_mask = None
    if xfam_rule is not None and xfam_rule.mask is not None and xfam_rule.value is not None:
        xfam_mask = (int.from_bytes(bytes.fromhex(xfam_rule.mask), "little"),
                     int.from_bytes(bytes.fromhex(xfam_rule.value), "little"))
    a.bits("xfam", "XFAM", _le_hex(c.get("xfam")), xfam_rule, {}, shown=c.get("xfam"), mask=xfam_mask,
           exact=_le_hex(xfam_rule.exact) if xfam_rule and xfam_rule.exact else None)

    servicetd = c.get("mrservicetd")
    a.opt_in("service_td", isinstance(servicetd, str) and any(ch != "0" for ch in servicetd), p.allow_service_td,
             off="no service TD bound",
             accepted=f"service TD {servicetd} bound (allowed by policy)",
             refused=f"MRSERVICETD is {servicetd}: a service TD is bound (set tdx.allow_service_td to accept)")

    if not p.measurements:
        a.add("measurement", True, f"MRTD {c.get('mrtd')} (no allowlist in policy)")
    else:
        misses = [_tdx_entry_mismatch(c, m) for m in p.measurements]
        hit = next((i for i, miss in enumerate(misses) if miss is None), None)
        if hit is not None:
            pinned = p.measurements[hit]
            a.add("measurement", True, f"MRTD {c.get('mrtd')} " + (
                "and the CC event log's boot events (kernel, initrd, command line) match allowed entry "
                if pinned.boot is not None else "and RTMRs match allowed entry ") + str(hit))
        else:
            shown = "; ".join(f"entry {i}: {miss}" for i, miss in enumerate(misses[:3]))
            a.add("measurement", False, f"MRTD {c.get('mrtd')} matches none of the {len(misses)} allowed entries "
                  f"({shown}{'; ...' if len(misses) > 3 else ''})")

    if p.min_tee_tcb_svn is None:
        a.add("min_tee_tcb_svn", True, f"TEE_TCB_SVN {c.get('tee_tcb_svn')} (no minimum in policy)")
    else:
        have_hex = c.get("tee_tcb_svn") or ""
        try:
            have = bytes.fromhex(have_hex)
        except ValueError:
            have = b""
        need = bytes.fromhex(p.min_tee_tcb_svn)
        low = [i for i in range(16) if len(have) != 16 or have[i] < need[i]]
        a.add("min_tee_tcb_svn", not low, f"TEE_TCB_SVN {have_hex} " + ("meets" if not low else
                                                                          f"is below (bytes {low[:4]})") + f" the minimum {p.min_tee_tcb_svn}")
    for key, claim, label in (("min_pcesvn", "pcesvn", "PCESVN"), ("min_qe_isvsvn", "qe_isvsvn", "QE ISVSVN")):
        minimum = getattr(p, key)
        have_n = _int(c.get(claim))
        if minimum is None:
            a.add(key, True, f"{label} {have_n} (no minimum in policy)")
        else:
            ok = have_n is not None and have_n >= minimum
            a.add(key, ok, f"{label} {have_n} " + (">=" if ok else "<") + f" {minimum}")
    _min_tcb_evaluation(c, p.min_tcb_evaluation_data_number, a)
    a.exact_hex("mrconfigid", "MRCONFIGID", c.get("mrconfigid"), p.mrconfigid)
    a.exact_hex("mrowner", "MROWNER", c.get("mrowner"), p.mrowner)

    if v.tcb_status is None:
        a.add("collateral_present", not p.require_collateral,
              "the evidence carries no Intel collateral and the verifier fetched none (no PcsClient): revocation "
              "and TCB status are unknown; tdx.require_collateral is set" if p.require_collateral
              else "no collateral evaluated: TCB status unknown (allowed by policy)")


def appraise(verified: VerifiedEvidence, policy: Policy, *, expected_report_data: bytes | None = None,
             at: datetime | None = None) -> Verdict:
    """Apply ``policy`` to verified evidence; the Verdict carries verification's checks then the policy's."""
    a = _Appraisal()
    platform = verified.platform
    a.add("platform_allowed", platform in policy.platforms,
          f"platform {platform} is " + ("allowed" if platform in policy.platforms
                                         else f"not allowed by policy {policy.name!r} (allows {', '.join(policy.platforms)})"))
    if platform in ("snp", "sim"):
        _appraise_snp(verified, policy, a)
    elif platform == "tdx":
        _appraise_tdx(verified, policy, a)

    if verified.tcb_status is not None:
        revoked = verified.tcb_status == TCB_REVOKED
        ok = verified.tcb_status in policy.accepted_tcb_statuses and not revoked
        advisories = f" (advisories: {', '.join(verified.advisory_ids)})" if verified.advisory_ids else ""
        a.add("tcb_status", ok, f"TCB status {verified.tcb_status}{advisories} is "
              + ("accepted" if ok else "never accepted, whatever the policy lists" if revoked
                 else f"not accepted (policy accepts {', '.join(policy.accepted_tcb_statuses)})"))

    if policy.max_collateral_age_days is not None:
        issued = verified.collateral_issued_at
        if issued is None:
            a.add("collateral_age", True, "no dated collateral was used")
        else:
            now = at or datetime.now(timezone.utc)
            age_days = (now - issued).total_seconds() / 86400
            ok = age_days <= policy.max_collateral_age_days
            a.add("collateral_age", ok, f"collateral issued {issued.isoformat()}, {age_days:.1f} days old "
                  + ("<=" if ok else ">") + f" {policy.max_collateral_age_days:g} days")

    actual_rd = verified.claims.get("report_data")
    for source, want in (("policy", policy.report_data),
                         ("caller", expected_report_data.hex() if expected_report_data is not None else None)):
        if want is None:
            continue
        ok = _hex_eq(actual_rd, want)
        a.add("report_data", ok, f"REPORT_DATA matches the {source}'s expected value" if ok
              else f"REPORT_DATA does not match the {source}'s expected value (not bound to this session/key)")

    # Verification raises on its first failed check, but a failed check handed in must still count.
    failed = [c for c in verified.checks if not c.ok] + a.failed
    ok = not failed
    status = verified.tcb_status or ("verified" if ok else "refused")
    error = None if ok else "refused by policy: " + "; ".join(f"{c.name}: {c.detail}" for c in failed)
    return Verdict(
        ok=ok,
        platform=platform,
        product=verified.product,
        status=status,
        claims=dict(verified.claims),
        checks=list(verified.checks) + a.checks,
        error=error,
        revocation_checked=verified.revocation_checked,
    )
