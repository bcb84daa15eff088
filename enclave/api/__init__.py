"""HTTP routers of the enclave service."""
