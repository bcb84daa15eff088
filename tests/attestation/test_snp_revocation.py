"""SEV-SNP revocation: the AMD CRL must be current, carry a nextUpdate, and be the CRL of the chain's key kind.

AMD KDS publishes one ARK-signed CRL per product for VCEK chains (revoking ASKs) and one for VLEK chains
(revoking ASVKs). Both have the ARK as issuer and signer, so the host could offer the VCEK CRL, which does not
list a revoked ASVK, for a VLEK report; these tests make that attack (and stale or undated CRLs) fail.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509

from attestation.errors import VerificationError
from attestation.snp import verify_report
from attestation.snp.chain import VerifiedChain, crl_covers

from .test_snp_forge import NOW, Platform, kds_crl_url, root


@pytest.fixture(scope="module")
def vcek_platform() -> Platform:
    return Platform(tag="rv")


@pytest.fixture(scope="module")
def vlek_platform() -> Platform:
    return Platform(tag="rv", vlek=True)  # the same ARK key as vcek_platform: its CRLs verify for both


def _verify(p: Platform, crls, *, required: bool = True, kds=None):
    return verify_report(p.report(), vek=p.vek, chain=p.chain(), at=NOW, trust=p.trust, check_crl=required,
                         crls=crls, kds=kds)


def _crl_failure(p: Platform, crls, **kw) -> str:
    with pytest.raises(VerificationError) as e:
        _verify(p, crls, **kw)
    assert e.value.checks[-1].name == "crl"
    return e.value.checks[-1].detail


def test_crl_without_next_update_refused(vcek_platform: Platform) -> None:
    undated = vcek_platform.crl_without_next_update()
    assert undated.next_update_utc is None
    assert "no nextUpdate" in _crl_failure(vcek_platform, [undated])
    # ... even when the policy does not require a CRL: one carried in evidence is always checked.
    assert "no nextUpdate" in _crl_failure(vcek_platform, [undated], required=False)


def test_crl_issued_after_the_verification_time_refused(vcek_platform: Platform) -> None:
    future = vcek_platform.crl(this_update=NOW + timedelta(hours=1), next_update=NOW + timedelta(days=8))
    assert "after the verification time" in _crl_failure(vcek_platform, [future])


def test_crl_past_next_update_refused(vcek_platform: Platform) -> None:
    stale = vcek_platform.crl(this_update=NOW - timedelta(days=8), next_update=NOW - timedelta(seconds=1))
    assert "expired" in _crl_failure(vcek_platform, [stale])


def test_current_vcek_crl_accepted_for_a_vcek_chain(vcek_platform: Platform) -> None:
    verified = _verify(vcek_platform, [vcek_platform.crl()])
    assert verified.revocation_checked  # what lets the host agent's EAR affirm an SNP report
    assert not _verify(vcek_platform, [], required=False).revocation_checked
    crl_checks = [c for c in verified.checks if c.name == "crl"]
    assert all(c.ok for c in crl_checks) and any("covering SEV-Milan" in c.detail for c in crl_checks)


def test_vcek_crl_cannot_stand_in_for_the_vlek_crl(vcek_platform: Platform, vlek_platform: Platform) -> None:
    # The attack: the ASVK is revoked (listed in the VLEK CRL); the host ships the VCEK CRL instead, which is
    # ARK-issued, ARK-signed and current but says nothing about ASVKs.
    vcek_crl = vcek_platform.crl()  # unscoped: the ARK's own CRL, published at the ARK's (VCEK) CRL DP
    assert vcek_crl.issuer == vlek_platform.ark.subject
    detail = _crl_failure(vlek_platform, [vcek_crl])
    assert "no CRL given covers SEV-VLEK-Milan" in detail
    # Explicitly scoped to the VCEK path: refused just the same.
    scoped_vcek = vcek_platform.crl(scope=kds_crl_url("Milan", vlek=False))
    assert "no CRL given covers" in _crl_failure(vlek_platform, [scoped_vcek])


def test_vlek_crl_covers_the_asvk_and_its_revocation_counts(vlek_platform: Platform) -> None:
    vlek_url = kds_crl_url("Milan", vlek=True)
    ok = _verify(vlek_platform, [vlek_platform.crl(scope=vlek_url)])
    assert any(c.name == "crl" and "covering SEV-VLEK-Milan" in c.detail for c in ok.checks)
    revoked = vlek_platform.crl([vlek_platform.ask.serial_number], scope=vlek_url)
    assert "is revoked" in _crl_failure(vlek_platform, [revoked])


def test_crl_of_another_scope_leaves_revocation_unchecked_when_not_required(vlek_platform: Platform,
                                                                            vcek_platform: Platform) -> None:
    # Not required by policy: a CRL of the other kind is checked (signature, dates) but revocation stays unchecked.
    verified = _verify(vlek_platform, [vcek_platform.crl()], required=False)
    assert any(c.name == "crl" and "revocation not checked" in c.detail for c in verified.checks)


class _Kds:
    """What verify_report asks a KDS client for, recorded; it answers with a fixed CRL."""

    def __init__(self, crl: x509.CertificateRevocationList) -> None:
        self._crl, self.asked = crl, []

    def crl(self, product: str, *, vlek: bool = False) -> x509.CertificateRevocationList:
        self.asked.append((product, vlek))
        return self._crl


def test_verifier_fetches_the_crl_of_the_reports_key_kind(vlek_platform: Platform) -> None:
    kds = _Kds(vlek_platform.crl())  # unscoped, but fetched by this verifier from the VLEK path
    verified = _verify(vlek_platform, [], kds=kds)
    assert kds.asked == [("Milan", True)]
    assert any(c.name == "crl" and "fetched from KDS" in c.detail for c in verified.checks)


def test_a_crl_of_another_scope_in_evidence_sends_the_verifier_to_its_own_kds(vcek_platform: Platform,
                                                                              vlek_platform: Platform) -> None:
    kds = _Kds(vlek_platform.crl([vlek_platform.ask.serial_number]))  # the real VLEK CRL lists the ASVK
    with pytest.raises(VerificationError) as e:
        _verify(vlek_platform, [vcek_platform.crl()], kds=kds)  # the host's stand-in does not hide it
    assert kds.asked == [("Milan", True)] and "is revoked" in e.value.checks[-1].detail


def test_a_partial_crl_covers_no_intermediate(vlek_platform: Platform) -> None:
    crl = vlek_platform.crl(scope=kds_crl_url("Milan", vlek=True))
    ext = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
    assert crl_covers(crl, _chain(vlek_platform.ark, vlek_platform.ask))
    user_only = x509.CertificateRevocationListBuilder().issuer_name(crl.issuer).last_update(crl.last_update_utc) \
        .next_update(crl.next_update_utc).add_extension(x509.IssuingDistributionPoint(
            full_name=ext.value.full_name, relative_name=None, only_contains_user_certs=True,
            only_contains_ca_certs=False, only_some_reasons=None, indirect_crl=False,
            only_contains_attribute_certs=False), critical=True)
    from cryptography.hazmat.primitives import hashes

    from .test_snp_forge import PSS

    signed = user_only.sign(vlek_platform.ark_key, hashes.SHA384(), rsa_padding=PSS)
    assert not crl_covers(signed, _chain(vlek_platform.ark, vlek_platform.ask))  # ASVKs are CA certificates


def _chain(ark: x509.Certificate, intermediate: x509.Certificate) -> VerifiedChain:
    return VerifiedChain(ark, intermediate, intermediate, None, NOW, NOW, ())  # type: ignore[arg-type]


def test_real_amd_distribution_points_bind_an_unscoped_crl_to_the_ask_only(vcek_platform: Platform) -> None:
    # AMD's own certificates decide the scope: the ARK and ASK name /vcek/v1/<product>/crl, the ASVK
    # /vlek/v1/<product>/crl; an unscoped ARK CRL therefore covers ASKs, never ASVKs.
    for product in ("milan", "genoa", "turin"):
        ark = x509.load_pem_x509_certificate(root(f"{product}_ark.pem"))
        ask = x509.load_pem_x509_certificate(root(f"{product}_ask.pem"))
        asvk = x509.load_pem_x509_certificate(root(f"{product}_asvk.pem"))
        unscoped = vcek_platform.crl()
        assert crl_covers(unscoped, _chain(ark, ask)), product
        assert not crl_covers(unscoped, _chain(ark, asvk)), product
        vlek_url = f"https://kdsintf.amd.com/vlek/v1/{product.capitalize()}/crl"
        assert crl_covers(vcek_platform.crl(scope=vlek_url), _chain(ark, asvk)), product
        assert not crl_covers(vcek_platform.crl(scope=vlek_url), _chain(ark, ask)), product


def test_sim_evidence_with_an_undated_or_future_crl_refused(sim_platform, sim_policy) -> None:
    import dataclasses
    from datetime import datetime, timezone

    from cryptography.hazmat.primitives import hashes, serialization

    from attestation.evidence import SNP_CRL_FILE
    from attestation.providers.sim import SimProvider
    from attestation.sim import _pss

    evidence = SimProvider(sim_platform.directory).get_evidence(bytes(64))
    now = datetime.now(timezone.utc)
    future = (x509.CertificateRevocationListBuilder().issuer_name(sim_platform.ark.subject)
              .last_update(now + timedelta(hours=2)).next_update(now + timedelta(days=7))
              .sign(sim_platform._ark_private_key(), hashes.SHA384(), rsa_padding=_pss()))
    from attestation.verifier import verify_evidence

    bad = dataclasses.replace(evidence, collateral={SNP_CRL_FILE: future.public_bytes(serialization.Encoding.DER)})
    verdict = verify_evidence(bad, policy=sim_policy)
    assert not verdict.ok and verdict.checks[-1].name == "crl"
    assert "after the verification time" in verdict.checks[-1].detail
    assert verify_evidence(evidence, policy=sim_policy).ok  # the sim's own CRL is current and covers its ASK


def test_an_older_crl_in_evidence_does_not_hide_a_revocation_from_the_verifiers_own_kds(
        vcek_platform: Platform) -> None:
    # The host keeps attaching the CRL issued before the ASK was revoked: right scope, ARK-signed, before its
    # nextUpdate. A verifier that has its own KDS source must still see the current CRL, which lists the ASK.
    older = vcek_platform.crl(this_update=NOW - timedelta(days=2), next_update=NOW + timedelta(days=5))
    assert _verify(vcek_platform, [older])  # on its own, the older CRL is acceptable
    kds = _Kds(vcek_platform.crl([vcek_platform.ask.serial_number]))
    with pytest.raises(VerificationError) as e:
        _verify(vcek_platform, [older], kds=kds)
    assert kds.asked == [("Milan", False)] and "is revoked" in e.value.checks[-1].detail
