"""Cube AI attestation library: parse, verify and appraise SEV-SNP reports and TDX quotes.

Pure library: no web framework imports. Data flows one way:
provider -> evidence -> certificate/endpoint -> client verifier -> verdict.
"""
