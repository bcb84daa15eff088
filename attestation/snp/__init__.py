"""AMD SEV-SNP: parse attestation reports, decode TCBs, verify VCEK/VLEK chains and report signatures.

Modules, in data-flow order: ``report`` (bytes -> Report), ``tcb`` (TCB_VERSION layouts, product
family), ``certs`` (certificate loading, VCEK/VLEK extensions), ``trust`` (who may be a root),
``chain`` (ARK -> ASK/ASVK -> VEK, cached), ``verify`` (the whole recipe), ``certtable`` (GHCB
extended-report certificate table) and ``kds`` (AMD KDS client with a disk cache).
"""

from __future__ import annotations

from .report import REPORT_SIZE, Report, parse_report, report_claims
from .trust import AMD_TRUST, RootTrust
from .verify import clear_caches, verify_report

__all__ = [
    "AMD_TRUST",
    "REPORT_SIZE",
    "Report",
    "RootTrust",
    "clear_caches",
    "parse_report",
    "report_claims",
    "verify_report",
]
