"""Who may be the root of an SEV-SNP-layout certificate chain.

AMD_TRUST pins the AMD root keys (ARK) of each product family by the SHA-256 of the ARK
certificate DER; an ARK that arrives with evidence is used only when its fingerprint is pinned
here. A simulated platform builds its own RootTrust with other names and fingerprints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType


def normalize_fingerprint(fp: str) -> str:
    """"AB:CD:.." or "abcd.." -> "abcd.." (lowercase hex, no separators)."""
    return fp.replace(":", "").strip().lower()


@dataclass(frozen=True)
class RootTrust:
    """Roots and naming of a chain ARK -> ASK (VCEK path) or ASVK (VLEK path) -> VCEK/VLEK.

    The ``*_cn`` values are format strings with ``{product}`` (the product family, e.g. "Milan").
    ``intermediate_fingerprints`` optionally pins ASK/ASVK certificates too (empty: the ARK's
    signature suffices, as AMD may re-issue intermediates).
    """

    name: str
    ark_fingerprints: Mapping[str, frozenset[str]]
    organization: str
    ark_cn: str
    ask_cn: str
    asvk_cn: str
    vcek_cn: str
    vlek_cn: str
    min_rsa_bits: int = 4096
    intermediate_fingerprints: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for attr in ("ark_fingerprints", "intermediate_fingerprints"):
            value = getattr(self, attr)
            frozen = MappingProxyType(
                {str(k): frozenset(normalize_fingerprint(f) for f in v) for k, v in value.items()})
            object.__setattr__(self, attr, frozen)

    @cached_property
    def cache_key(self) -> tuple:
        """A hashable identity of everything that decides a chain's verdict."""
        return (
            self.name,
            tuple(sorted((k, tuple(sorted(v))) for k, v in self.ark_fingerprints.items())),
            tuple(sorted((k, tuple(sorted(v))) for k, v in self.intermediate_fingerprints.items())),
            self.organization, self.ark_cn, self.ask_cn, self.asvk_cn, self.vcek_cn, self.vlek_cn,
            self.min_rsa_bits,
        )

    def products(self) -> list[str]:
        return sorted(self.ark_fingerprints)


# SHA-256 of the AMD ARK / ASK / ASVK certificates served by https://kdsintf.amd.com (cert_chain).
AMD_ARK_FINGERPRINTS = {
    "Milan": frozenset({"69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd"}),
    "Genoa": frozenset({"4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1"}),
    "Turin": frozenset({"1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a"}),
}
AMD_INTERMEDIATE_FINGERPRINTS = {
    "Milan": frozenset({
        "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b",  # SEV-Milan (ASK)
        "c5e081f59b7efab1fe2f8b505e159704e72f29cab7ef7cf628a05a42439082f5",  # SEV-VLEK-Milan (ASVK)
    }),
    "Genoa": frozenset({
        "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521",
        "197e610743a917d6b9bb982a5a9226ccc0a15b611be0619e626aca9151457372",
    }),
    "Turin": frozenset({
        "5b77ef5fe7a7a004fd9032668fba9d0fda22f88c4442069a479636a6ae3b3185",
        "104e10a8bd060a3c20a434261a57d0588fd65a88915b4f65b08bdecaf8df1a3c",
    }),
}

AMD_TRUST = RootTrust(
    name="amd",
    ark_fingerprints=AMD_ARK_FINGERPRINTS,
    organization="Advanced Micro Devices",
    ark_cn="ARK-{product}",
    ask_cn="SEV-{product}",
    asvk_cn="SEV-VLEK-{product}",
    vcek_cn="SEV-VCEK",
    vlek_cn="SEV-VLEK",
    min_rsa_bits=4096,
)
