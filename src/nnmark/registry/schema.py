"""The registry's database schema: tables, and the schema version a registry records.

Tables: ``nnmark_meta`` (schema version), ``product`` (one row: the base model's SHA-256, the key id, the code
family), ``customers``, ``codes`` (codebook, index, issue ``rank``, holder, state ``free | reserved | assigned``)
and ``issues`` (one row per issued copy: token, planned/final path, SHA-256, status ``reserved | complete |
aborted | released``, host and pid of the issuer), and ``issue_leases`` (the lease of each reservation: holder,
expiry, last renewal). See :mod:`nnmark.registry.store` for how they are used.
"""

from __future__ import annotations

import sqlalchemy as sa

SCHEMA_VERSION = 1

metadata = sa.MetaData()

meta_table = sa.Table(
    "nnmark_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

product_table = sa.Table(
    "product",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("base_sha256", sa.String(64), nullable=False),
    sa.Column("key_id", sa.String(64), nullable=False),
    sa.Column("code_family", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

customers_table = sa.Table(
    "customers",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("community", sa.String(200), nullable=True),
    sa.Column("community_code", sa.String(200), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

codes_table = sa.Table(
    "codes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("codebook", sa.String(64), nullable=False),
    sa.Column("idx", sa.Integer, nullable=False),
    sa.Column("rank", sa.Integer, nullable=False),
    sa.Column("customer_id", sa.Integer, sa.ForeignKey("customers.id"), nullable=True, unique=True),
    sa.Column("state", sa.String(16), nullable=False),  # free | reserved | assigned
    sa.UniqueConstraint("codebook", "idx", name="uq_code"),
)
sa.Index("ix_codes_rank", codes_table.c.rank)

issues_table = sa.Table(
    "issues",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("token", sa.String(64), nullable=False, unique=True),
    sa.Column("customer_id", sa.Integer, sa.ForeignKey("customers.id"), nullable=False),
    sa.Column("code_id", sa.Integer, sa.ForeignKey("codes.id"), nullable=False),
    sa.Column("planned_path", sa.Text, nullable=True),
    sa.Column("model_path", sa.Text, nullable=True),
    sa.Column("model_sha256", sa.String(64), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),  # reserved | complete | aborted | released
    sa.Column("reserved_at", sa.Float, nullable=False),
    sa.Column("completed_at", sa.Float, nullable=True),
    sa.Column("host", sa.String(200), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("note", sa.Text, nullable=True),
)
sa.Index("ix_issues_status", issues_table.c.status)

# Leases of reservations (one row per reserved issue, renewed by the live issuer's heartbeat). Kept in its own
# metadata so that registries made before leases still open: the table is created when first needed, and a
# registry that cannot create it (read-only) falls back to the same-host process check.
lease_metadata = sa.MetaData()

leases_table = sa.Table(
    "issue_leases",
    lease_metadata,
    sa.Column("token", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(300), nullable=False),  # host:pid:random of the issuing Registry object
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("renewed_at", sa.Float, nullable=False),
)
