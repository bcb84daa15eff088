"""Intel collateral for real TDX evidence, fetched through a PCS client (Intel PCS or a mirror of it).

A quote says nothing about revocation or whether its TCB is current: that takes the TCB info and QE
identity of its FMSPC, the PCK CRL of its CA and the root CA CRL. The enclave attaches them to its
evidence under the ``collateral_to_files()`` names, so a verifier needs no PCS access of its own. It
fetches them from any mirror (such as the host agent's ``/pcs``): every object is Intel-signed, so an
untrusted mirror cannot forge any; it can make verifiers refuse the evidence (expired or missing collateral),
or keep serving a superseded set that is still before its nextUpdate: against that, policies set
``tdx.min_tcb_evaluation_data_number`` and a verifier with its own PcsClient uses that instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import AttestationError, ProviderError
from ..evidence import Evidence
from .collateral import fetch_for_evidence, with_collateral

if TYPE_CHECKING:  # pragma: no cover
    from ..tdx.pcs import PcsClient


def with_tdx_collateral(evidence: Evidence, pcs: "PcsClient") -> Evidence:
    """``evidence`` with the Intel collateral of its quote's FMSPC and PCK CA; ProviderError if unavailable.

    Failing rather than publishing bare evidence is deliberate: verifiers require collateral by default.
    """
    from ..tdx.collateral import collateral_to_files
    from ..tdx.pck import pck_ca_kind
    from ..tdx.quote import parse_quote

    try:
        quote = parse_quote(evidence.report)
        fmspc, ca = quote.pck_extension.fmspc.hex(), pck_ca_kind(quote.sig_data.pck_chain)
    except AttestationError as exc:
        raise ProviderError(f"cannot tell which Intel collateral the TDX quote needs: {exc}") from None
    collateral = fetch_for_evidence(f"the Intel collateral of FMSPC {fmspc} (PCK {ca} CA)", pcs, "PCS",
                                    lambda: pcs.collateral(fmspc, ca=ca))
    return with_collateral(evidence, collateral_to_files(collateral))
