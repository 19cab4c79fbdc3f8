"""the bytes a dataset takes in the object store, which the storage quota charges

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 10:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch_op:
        batch_op.add_column(
            sa.Column("stored_bytes", sa.BigInteger(), nullable=False, server_default="0")
        )
    # The stored size of existing datasets is not known without reading the store; what
    # they were charged until now (the upload's size) is the closest value at hand.
    op.execute("UPDATE datasets SET stored_bytes = size_bytes")


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch_op:
        batch_op.drop_column("stored_bytes")
