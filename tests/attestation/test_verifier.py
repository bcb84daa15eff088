"""verify_evidence on the real vectors and the sim: every policy miss refused, nothing raises."""

from __future__ import annotations

import pytest

from attestation.evidence import Evidence
from attestation.policy import DEFAULT_POLICY, policy_from_yaml
from attestation.verifier import verify_evidence


def _failed(verdict) -> set[str]:
    return {c.name for c in verdict.checks if not c.ok}


def _snp_policy(extra: str) -> object:
    return policy_from_yaml("snp:\n  allow_smt: true\n" + extra)


@pytest.mark.parametrize("name", ["virtee-sev--report_milan.hex", "go-sev-guest--attestation.bin",
                                  "trustee--test-report.bin", "trustee--test-vlek-report.bin"])
def test_snp_vectors_yield_expected_claims(snp_vector, name):
    evidence, entry, at = snp_vector(name)
    verdict = verify_evidence(evidence, policy=policy_from_yaml("snp: {allow_debug: true, allow_smt: true, vmpl: null}"), at=at)
    assert verdict.ok, verdict.error
    assert verdict.platform == "snp" and verdict.status == "verified"
    for key in ("policy", "vmpl", "signing_key", "reported_tcb", "measurement", "report_data", "chip_id"):
        assert verdict.claims[key] == entry[key], key


def test_debug_guest_refused_by_default_policy(snp_vector):
    evidence, _, at = snp_vector("go-sev-guest--attestation.bin")
    verdict = verify_evidence(evidence, at=at)
    assert not verdict.ok and verdict.status == "refused"
    assert _failed(verdict) == {"debug_disabled"}
    assert "DEBUG" in verdict.error
    ok = verify_evidence(evidence, policy=policy_from_yaml("snp: {allow_debug: true, allow_smt: true}"), at=at)
    assert ok.ok


def test_default_policy_accepts_plain_snp(snp_vector):
    evidence, _, at = snp_vector("virtee-sev--report_milan.hex")
    assert verify_evidence(evidence, at=at).ok


def test_smt_refused_unless_allowed(snp_vector):
    evidence, _, at = snp_vector("virtee-sev--report_milan.hex")  # policy 0x30000: SMT allowed
    verdict = verify_evidence(evidence, policy=policy_from_yaml("{}"), at=at)
    assert _failed(verdict) == {"smt"}


def test_measurement_allowlist(snp_vector, expected):
    evidence, entry, at = snp_vector("virtee-sev--report_milan.hex")
    hit = _snp_policy(f"  measurements: ['{entry['measurement']}']\n")
    assert verify_evidence(evidence, policy=hit, at=at).ok
    miss = _snp_policy(f"  measurements: ['{'00' * 48}', '{'11' * 48}']\n")
    verdict = verify_evidence(evidence, policy=miss, at=at)
    assert _failed(verdict) == {"measurement"}
    assert "not among the 2 allowed" in verdict.error


def test_vmpl_miss(snp_vector):
    evidence, entry, at = snp_vector("trustee--test-vlek-report.bin")  # VMPL 1
    verdict = verify_evidence(evidence, policy=_snp_policy("  vmpl: 0\n"), at=at)
    assert _failed(verdict) == {"vmpl"}
    assert verify_evidence(evidence, policy=_snp_policy("  vmpl: 1\n"), at=at).ok
    only_vcek = verify_evidence(evidence, policy=_snp_policy("  vmpl: 1\n  signing_keys: [VCEK]\n"), at=at)
    assert _failed(only_vcek) == {"signing_key"}


def test_min_tcb_and_guest_svn(snp_vector):
    evidence, _, at = snp_vector("trustee--test-report.bin")  # reported 0x7308000000000003, guest svn 4
    assert verify_evidence(evidence, policy=_snp_policy("  min_tcb: {bootloader: 3, snp: 8, microcode: 115}\n"
                                                         "  min_guest_svn: 4\n"), at=at).ok
    verdict = verify_evidence(evidence, policy=_snp_policy("  min_tcb: {snp: 9, microcode: 200}\n"), at=at)
    assert _failed(verdict) == {"min_tcb"}
    assert "snp 8 < 9" in verdict.error and "microcode 115 < 200" in verdict.error
    verdict = verify_evidence(evidence, policy=_snp_policy("  min_guest_svn: 5\n"), at=at)
    assert _failed(verdict) == {"min_guest_svn"}


