"""Every feedback event names the criterion it judges and may carry its prompt's tags
(issue 18 item 1). Existing rows read back as criterion ``overall`` with no tags.

Revision ID: 0004 Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.add_column(
            sa.Column("criterion", sa.String(32), nullable=False, server_default="overall")
        )
        batch.add_column(sa.Column("tags", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("tags")
        batch.drop_column("criterion")
