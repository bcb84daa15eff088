"""Evidence providers: obtain attestation evidence on this machine.

- ``ConfigfsTsmProvider``: Linux configfs-tsm (``/sys/kernel/config/tsm/report``), SEV-SNP and TDX.
- ``SevGuestProvider``: SEV-SNP ``/dev/sev-guest`` SNP_GET_EXT_REPORT ioctl, for kernels without configfs-tsm.
- ``SimProvider``: the simulated platform (development and tests only).

``detect_provider()`` picks the first that works here.  Given a ``KdsClient`` (AMD KDS or a mirror
of its paths), the SEV-SNP providers attach the product's CRL to their evidence (``snp_crl``); the
simulated platform always attaches its own.  Given a ``PcsClient`` (Intel PCS or a mirror), TDX
evidence carries the quote's Intel collateral (``tdx_collateral``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..errors import ProviderError
from ..evidence import Evidence
from .configfs_tsm import TSM_REPORT_ROOT, ConfigfsTsmProvider, TsmFs
from .sev_guest import SEV_GUEST_DEVICE, SevGuestProvider
from .sim import SimProvider

if TYPE_CHECKING:  # pragma: no cover
    from ..snp.kds import KdsClient
    from ..tdx.pcs import PcsClient

__all__ = [
    "EvidenceProvider",
    "SealingKeyProvider",
    "ConfigfsTsmProvider",
    "SevGuestProvider",
    "SimProvider",
    "detect_provider",
]


@runtime_checkable
class EvidenceProvider(Protocol):
    platform: str

    def get_evidence(self, report_data: bytes) -> Evidence:  # report_data exactly 64 bytes
        ...


@runtime_checkable
class SealingKeyProvider(Protocol):
    """A provider that can derive a sealing key the host cannot (SNP firmware, the sim's stand-in).

    ``derived_key`` raises ``NoSealingKey`` (a ProviderError) where the platform has none (TDX), and another
    ProviderError when the device refuses. ``sealing_binding`` names what the key is bound to.
    """

    sealing_binding: str

    def derived_key(self, context: bytes) -> bytes:  # 32 bytes
        ...


def detect_provider(*, simulate: bool = False, sim_dir: Path | None = None,
                    tsm_root: Path = TSM_REPORT_ROOT, sev_device: Path = SEV_GUEST_DEVICE,
                    tsm_fs: TsmFs | None = None, kds: KdsClient | None = None,
                    pcs: PcsClient | None = None, sim_host_data: bytes | None = None) -> EvidenceProvider:
    """The evidence provider for this machine: sim when asked, else configfs-tsm, else /dev/sev-guest.

    ``kds``: where SEV-SNP providers fetch the product's CRL to attach to every piece of evidence
    (ignored for the sim, which issues its own, and for TDX). ``pcs``: where the TDX provider fetches
    the quote's Intel collateral to attach likewise. ``sim_host_data``: the simulated launch's HOST_DATA when
    ``CUBE_SIM_HOST_DATA`` does not choose one (see SimProvider).
    """
    if simulate:
        return SimProvider(sim_dir, host_data=sim_host_data)
    if Path(tsm_root).is_dir():
        provider = ConfigfsTsmProvider(tsm_root, fs=tsm_fs, kds=kds, pcs=pcs)
        try:
            provider.probe()
            return provider
        except ProviderError:
            if not Path(sev_device).exists():
                raise
    if Path(sev_device).exists():
        return SevGuestProvider(sev_device, kds=kds)
    raise ProviderError(
        f"no attestation interface on this machine (neither {tsm_root} nor {sev_device}); "
        "run inside an SEV-SNP or TDX guest, or use the simulated platform (--simulate)"
    )
