"""Create the labelling_task queue and labelling_assignment (leases, labels, skips).

New tables only, so nothing needs SQLite's batch (copy-and-move) mode; later changes to these
tables go through ``op.batch_alter_table`` like every other migration.

Revision ID: 0002 Revises: 0001
Create Date: 2025-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "labelling_task",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("task_key", sa.Text(), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("completions", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("labels", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.current_timestamp(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name="pk_labelling_task"),
        sa.UniqueConstraint("task_key", name="uq_labelling_task_task_key"),
    )
    op.create_index("ix_labelling_task_labels_id", "labelling_task", ["labels", "id"])
    op.create_table(
        "labelling_assignment",
        sa.Column("task_id", _ID, nullable=False),
        sa.Column("annotator_id", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("assigned_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("feedback_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("task_id", "annotator_id", name="pk_labelling_assignment"),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["labelling_task.id"],
            name="fk_labelling_assignment_task_id_labelling_task",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(
            "state IN ('assigned', 'labelled', 'skipped')", name="ck_labelling_assignment_state"
        ),
    )
    op.create_index(
        "ix_labelling_assignment_annotator_id_state",
        "labelling_assignment",
        ["annotator_id", "state"],
    )


def downgrade() -> None:
    op.drop_index("ix_labelling_assignment_annotator_id_state", table_name="labelling_assignment")
    op.drop_table("labelling_assignment")
    op.drop_index("ix_labelling_task_labels_id", table_name="labelling_task")
    op.drop_table("labelling_task")
