"""Attested TLS: the enclave's TLS key is bound to platform evidence, and clients verify it before sending secrets.

Modules: ``binding`` (the report_data rule), ``certificate`` (the X.509 carrier of the evidence),
``client`` (httpx/openai clients that verify and pin), ``cli`` (``cube-attest verify-url``).
"""
