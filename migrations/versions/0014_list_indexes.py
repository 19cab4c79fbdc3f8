"""indexes for the job list: a tenant's jobs newest first, by status and by dataset

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-28 22:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# `GET /v1/jobs` filters on the tenant (and a status or a dataset) and orders by
# (created_at DESC, id): each index answers one such page, and its count, from the index,
# in the page's own order (no sort step, also in PostgreSQL).
NEWEST = sa.text("created_at DESC")
INDEXES = {
    "ix_jobs_tenant_created": ["tenant_id", NEWEST, "id"],
    "ix_jobs_tenant_status_created": ["tenant_id", "status", NEWEST, "id"],
    "ix_jobs_tenant_dataset_created": ["tenant_id", "dataset_id", NEWEST, "id"],
}


def upgrade() -> None:
    for name, columns in INDEXES.items():
        op.create_index(name, "jobs", columns)


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="jobs")
