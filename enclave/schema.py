"""Database tables (SQLAlchemy Core). Changes here need a new Alembic revision in enclave/migrations/versions."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
})

Timestamp = sa.DateTime(timezone=True)


def _mac() -> sa.Column:
    """HMAC-SHA-256 (hex) of the row's security-relevant fields (enclave.row_mac); null: never MAC'd, refused."""
    return sa.Column("mac", sa.String(64), nullable=True)

users = sa.Table(
    "users", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False, unique=True),
    sa.Column("is_superadmin", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", Timestamp, nullable=False),
    _mac(),
)

domains = sa.Table(
    "domains", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False, unique=True),
    sa.Column("model_allowlist", sa.JSON, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    _mac(),
)

memberships = sa.Table(
    "memberships", metadata,
    sa.Column("domain_id", sa.String(36), sa.ForeignKey("domains.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("user_id", sa.String(36), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    _mac(),
    sa.CheckConstraint("role IN ('admin', 'member')", name="role"),
)

pats = sa.Table(
    "pats", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("user_id", sa.String(36), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("domain_id", sa.String(36), sa.ForeignKey("domains.id", ondelete="CASCADE"), nullable=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("last4", sa.String(4), nullable=False),
    sa.Column("scopes", sa.JSON, nullable=False),
    sa.Column("model_allowlist", sa.JSON, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("expires_at", Timestamp, nullable=False),
    sa.Column("revoked_at", Timestamp, nullable=True),
    sa.Column("last_used_at", Timestamp, nullable=True),
    sa.Column("issued_by", sa.String(36), sa.ForeignKey("users.id", ondelete="SET NULL"), nullable=True),
    _mac(),
)

# ---- usage ledger (enclave.usage) ------------------------------------------------------------------------------
# One row per inference request: who, which model and backend, outcome, token counts, timings; never content.
# No foreign keys: a deleted user's, key's or domain's usage stays (it is billing history).
usage_records = sa.Table(
    "usage_records", metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("created_at", Timestamp, nullable=False),         # the request's start (UTC)
    sa.Column("domain_id", sa.String(36), nullable=False),
    sa.Column("user_id", sa.String(36), nullable=False),
    sa.Column("pat_id", sa.String(36), nullable=False),
    sa.Column("model", sa.String(512), nullable=False),
    sa.Column("backend", sa.String(100), nullable=False),
    sa.Column("route", sa.String(64), nullable=False),
    sa.Column("stream", sa.Boolean, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False),
    sa.Column("total_tokens", sa.BigInteger, nullable=False),
    sa.Column("estimated", sa.Boolean, nullable=False),
    sa.Column("ttft_ms", sa.Integer, nullable=True),
    sa.Column("duration_ms", sa.Integer, nullable=False),
    sa.Column("request_sha256", sa.String(80), nullable=True),
    sa.Column("response_sha256", sa.String(80), nullable=True),
    _mac(),
    sa.Index("ix_usage_records_created_at", "created_at"),
    sa.Index("ix_usage_records_domain_id_created_at", "domain_id", "created_at"),
    sa.Index("ix_usage_records_user_id_created_at", "user_id", "created_at"),
    sa.Index("ix_usage_records_pat_id_created_at", "pat_id", "created_at"),
)

# ---- audit trail (enclave.audit) --------------------------------------------------------------------------
# One hash chain of entries (attestation.audit says how hashes link); the head row is what appends lock (SELECT
# ... FOR UPDATE) so that replicas on one PostgreSQL write one chain. ``entry`` is the canonical JSON the hash
# covers; ``mac`` (enclave.row_mac, over seq and hash) lets any replica tell an entry an enclave wrote from one
# the host wrote. Checkpoints are signed statements over a (seq, hash); their keys and evidence sit beside them.
audit_head = sa.Table(
    "audit_head", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

audit_entries = sa.Table(
    "audit_entries", metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("time", Timestamp, nullable=False, index=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("entry", sa.Text, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    _mac(),
)

audit_signing_keys = sa.Table(
    "audit_signing_keys", metadata,
    sa.Column("key_id", sa.String(64), primary_key=True),
    sa.Column("public_key", sa.LargeBinary, nullable=False),
    sa.Column("evidence", sa.LargeBinary, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
)

audit_checkpoints = sa.Table(
    "audit_checkpoints", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("seq", sa.BigInteger, nullable=False, index=True),
    sa.Column("key_id", sa.String(64), nullable=False),
    sa.Column("statement", sa.Text, nullable=False),
    sa.Column("signature", sa.LargeBinary, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
)

# ---- limits and budgets (enclave.quotas) ------------------------------------------------------------------
# One row per subject that has limits of its own: ("pat", "", pat id), ("user", domain id, user id) or
# ("domain", domain id, ""). A limit column: NULL = the platform default of that level, -1 = explicitly
# unlimited, n >= 0 = the limit. MAC'd (enclave.row_mac, table "quota_limits"): a host-edited row is refused.
quota_limits = sa.Table(
    "quota_limits", metadata,
    sa.Column("subject_kind", sa.String(8), primary_key=True),
    sa.Column("domain_id", sa.String(36), primary_key=True),
    sa.Column("subject_id", sa.String(36), primary_key=True),
    sa.Column("rpm", sa.BigInteger, nullable=True),
    sa.Column("tpm", sa.BigInteger, nullable=True),
    sa.Column("concurrent", sa.BigInteger, nullable=True),
    sa.Column("tokens_per_day", sa.BigInteger, nullable=True),
    sa.Column("tokens_per_month", sa.BigInteger, nullable=True),
    sa.Column("updated_at", Timestamp, nullable=False),
    _mac(),
)

# Shared counters (not MAC'd: the host can reset them, as it can deny or allow service by other means).
# replica "" is a counter's shared total of units granted; a replica's own row holds what it would give back
# if it died (``held``) and, for concurrency, its requests in flight (``in_use``). window_start: UTC epoch
# seconds of the window's start (0 for concurrency).
quota_counters = sa.Table(
    "quota_counters", metadata,
    sa.Column("subject", sa.String(80), primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),
    sa.Column("window_start", sa.BigInteger, primary_key=True),
    sa.Column("replica", sa.String(36), primary_key=True),
    sa.Column("held", sa.BigInteger, nullable=False),
    sa.Column("in_use", sa.BigInteger, nullable=False, default=0),
)

# One heartbeat row per live replica: its counters' leases are reclaimed when it stops beating.
quota_replicas = sa.Table(
    "quota_replicas", metadata,
    sa.Column("replica", sa.String(36), primary_key=True),
    sa.Column("beat_at", sa.Float, nullable=False),
)
