"""The tamper-evident audit trail (docs/audit.md).

``chain``: the hash chain in the database (serialized appends, MACs, head checks); ``middleware``: what is
recorded (admin routes, authentication refusals); ``refusals``: the bounded refusal counts; ``checkpoints``:
signed checkpoints; ``retention``: recorded pruning; ``export``: JSON lines for ``cube-attest verify-audit``;
``trail``: one app's trail and its schedule. The format and the verifier are in ``attestation.audit``.
"""

from enclave.audit.chain import AuditChain, AuditError
from enclave.audit.middleware import AuditMiddleware, is_audited, note_refusal
from enclave.audit.trail import AuditTrail

__all__ = ["AuditChain", "AuditError", "AuditMiddleware", "AuditTrail", "is_audited", "note_refusal"]
