"""Intel facts the TDX verifier pins: the SGX Root CA fingerprint and the names in Intel's chains."""

from __future__ import annotations

# SHA-256 of the DER of the "Intel SGX Root CA" certificate (the root of every PCK, TCB-signing and CRL chain).
INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"

ROOT_CA_CN = "Intel SGX Root CA"
PCK_PLATFORM_CA_CN = "Intel SGX PCK Platform CA"
PCK_PROCESSOR_CA_CN = "Intel SGX PCK Processor CA"
PCK_LEAF_CN = "Intel SGX PCK Certificate"
TCB_SIGNING_CN = "Intel SGX TCB Signing"

# PCK intermediate CN -> the `ca` parameter of the PCS pckcrl endpoint.
PCK_CA_BY_CN = {PCK_PLATFORM_CA_CN: "platform", PCK_PROCESSOR_CA_CN: "processor"}

INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

# Identities checked when no Intel collateral is given (with collateral, the signed TCB info / QE identity decide):
# the TD Quoting Enclave is signed by Intel (MRSIGNER of PCS qe_identity "TD_QE", ISVPRODID 2) and the TDX module
# is Intel's (MRSIGNERSEAM zero, SEAMATTRIBUTES zero: tcbInfo.tdxModule of every FMSPC).
INTEL_TD_QE_MRSIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")
INTEL_TD_QE_ISVPRODID = 2
INTEL_TDX_MODULE_MRSIGNER = bytes(48)
