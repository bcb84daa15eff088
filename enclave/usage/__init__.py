"""The usage ledger: one MAC'd record per inference request (enclave.usage.ledger), and the reports over it
(enclave.usage.report). See docs/usage.md."""

from enclave.usage.entry import UsageEntry
from enclave.usage.ledger import Ledger
from enclave.usage.report import GROUP_KEYS, UsageFilter, UsageReport, report

__all__ = ["GROUP_KEYS", "Ledger", "UsageEntry", "UsageFilter", "UsageReport", "report"]
