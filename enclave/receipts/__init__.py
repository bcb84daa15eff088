"""Signed receipts of inference responses (``GET /proxy/{domain_id}/v1/receipts/{request_id}``).

A receipt is made from the usage ledger's MAC-verified entry of the request (``enclave.usage``); ``issuer`` makes
the statement and signs it with the enclave's attested key. The format and its offline verification are in
``attestation.receipt``; docs/receipts.md says what a receipt proves and what it does not.
"""
