"""Intel TDX DCAP quotes: parse (quote, pck, collateral), verify (verify), evaluate TCB (tcb), fetch (pcs)."""

from __future__ import annotations

from .collateral import Collateral, collateral_from_files, collateral_to_files, load_collateral_dir
from .pcs import PcsClient
from .quote import Quote, parse_quote, quote_claims
from .verify import clear_caches, verify_quote

__all__ = [
    "Collateral",
    "PcsClient",
    "Quote",
    "clear_caches",
    "collateral_from_files",
    "collateral_to_files",
    "load_collateral_dir",
    "parse_quote",
    "quote_claims",
    "verify_quote",
]
