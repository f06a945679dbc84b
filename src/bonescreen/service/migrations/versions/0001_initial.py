"""The schema as deployed before migrations (main at 9be03ba, made by ``create_all``): jobs and results.

Revision ID: 0001
Revises:
Create Date: 2026-01-01

A database made by that code has these tables and no ``alembic_version``;
``bonescreen.service.migrate`` stamps it at this revision and upgrades from
here, so its rows are kept.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=True),
        sa.Column("spool_path", sa.String(255), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(160), nullable=True),
        sa.Column("claim", sa.String(40), nullable=True),
        sa.Column("lease_until", sa.Float(), nullable=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_index("ix_jobs_claim", "jobs", ["claim"])
    op.create_table(
        "results",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id"), nullable=False, unique=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=True),
        sa.Column("patient_id", sa.String(64), nullable=True),
        sa.Column("patient_name", sa.String(128), nullable=True),
        sa.Column("study_date", sa.Date(), nullable=True),
        sa.Column("sex", sa.String(1), nullable=True),
        sa.Column("age", sa.Float(), nullable=True),
        sa.Column("eligible", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("message", sa.String(500), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("score_stage1", sa.Float(), nullable=True),
        sa.Column("category", sa.String(32), nullable=True),
        sa.Column("flag", sa.Boolean(), nullable=False),
        sa.Column("model", sa.String(160), nullable=True),
        sa.Column("sr_path", sa.String(255), nullable=True),
        sa.Column("overlay_path", sa.String(255), nullable=True),
        sa.Column("sc_path", sa.String(255), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("review_status", sa.String(16), nullable=False),
        sa.Column("review_updated_at", sa.DateTime(), nullable=True),
        sa.Column("forward_status", sa.String(16), nullable=False),
        sa.Column("forward_attempts", sa.Integer(), nullable=False),
        sa.Column("forward_next_at", sa.Float(), nullable=True),
        sa.Column("forward_error", sa.String(500), nullable=True),
    )
    for col in ("study_instance_uid", "patient_id", "study_date", "category", "flag", "forward_status"):
        op.create_index(f"ix_results_{col}", "results", [col])


def downgrade() -> None:
    op.drop_table("results")
    op.drop_table("jobs")
