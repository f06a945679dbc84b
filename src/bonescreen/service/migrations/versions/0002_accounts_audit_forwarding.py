"""Accounts, API tokens, the append-only audit trail, instances; who reviewed; storage commitment; dead letters.

Revision ID: 0002
Revises: 0001
Create Date: 2026-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

APPEND_ONLY = "the audit trail is append-only"


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("username", sa.String(64), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(255), nullable=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("oidc_subject", sa.String(255), nullable=True, unique=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=True),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_used_at", sa.DateTime(), nullable=True),
        sa.Column("revoked", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_api_tokens_user_id", "api_tokens", ["user_id"])
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("actor", sa.String(64), nullable=True),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target", sa.String(128), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("ip", sa.String(64), nullable=True),
    )
    for col in ("at", "actor", "action"):
        op.create_index(f"ix_audit_{col}", "audit", [col])
    op.create_table(
        "instances",
        sa.Column("name", sa.String(160), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("parts", sa.String(64), nullable=False),
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
    )
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("reviewed_by", sa.String(64), nullable=True))
        batch.add_column(sa.Column("forward_commit_uid", sa.String(64), nullable=True))
        batch.add_column(sa.Column("forward_commit_deadline", sa.Float(), nullable=True))
        batch.create_index("ix_results_forward_commit_uid", ["forward_commit_uid"])
    # the old "failed" (gave up) is the dead-letter state now
    op.execute("UPDATE results SET forward_status = 'dead_letter' WHERE forward_status = 'failed'")
    # append-only: the database itself refuses to change or delete an audit row
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"""CREATE FUNCTION bonescreen_audit_append_only() RETURNS trigger AS $$
            BEGIN RAISE EXCEPTION '{APPEND_ONLY}'; END; $$ LANGUAGE plpgsql""")
        op.execute("""CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit
            FOR EACH STATEMENT EXECUTE FUNCTION bonescreen_audit_append_only()""")
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(f"""CREATE TRIGGER audit_no_{verb.lower()} BEFORE {verb} ON audit
                BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END""")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER audit_append_only ON audit")
        op.execute("DROP FUNCTION bonescreen_audit_append_only()")
    op.execute("UPDATE results SET forward_status = 'failed' WHERE forward_status = 'dead_letter'")
    with op.batch_alter_table("results") as batch:
        batch.drop_index("ix_results_forward_commit_uid")
        batch.drop_column("forward_commit_deadline")
        batch.drop_column("forward_commit_uid")
        batch.drop_column("reviewed_by")
    for t in ("instances", "audit", "api_tokens", "users"):
        op.drop_table(t)
