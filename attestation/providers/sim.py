"""Evidence from the simulated platform (see attestation.sim). Development and tests only.

The evidence always carries the platform's own CRL (``crl.der``), as SNP evidence does when the
enclave is given a KDS source, so policies with ``snp.require_crl`` work against the sim too.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ProviderError
from ..evidence import SNP_CRL_FILE, Evidence

# The simulated launcher's choice of launch measurement (96 hex digits): lets a test run a replica that claims
# another image. Unset: the sim's fixed SIM_MEASUREMENT.
SIM_MEASUREMENT_ENV = "CUBE_SIM_MEASUREMENT"


def sim_measurement_from_env() -> bytes | None:
    """The measurement named by ``CUBE_SIM_MEASUREMENT``, None when unset; ProviderError when malformed."""
    text = os.environ.get(SIM_MEASUREMENT_ENV, "").strip()
    if not text:
        return None
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != 48:
        raise ProviderError(f"{SIM_MEASUREMENT_ENV} must be 96 hex digits (a 48-byte launch measurement)")
    return value


class SimProvider:
    platform = "sim"

    def __init__(self, directory: Path | None = None) -> None:
        from ..sim import SimPlatform

        self.sim = SimPlatform.load_or_create(directory)
        self._measurement = sim_measurement_from_env()

    @property
    def fingerprint(self) -> str:
        return self.sim.fingerprint

    def get_evidence(self, report_data: bytes) -> Evidence:
        if not isinstance(report_data, (bytes, bytearray)) or len(report_data) != 64:
            raise ProviderError("report_data must be exactly 64 bytes")
        if self._measurement is not None:
            report, certs = self.sim.report(bytes(report_data), measurement=self._measurement)
        else:
            report, certs = self.sim.report(bytes(report_data))
        return Evidence(platform="sim", report=report, certificates=tuple(certs), product=self.sim.product,
                        collateral={SNP_CRL_FILE: self.sim.crl()})
