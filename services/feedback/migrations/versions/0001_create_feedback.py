"""Create the feedback and feedback_sequence tables.

Revision ID: 0001 Revises:
Create Date: 2025-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", _ID, primary_key=True, autoincrement=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("annotator_id", sa.Text(), nullable=False),
        sa.Column("prompt_hash", sa.String(64), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.current_timestamp(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name="pk_feedback"),
        sa.UniqueConstraint("idempotency_key", name="uq_feedback_idempotency_key"),
        sa.CheckConstraint(
            "kind IN ('comparison', 'ranking', 'rating', 'correction')", name="ck_feedback_kind"
        ),
    )
    op.create_index("ix_feedback_prompt_hash_id", "feedback", ["prompt_hash", "id"])
    op.create_table(
        "feedback_sequence",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_feedback_sequence"),
    )
    op.bulk_insert(
        sa.table(
            "feedback_sequence", sa.column("name", sa.String), sa.column("last_id", sa.BigInteger)
        ),
        [{"name": "feedback", "last_id": 0}],
    )


def downgrade() -> None:
    op.drop_table("feedback_sequence")
    op.drop_index("ix_feedback_prompt_hash_id", table_name="feedback")
    op.drop_table("feedback")
