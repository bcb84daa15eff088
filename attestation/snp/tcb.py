"""TCB_VERSION layouts and product-family detection.

A TCB_VERSION is a u64 whose byte layout depends on the product:

- Milan / Genoa ("legacy"): byte0 BOOT_LOADER, byte1 TEE, bytes2-5 SPL4..SPL7 (reserved),
  byte6 SNP, byte7 MICROCODE.
- Turin: byte0 FMC, byte1 BOOT_LOADER, byte2 TEE, byte3 SNP, bytes4-6 SPL5..SPL7 (reserved),
  byte7 MICROCODE.

The product must therefore be known before a TCB can be read; ``resolve_product`` settles it from
the report's CPUID fields (v>=3), the VEK's productName extension and the caller's word, and
refuses when they disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import VerificationError

if TYPE_CHECKING:
    from .report import Report

MILAN = "Milan"
GENOA = "Genoa"
TURIN = "Turin"
KNOWN_FAMILIES = (MILAN, GENOA, TURIN)

LAYOUT_LEGACY = "legacy"
LAYOUT_TURIN = "turin"

# productName prefixes that belong to a KDS product family (Siena parts are served as Genoa).
_NAME_TO_FAMILY = {"milan": MILAN, "genoa": GENOA, "siena": GENOA, "turin": TURIN}


def layout_for(product: str) -> str:
    """TCB layout of a product family; anything but Turin (including a simulated "Sim") is legacy."""
    return LAYOUT_TURIN if product == TURIN else LAYOUT_LEGACY


@dataclass(frozen=True)
class TcbVersion:
    """A decoded TCB_VERSION. ``fmc`` is None on the legacy layout; ``spl4`` is None on Turin."""

    raw: int
    layout: str
    bl: int
    tee: int
    snp: int
    ucode: int
    fmc: int | None = None
    spl4: int | None = 0
    spl5: int = 0
    spl6: int = 0
    spl7: int = 0

    def __str__(self) -> str:
        fmc = f"fmc={self.fmc} " if self.fmc is not None else ""
        return f"{fmc}bl={self.bl} tee={self.tee} snp={self.snp} ucode={self.ucode} (0x{self.raw:016x})"


def decode_tcb(raw: int, product: str) -> TcbVersion:
    if not 0 <= raw < 1 << 64:
        raise ValueError("TCB_VERSION is a u64")
    b = raw.to_bytes(8, "little")
    if layout_for(product) == LAYOUT_TURIN:
        return TcbVersion(raw, LAYOUT_TURIN, fmc=b[0], bl=b[1], tee=b[2], snp=b[3], spl4=None,
                          spl5=b[4], spl6=b[5], spl7=b[6], ucode=b[7])
    return TcbVersion(raw, LAYOUT_LEGACY, bl=b[0], tee=b[1], spl4=b[2], spl5=b[3], spl6=b[4],
                      spl7=b[5], snp=b[6], ucode=b[7])


def encode_tcb(product: str, *, bl: int, tee: int, snp: int, ucode: int, fmc: int | None = None,
               spl4: int | None = 0, spl5: int = 0, spl6: int = 0, spl7: int = 0) -> int:
    """Inverse of ``decode_tcb`` (components 0..255)."""
    if layout_for(product) == LAYOUT_TURIN:
        parts = [fmc or 0, bl, tee, snp, spl5, spl6, spl7, ucode]
    else:
        parts = [bl, tee, spl4 or 0, spl5, spl6, spl7, snp, ucode]
    if any(not 0 <= p <= 255 for p in parts):
        raise ValueError("TCB components are bytes (0..255)")
    return int.from_bytes(bytes(parts), "little")


def family_from_cpuid(fam: int, model: int) -> str | None:
    """Product family from the report's combined CPUID family/model (None if all-zero/absent)."""
    if fam == 0x19:
        if 0x00 <= model <= 0x0F:
            return MILAN
        if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
            return GENOA
    elif fam == 0x1A:
        return TURIN
    return None


def family_from_name(name: str) -> str:
    """"Milan-B0" -> "Milan", "genoa" -> "Genoa"; unknown names (e.g. a simulator's) are kept as given."""
    head = name.strip().split("-", 1)[0]
    return _NAME_TO_FAMILY.get(head.lower(), head)


def resolve_product(report: Report, vek_product_name: str | None, explicit: str | None) -> tuple[str, str]:
    """Settle the product family; returns (family, how it was decided). VerificationError on conflict
    or when nothing says."""
    sources: list[tuple[str, str]] = []
    if report.cpuid_fam_id is not None:
        fam, mod = report.cpuid_fam_id, report.cpuid_mod_id or 0
        cpuid_family = family_from_cpuid(fam, mod)
        if cpuid_family is None and (fam or mod or report.cpuid_step):
            raise VerificationError(
                f"product: report CPUID family {fam:#x} model {mod:#x} is no known SEV-SNP product")
        if cpuid_family is not None:
            sources.append((cpuid_family, f"report CPUID {report.cpuid_fam_mod_step}"))
    if vek_product_name is not None:
        sources.append((family_from_name(vek_product_name), f"VEK productName {vek_product_name!r}"))
    if explicit is not None:
        sources.append((family_from_name(explicit), f"caller product {explicit!r}"))
    if not sources:
        raise VerificationError("product: unknown (version 2 report without a VEK or a product argument)")
    families = {f for f, _ in sources}
    if len(families) != 1:
        raise VerificationError("product: sources disagree: " + ", ".join(f"{how} -> {f}" for f, how in sources))
    return sources[0][0], ", ".join(how for _, how in sources)
