"""Signed receipts of inference responses (``GET /proxy/{domain_id}/v1/receipts/{request_id}``).

``source`` says what a receipt is made from (the usage ledger's entry of the request), ``issuer`` makes the
statement and signs it with the enclave's attested key. The format and its offline verification are in
``attestation.receipt``; docs/receipts.md says what a receipt proves and what it does not.
"""
