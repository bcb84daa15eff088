"""Attaching vendor-signed collateral (AMD CRLs, Intel TCB data) to a provider's evidence."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TypeVar

from ..errors import AttestationError, ProviderError
from ..evidence import Evidence

T = TypeVar("T")


def fetch_for_evidence(what: str, client: object, default_name: str, fetch: Callable[[], T]) -> T:
    """``fetch()``, or ProviderError naming ``what`` and where from: an enclave configured to carry
    vendor-signed collateral publishes no evidence without it (strict verifiers would refuse it anyway)."""
    where = getattr(client, "base_url", default_name)
    try:
        return fetch()
    except (AttestationError, ValueError, OSError) as exc:
        raise ProviderError(f"cannot fetch {what} from {where}: {exc}; the evidence is not published "
                            "without the collateral it is configured to carry") from None


def with_collateral(evidence: Evidence, files: Mapping[str, bytes]) -> Evidence:
    """``evidence`` with ``files`` added to its collateral."""
    return dataclasses.replace(evidence, collateral={**evidence.collateral, **files})
