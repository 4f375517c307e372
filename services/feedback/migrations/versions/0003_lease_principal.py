"""Record the API key that took each task lease, so the per-key lease limit holds across every
process sharing the database (issue 17 item 3).

Revision ID: 0003 Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("labelling_assignment") as batch:
        batch.add_column(sa.Column("principal", sa.Text(), nullable=True))
        batch.create_index(
            "ix_labelling_assignment_principal_state", ["principal", "state"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("labelling_assignment") as batch:
        batch.drop_index("ix_labelling_assignment_principal_state")
        batch.drop_column("principal")