def test_host_data_and_report_data(snp_vector):
    evidence, entry, at = snp_vector("virtee-sev--report_milan.hex")
    verdict = verify_evidence(evidence, policy=_snp_policy(f"  host_data: '{'01' * 32}'\n"), at=at)
    assert _failed(verdict) == {"host_data"}
    wrong = bytes(64)
    verdict = verify_evidence(evidence, at=at, expected_report_data=wrong)
    assert _failed(verdict) == {"report_data"}
    assert verify_evidence(evidence, at=at, expected_report_data=bytes.fromhex(entry["report_data"])).ok
    pol = policy_from_yaml(f"report_data: '{'ee' * 64}'\nsnp: {{allow_smt: true}}\n")
    assert _failed(verify_evidence(evidence, policy=pol, at=at)) == {"report_data"}


def test_platform_not_allowed(snp_vector):
    evidence, _, at = snp_vector("virtee-sev--report_milan.hex")
    verdict = verify_evidence(evidence, policy=policy_from_yaml("platforms: [tdx]"), at=at)
    assert not verdict.ok and verdict.status == "refused"
    assert _failed(verdict) == {"platform_allowed"}


def test_bad_snp_evidence_never_raises(snp_vector):
    evidence, _, at = snp_vector("virtee-sev--report_milan.hex")
    flipped = bytearray(evidence.report)
    flipped[0x90] ^= 1
    verdict = verify_evidence(Evidence("snp", bytes(flipped), evidence.certificates), at=at)
    assert not verdict.ok and verdict.status == "invalid"
    assert any(not c.ok for c in verdict.checks)
    short = verify_evidence(Evidence("snp", evidence.report[:-1], evidence.certificates), at=at)
    assert not short.ok and short.status == "malformed"
    no_certs = verify_evidence(Evidence("snp", evidence.report), at=at)
    assert not no_certs.ok and no_certs.status == "collateral_unavailable"
    junk_cert = verify_evidence(Evidence("snp", evidence.report, (b"junk",)), at=at)
    assert not junk_cert.ok and junk_cert.status == "malformed"
    late = verify_evidence(evidence, at=at.replace(year=2031))
    assert not late.ok and late.status == "invalid"
    assert not verify_evidence("nope").ok  # type: ignore[arg-type]


def test_wrong_products_chain_refused(snp_vector, vectors_dir):
    from attestation.snp.certs import cert_der, load_certificates

    evidence, _, at = snp_vector("virtee-sev--report_milan.hex")
    genoa = [cert_der(c) for c in load_certificates((vectors_dir / "roots" / "genoa_ask_ark.pem").read_bytes())]
    verdict = verify_evidence(Evidence("snp", evidence.report, (evidence.certificates[0], *genoa)), at=at)
    assert not verdict.ok and verdict.status == "invalid"


# -- TDX -----------------------------------------------------------------------------------------

BARE = "tdx: {require_collateral: false}"  # these vectors have no Intel collateral: judge the quote alone

def test_tdx_v5_with_collateral_up_to_date(tdx_vector):
    evidence, entry, at = tdx_vector("go-tdx-guest--quote_v5_sample.dat", "pcs-2026-02")
    verdict = verify_evidence(evidence, at=at)
    assert verdict.ok, verdict.error
    assert verdict.status == "UpToDate"
    for key in ("mrtd", "rtmr0", "td_attributes", "report_data", "mrservicetd", "fmspc"):
        assert verdict.claims[key] == entry[key]
    strict = policy_from_yaml(
        "tdx:\n  require_collateral: true\n  measurements:\n    - {mrtd: '%s', rtmr0: '%s'}\n" % (entry["mrtd"], entry["rtmr0"]))
    assert verify_evidence(evidence, policy=strict, at=at).ok
    wrong_rtmr = policy_from_yaml("tdx:\n  measurements:\n    - {mrtd: '%s', rtmr0: '%s'}\n" % (entry["mrtd"], "00" * 48))
    assert _failed(verify_evidence(evidence, policy=wrong_rtmr, at=at)) == {"measurement"}
    only_outdated = policy_from_yaml("accepted_tcb_statuses: [OutOfDate]\n")
    verdict = verify_evidence(evidence, policy=only_outdated, at=at)
    assert not verdict.ok and verdict.status == "UpToDate" and _failed(verdict) == {"tcb_status"}


