"""Evidence from the simulated platform (see attestation.sim). Development and tests only.

The evidence always carries the platform's own CRL (``crl.der``), as SNP evidence does when the
enclave is given a KDS source, so policies with ``snp.require_crl`` work against the sim too.

HOST_DATA is the launcher's choice on real SNP; the simulated launcher's is the environment variable
``CUBE_SIM_HOST_DATA`` (64 hex digits). Unset, the report carries the ``host_data`` the caller passes (the enclave
passes its configuration's SHA-256, so development starts as a correctly bound launch would), else zero.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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


SIM_HOST_DATA_ENV = "CUBE_SIM_HOST_DATA"
HOST_DATA_BYTES = 32


def sim_launch_host_data(default: bytes | None = None, environ: Mapping[str, str] | None = None) -> bytes:
    """The simulated launch's HOST_DATA: ``$CUBE_SIM_HOST_DATA`` when set, else ``default``, else zero."""
    environ = os.environ if environ is None else environ
    text = environ.get(SIM_HOST_DATA_ENV)
    if text is not None:
        try:
            value = bytes.fromhex(text.strip())
        except ValueError:
            value = b""
        if len(value) != HOST_DATA_BYTES:
            raise ProviderError(f"{SIM_HOST_DATA_ENV} must be {2 * HOST_DATA_BYTES} hex digits (32 bytes)")
        return value
    if default is None:
        return bytes(HOST_DATA_BYTES)
    if len(default) != HOST_DATA_BYTES:
        raise ProviderError("host_data must be 32 bytes")
    return bytes(default)


class SimProvider:
    platform = "sim"

    def __init__(self, directory: Path | None = None, *, host_data: bytes | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        from ..sim import SimPlatform

        self.host_data = sim_launch_host_data(host_data, environ)   # fixed at "launch", like the hardware's
        self.sim = SimPlatform.load_or_create(directory)
        self._measurement = sim_measurement_from_env()

    @property
    def fingerprint(self) -> str:
        return self.sim.fingerprint

    sealing_binding = "sim:measurement,policy"

    def derived_key(self, context: bytes) -> bytes:
        """The simulated platform's sealing key (``SimPlatform.derived_key``), for this guest's measurement."""
        if self._measurement is not None:
            return self.sim.derived_key(context, measurement=self._measurement)
        return self.sim.derived_key(context)

    def get_evidence(self, report_data: bytes) -> Evidence:
        if not isinstance(report_data, (bytes, bytearray)) or len(report_data) != 64:
            raise ProviderError("report_data must be exactly 64 bytes")
        if self._measurement is not None:
            report, certs = self.sim.report(bytes(report_data), measurement=self._measurement, host_data=self.host_data)
        else:
            report, certs = self.sim.report(bytes(report_data), host_data=self.host_data)
        return Evidence(platform="sim", report=report, certificates=tuple(certs), product=self.sim.product,
                        collateral={SNP_CRL_FILE: self.sim.crl()})
