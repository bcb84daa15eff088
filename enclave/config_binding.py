"""The configuration bound to the evidence: refuse to serve unless the launch carries the config's digest.

Attestation proves what booted; the configuration decides what it then does (backends, operator key, the
database). The host picks SNP HOST_DATA (TDX: MRCONFIGID) at launch and the hardware signs it into every report,
so the enclave reads its own report at start and serves only when that field equals the SHA-256 of the exact
configuration file bytes it loaded:

- SNP (and the simulated platform, which has the SNP layout): HOST_DATA (32 bytes) == SHA-256(config).
- TDX: MRCONFIGID (48 bytes) == SHA-256(config) followed by 16 zero bytes.

Under Confidential Containers (``serve --initdata``, enclave/initdata.py) the launch carries instead the digest of
the pod's init-data document, whose ``cube-enclave.yaml`` entry is the configuration: HOST_DATA / MRCONFIGID ==
that digest (under the document's ``algorithm``) truncated or zero-padded to the field's 32 / 48 bytes.

A verifier's policy that pins ``snp.host_data`` / ``tdx.mrconfigid`` therefore pins the configuration as well as
the measured code. Outside simulation the settings come from that file alone (enclave/config.py refuses
CUBE_ENCLAVE__* overrides; enclave/main.py limits the launch flags to where data lives and where to listen), and
a deployment without a configuration file is refused: there would be nothing to bind.

These values are public (they are in every report), so the comparison need not be constant-time; it fails
closed: an unreadable report, an unknown platform or a zero field refuse the start like a mismatch does.
"""

from __future__ import annotations

import base64
import hashlib
from typing import TYPE_CHECKING

from attestation.errors import AttestationError
from attestation.evidence import Evidence

if TYPE_CHECKING:   # pragma: no cover
    from attestation.providers import EvidenceProvider
    from enclave.config import Settings
    from enclave.initdata import InitDataDigest

SHA256_BYTES = 32
MRCONFIGID_BYTES = 48
# report_data of the start-up report: not a TLS binding (enclave/tls.py binds keys with its own layout), so this
# report can never stand in for a key's evidence.
STARTUP_REPORT_DATA = hashlib.sha512(b"cube-ai/config-binding/v1").digest()


class ConfigBindingError(Exception):
    """The launch evidence does not carry this configuration's digest; the message says how to fix it."""


def config_sha256(config_bytes: bytes) -> bytes:
    return hashlib.sha256(config_bytes).digest()


def expected_host_data(digest: bytes) -> bytes:
    """SNP HOST_DATA for a configuration whose SHA-256 is ``digest``."""
    if len(digest) != SHA256_BYTES:
        raise ValueError("the configuration digest is a 32-byte SHA-256")
    return bytes(digest)


def expected_mrconfigid(digest: bytes) -> bytes:
    """TDX MRCONFIGID for a configuration whose SHA-256 is ``digest``: the digest, then 16 zero bytes."""
    return expected_host_data(digest) + bytes(MRCONFIGID_BYTES - SHA256_BYTES)


def launch_field(evidence: Evidence) -> tuple[str, bytes]:
    """(field name, value) of the launch-chosen field in ``evidence``'s report: HOST_DATA or MRCONFIGID."""
    try:
        if evidence.platform in ("snp", "sim"):
            from attestation.snp.report import parse_report

            return "HOST_DATA", parse_report(evidence.report).host_data
        if evidence.platform == "tdx":
            from attestation.tdx.quote import parse_quote

            return "MRCONFIGID", parse_quote(evidence.report).body.mrconfigid
    except AttestationError as e:   # a report that does not parse: fail closed, naming it
        raise ConfigBindingError(f"cannot read this enclave's own {evidence.platform} report: {e}") from None
    raise ConfigBindingError(f"platform {evidence.platform!r}: no launch field to bind the configuration to")


def check_config_binding(evidence: Evidence, digest: bytes, initdata: InitDataDigest | None = None) -> None:
    """Raise ConfigBindingError unless ``evidence``'s HOST_DATA / MRCONFIGID carries the config ``digest``
    (with ``initdata``: that init-data document's digest instead)."""
    name, value = launch_field(evidence)
    if initdata is not None:
        _check_initdata_binding(name, value, initdata)
        return
    expected = expected_mrconfigid(digest) if name == "MRCONFIGID" else expected_host_data(digest)
    if value == expected:
        return
    option = "mrconfigid" if name == "MRCONFIGID" else "host-data"
    how = (f"launch the VM with {option}={base64.b64encode(expected).decode()} on its "
           f"{'tdx-guest' if name == 'MRCONFIGID' else 'sev-snp-guest'} object (`cube-host qemu-cmd` sets it from "
           f"the image's configuration)")
    if not any(value):
        raise ConfigBindingError(f"{name} is zero: the launch did not bind the configuration; {how}. "
                                 f"{name} must be {expected.hex()} (the SHA-256 of the configuration file"
                                 f"{'' if name == 'HOST_DATA' else ', then 16 zero bytes'})")
    raise ConfigBindingError(f"{name} {value.hex()} does not match the configuration loaded, whose "
                             f"{'SHA-256' if name == 'HOST_DATA' else 'SHA-256 + 16 zero bytes'} is {expected.hex()}: "
                             f"this is not the configuration the launch was bound to; {how}")


def _check_initdata_binding(name: str, value: bytes, initdata: InitDataDigest) -> None:
    expected = initdata.launch_value(len(value))
    if value == expected:
        return
    rule = (f"the init-data's {initdata.algorithm} digest "
            f"{'zero-padded' if len(initdata.digest) < len(value) else 'truncated'} to {len(value)} bytes"
            if len(initdata.digest) != len(value) else f"the init-data's {initdata.algorithm} digest")
    how = ("the pod's init-data (annotation io.katacontainers.config.hypervisor.cc_init_data) must be exactly the "
           "document this enclave read; Kata puts its digest there")
    state = f"{name} is zero: the launch did not bind an init-data" if not any(value) else \
        f"{name} {value.hex()} does not match the init-data loaded"
    raise ConfigBindingError(f"{state}; {name} must be {expected.hex()} ({rule}); {how}")


def enforce_config_binding(provider: EvidenceProvider, settings: Settings) -> None:
    """At start, before anything is served: the provider's own report must carry the loaded config's digest.

    Raises ConfigBindingError on a mismatch, the provider's AttestationError when there is no report.

    Runs in simulation too (the simulated launcher's HOST_DATA: ``CUBE_SIM_HOST_DATA``, default the config's
    digest), so development exercises the hardware path.
    """
    file = settings.config_file
    if file.path is None and not settings.simulate:
        raise ConfigBindingError("no configuration file: outside simulation the enclave serves only a "
                                 "configuration whose SHA-256 the launch carries (pass --config)")
    evidence = provider.get_evidence(STARTUP_REPORT_DATA)   # no report (ProviderError): no start
    check_config_binding(evidence, file.sha256, file.initdata)