def test_tdx_collateral_age_and_required_collateral(tdx_vector):
    evidence, _, at = tdx_vector("go-tdx-guest--quote_v5_sample.dat", "pcs-2026-02")
    fresh = verify_evidence(evidence, policy=policy_from_yaml("max_collateral_age_days: 60"), at=at)
    assert fresh.ok, fresh.error
    assert any(c.name == "collateral_age" and c.ok for c in fresh.checks)
    stale = verify_evidence(evidence, policy=policy_from_yaml("max_collateral_age_days: 0.01"), at=at)
    assert _failed(stale) == {"collateral_age"}
    bare, _, at2 = tdx_vector("go-tdx-guest--quote_v5_sample.dat")
    assert verify_evidence(bare, policy=policy_from_yaml("tdx: {require_collateral: false}"), at=at2).ok
    # Collateral is required by default (DEFAULT_POLICY and any policy that does not turn it off): a bare quote
    # says nothing about revocation or TCB status, so the host could strip it from a revoked platform's evidence.
    for policy in (DEFAULT_POLICY, policy_from_yaml("{}"), policy_from_yaml("tdx: {require_collateral: true}")):
        verdict = verify_evidence(bare, policy=policy, at=at2)
        assert not verdict.ok and _failed(verdict) == {"collateral_present"}, policy.name
        assert "no Intel collateral" in verdict.error


def test_debug_td_refused(tdx_vector):
    evidence, _, at = tdx_vector("trustee--tdx_quote_4.dat")
    verdict = verify_evidence(evidence, policy=policy_from_yaml(BARE), at=at)
    assert not verdict.ok and _failed(verdict) == {"debug_disabled"}
    assert verify_evidence(evidence, policy=policy_from_yaml("tdx: {allow_debug: true, require_collateral: false}"), at=at).ok


def test_azure_td_needs_sept_ve_disable_allowance(tdx_vector):
    evidence, _, at = tdx_vector("trustee--td-quote.bin")
    strict = verify_evidence(evidence, policy=policy_from_yaml("platforms: [tdx]\n" + BARE), at=at)
    assert _failed(strict) == {"sept_ve_disable"}
    loose = "tdx: {require_sept_ve_disable: false, require_collateral: false}"
    assert verify_evidence(evidence, policy=policy_from_yaml(loose), at=at).ok


def test_service_td_refused_unless_allowed(tdx_vector):
    evidence, _, at = tdx_vector("trustee--tdx_quote_5.dat")
    verdict = verify_evidence(evidence, policy=policy_from_yaml(BARE), at=at)
    assert _failed(verdict) == {"service_td"}
    allowed = "tdx: {allow_service_td: true, require_collateral: false}"
    assert verify_evidence(evidence, policy=policy_from_yaml(allowed), at=at).ok


def test_mrconfigid_and_tee_tcb_svn(tdx_vector):
    evidence, entry, at = tdx_vector("trustee--tdx_quote_6.dat")
    ok = policy_from_yaml(f"tdx:\n  mrconfigid: '{entry['mrconfigid']}'\n  min_tee_tcb_svn: '{entry['tee_tcb_svn']}'\n"
                          "  require_collateral: false\n")
    assert verify_evidence(evidence, policy=ok, at=at).ok
    bad = policy_from_yaml(f"tdx:\n  mrconfigid: '{'00' * 48}'\n  min_tee_tcb_svn: '{'ff' * 16}'\n"
                           "  require_collateral: false\n")
    assert _failed(verify_evidence(evidence, policy=bad, at=at)) == {"mrconfigid", "min_tee_tcb_svn"}


