"""Per image: series, accession number, SOP class (study grouping, the study SR); scanner; OOD score.

Revision ID: 0003
Revises: 0002
Create Date: 2026-01-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

COLUMNS = (
    ("series_instance_uid", sa.String(64)),
    ("accession_number", sa.String(64)),
    ("sop_class_uid", sa.String(64)),
    ("manufacturer", sa.String(64)),
    ("manufacturer_model_name", sa.String(64)),
    ("ood_score", sa.Float()),
    ("ood_check", sa.String(8)),
    ("scores_json", sa.String(500)),
)


def upgrade() -> None:
    with op.batch_alter_table("results") as batch:
        for name, type_ in COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))
        batch.create_index("ix_results_accession_number", ["accession_number"])


def downgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.drop_index("ix_results_accession_number")
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
