"""partial index for the reaper's checkpoint sweep (ended jobs still holding checkpoints)

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28 16:05:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHERE = sa.text("checkpoint_key IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "ix_jobs_with_checkpoint",
        "jobs",
        ["status"],
        postgresql_where=WHERE,
        sqlite_where=WHERE,
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_with_checkpoint", table_name="jobs")