def test_tdx_no_matching_tcb_level_is_invalid(tdx_vector):
    evidence, _, at = tdx_vector("trustee--tdx_quote_5.dat", "pcs-2026-01")
    verdict = verify_evidence(evidence, policy=policy_from_yaml("tdx: {allow_service_td: true}"), at=at)
    assert not verdict.ok and verdict.status == "invalid"
    assert any(c.name == "tcb_level" and not c.ok for c in verdict.checks)


def test_garbage_quote_never_raises():
    verdict = verify_evidence(Evidence("tdx", b"\x04\x00" + bytes(100)))
    assert not verdict.ok and verdict.status == "malformed"


# -- sim -------------------------------------------------------------------------------------------

def test_sim_accepted_only_by_its_own_policy(sim_platform, sim_policy):
    from attestation.providers import SimProvider

    evidence = SimProvider(sim_platform.directory).get_evidence(bytes(range(64)))
    verdict = verify_evidence(evidence, policy=sim_policy, expected_report_data=bytes(range(64)))
    assert verdict.ok, verdict.error
    assert verdict.platform == "sim" and verdict.product == "Sim" and verdict.status == "verified"
    assert verdict.checks[0].name == "sim_root"

    default = verify_evidence(evidence)
    assert not default.ok and _failed(default) == {"platform_allowed"}

    other = policy_from_yaml(f"platforms: [sim]\nsim_root_fingerprint: '{'cd' * 32}'\n")
    refused = verify_evidence(evidence, policy=other)
    assert not refused.ok and refused.status == "invalid"
    assert any(c.name == "ark_pinned" and not c.ok for c in refused.checks)

    # the sim chain presented as real SNP evidence is refused by AMD's roots
    as_snp = Evidence("snp", evidence.report, evidence.certificates, product="Sim")
    assert not verify_evidence(as_snp, policy=policy_from_yaml("platforms: [snp, sim]\nsim_root_fingerprint: '%s'\n"
                                                                % sim_platform.fingerprint)).ok
    wrong_rd = verify_evidence(evidence, policy=sim_policy, expected_report_data=bytes(64))
    assert _failed(wrong_rd) == {"report_data"}


def _sim_crl(sim_dir, sim_platform, *, revoke_ask: bool, next_update_days: int = 30, signer=None) -> bytes:
    """A KDS-style CRL (RSASSA-PSS SHA-384, issued by the ARK) for the simulated chain."""
    from datetime import datetime, timedelta, timezone

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    key = signer or serialization.load_pem_private_key((sim_dir / "ark_key.pem").read_bytes(), password=None)
    now = datetime.now(timezone.utc)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(sim_platform.ark.subject)
               .last_update(now - timedelta(days=1)).next_update(now + timedelta(days=next_update_days)))
    if revoke_ask:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(sim_platform.ask.serial_number)
            .revocation_date(now - timedelta(hours=1)).build())
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    return builder.sign(key, hashes.SHA384(), rsa_padding=pss).public_bytes(serialization.Encoding.DER)


