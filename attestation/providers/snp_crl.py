"""Revocation data for real SEV-SNP evidence: the product's AMD CRL, fetched through a KDS client.

A report says nothing about revocation, so a verifier that must check it (policy ``snp.require_crl``)
needs the CRL of the product carried in the evidence as collateral ``crl.der``.  The enclave fetches
it from AMD KDS or from any mirror of its paths (such as the host agent's collateral cache): the CRL is
signed by the ARK, so an untrusted mirror can make verifiers refuse the evidence, never accept it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization

from ..errors import AttestationError, ProviderError
from ..evidence import SNP_CRL_FILE, Evidence
from .collateral import fetch_for_evidence, with_collateral

if TYPE_CHECKING:  # pragma: no cover
    from ..snp.kds import KdsClient


def snp_product_of(evidence: Evidence) -> tuple[str, bool]:
    """(product family, signed by a VLEK) of SNP evidence: from the report's CPUID or its VEK certificate."""
    from ..snp.certs import load_certificate, parse_vek_extensions
    from ..snp.report import parse_report
    from ..snp.tcb import resolve_product
    from ..verifier import split_snp_certificates

    try:
        report = parse_report(evidence.report)
        vek, _chain = split_snp_certificates(evidence.certificates)
        vek_product = parse_vek_extensions(load_certificate(vek)).product_name if vek is not None else None
        family, _how = resolve_product(report, vek_product, evidence.product)
    except AttestationError as exc:
        raise ProviderError(f"cannot tell which product's AMD CRL the SNP evidence needs: {exc}") from None
    return family, report.signing_key_name == "VLEK"


def with_snp_crl(evidence: Evidence, kds: "KdsClient") -> Evidence:
    """``evidence`` with its product's CRL attached as ``crl.der``; ProviderError if it cannot be had.

    Failing (rather than publishing evidence without the CRL) is deliberate: an enclave configured to
    include revocation data must not silently hand out evidence that strict verifiers will refuse.
    """
    family, vlek = snp_product_of(evidence)
    crl = fetch_for_evidence(f"the AMD CRL of {family} ({'VLEK' if vlek else 'VCEK'})", kds, "KDS",
                             lambda: kds.crl(family, vlek=vlek))
    return with_collateral(evidence, {SNP_CRL_FILE: crl.public_bytes(serialization.Encoding.DER)})
