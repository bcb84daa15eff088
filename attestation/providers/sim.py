"""Evidence from the simulated platform (see attestation.sim). Development and tests only.

The evidence always carries the platform's own CRL (``crl.der``), as SNP evidence does when the
enclave is given a KDS source, so policies with ``snp.require_crl`` work against the sim too.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ProviderError
from ..evidence import SNP_CRL_FILE, Evidence


class SimProvider:
    platform = "sim"

    def __init__(self, directory: Path | None = None) -> None:
        from ..sim import SimPlatform

        self.sim = SimPlatform.load_or_create(directory)

    @property
    def fingerprint(self) -> str:
        return self.sim.fingerprint

    sealing_binding = "sim:measurement,policy"

    def derived_key(self, context: bytes) -> bytes:
        """The simulated platform's sealing key (``SimPlatform.derived_key``), for this guest's measurement."""
        return self.sim.derived_key(context)

    def get_evidence(self, report_data: bytes) -> Evidence:
        if not isinstance(report_data, (bytes, bytearray)) or len(report_data) != 64:
            raise ProviderError("report_data must be exactly 64 bytes")
        report, certs = self.sim.report(bytes(report_data))
        return Evidence(platform="sim", report=report, certificates=tuple(certs), product=self.sim.product,
                        collateral={SNP_CRL_FILE: self.sim.crl()})