def test_snp_crl_carried_in_evidence_is_checked(sim_dir, sim_platform, sim_policy):
    """The AMD CRL travels as collateral "crl.der": a revoked ASK is refused, a clean CRL recorded as checked."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    from attestation.evidence import SNP_CRL_FILE, decode_cmw, encode_cmw
    from attestation.policy import Policy

    # a policy that does not require the CRL still checks one that is present
    lenient = Policy.model_validate({**sim_policy.model_dump(),
                                     "snp": {**sim_policy.snp.model_dump(), "require_crl": False}})
    report, certs = sim_platform.report(bytes(64))

    def verdict_with(crl: bytes | None):
        collateral = {SNP_CRL_FILE: crl} if crl is not None else {}
        evidence = Evidence(platform="sim", report=report, certificates=tuple(certs), product=sim_platform.product,
                            collateral=collateral)
        return verify_evidence(decode_cmw(encode_cmw(evidence)), policy=lenient)

    without = verdict_with(None)
    assert without.ok and "crl" not in {c.name for c in without.checks}
    clean = verdict_with(_sim_crl(sim_dir, sim_platform, revoke_ask=False))
    assert clean.ok and any(c.name == "crl" and c.ok for c in clean.checks)
    revoked = verdict_with(_sim_crl(sim_dir, sim_platform, revoke_ask=True))
    assert not revoked.ok and "crl" in _failed(revoked) and "revoked" in revoked.error
    forged = verdict_with(_sim_crl(sim_dir, sim_platform, revoke_ask=False,
                                   signer=rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    assert not forged.ok and "crl" in _failed(forged)


def test_snp_evidence_carries_no_collateral_but_the_crl(sim_platform):
    from attestation.errors import EvidenceError

    report, certs = sim_platform.report(bytes(64))
    with pytest.raises(EvidenceError, match="at most the AMD CRL"):
        Evidence(platform="sim", report=report, certificates=tuple(certs), collateral={"tcb_info.json": b"{}"})


def test_policy_can_require_the_snp_crl_so_a_host_cannot_skip_revocation(sim_dir, sim_platform, sim_policy):
    """The CRL travels in host-assembled evidence; a relying party that needs revocation checked says so."""
    from attestation.evidence import SNP_CRL_FILE, decode_cmw, encode_cmw
    from attestation.policy import Policy

    strict = Policy.model_validate({**sim_policy.model_dump(),
                                    "snp": {**sim_policy.snp.model_dump(), "require_crl": True}})
    report, certs = sim_platform.report(bytes(64))

    def verdict_with(crl: bytes | None):
        collateral = {SNP_CRL_FILE: crl} if crl is not None else {}
        evidence = Evidence(platform="sim", report=report, certificates=tuple(certs), product=sim_platform.product,
                            collateral=collateral)
        return verify_evidence(decode_cmw(encode_cmw(evidence)), policy=strict)

    stripped = verdict_with(None)
    assert not stripped.ok and stripped.status == "collateral_unavailable"
    clean = verdict_with(_sim_crl(sim_dir, sim_platform, revoke_ask=False))
    assert clean.ok and any(c.name == "crl" and c.ok for c in clean.checks)
    assert not Policy().snp.require_crl  # opt-in: evidence-only policies keep working without a CRL


class _OwnPcs:
    """A PcsClient stand-in: the verifier's own collateral source, serving one directory of real PCS files."""

    def __init__(self, vectors_dir, name: str) -> None:
        self.directory = vectors_dir / "tdx" / "collateral" / name
        self.calls = 0

    def collateral(self, fmspc: str, ca: str = "platform"):
        from attestation.tdx.collateral import load_collateral_dir

        self.calls += 1
        return load_collateral_dir(self.directory, fmspc)


def _tcb_info_detail(verdict) -> str:
    return next(c.detail for c in verdict.checks if c.name == "tcb_info_validity")


def test_own_pcs_collateral_is_not_downgraded_by_older_collateral_in_evidence(tdx_vector, vectors_dir):
    # The host attaches superseded TCB info (Intel-signed, before its nextUpdate): a verifier given its own PCS
    # source must not take the host's older copy over the newer one it fetches itself.
    from datetime import datetime, timezone

    policy = policy_from_yaml("tdx: {require_sept_ve_disable: false}")
    at = datetime(2026, 2, 3, tzinfo=timezone.utc)  # both sets are before their nextUpdate
    stale, _, _ = tdx_vector("go-tdx-guest--quote_v5_sample.dat", collateral="pcs-2026-01")  # TCB info of 2026-01-12
    assert "2026-01-12" in _tcb_info_detail(verify_evidence(stale, policy=policy, at=at))
    own = _OwnPcs(vectors_dir, "pcs-2026-02")  # TCB info of 2026-02-01
    verdict = verify_evidence(stale, policy=policy, at=at, pcs=own)
    assert verdict.ok, verdict.error
    assert own.calls == 1 and "2026-02-01" in _tcb_info_detail(verdict)
    # With its own source the verifier takes nothing from the evidence, even what looks newer: every object is
    # signed on its own, so a host can mix a fresh TCB info with a PCK CRL from before a revocation.
    fresh, _, _ = tdx_vector("go-tdx-guest--quote_v5_sample.dat", collateral="pcs-2026-02")
    verdict = verify_evidence(fresh, policy=policy, at=at, pcs=_OwnPcs(vectors_dir, "pcs-2026-01"))
    assert verdict.ok and "2026-01-12" in _tcb_info_detail(verdict)
