"""the model registry: one row per succeeded job's model (name, version, tags, stage); the jobs
that succeeded before it are registered here, in the order they finished

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 09:00:00

"""

import re
import secrets
import unicodedata
from collections.abc import Sequence
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PRODUCTION = sa.text("stage = 'production'")

jobs = sa.table(
    "jobs",
    sa.column("id", sa.String),
    sa.column("tenant_id", sa.String),
    sa.column("dataset_id", sa.String),
    sa.column("status", sa.String),
    sa.column("created_at", sa.DateTime),
    sa.column("finished_at", sa.DateTime),
)
datasets = sa.table("datasets", sa.column("id", sa.String), sa.column("name", sa.String))


def _name(dataset_name: str) -> str:
    """core.registry.default_name as of this revision (a migration must not change with core)."""
    ascii_name = unicodedata.normalize("NFKD", dataset_name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9._-]+", "-", ascii_name.lower()).strip("._-")
    return slug[:64].rstrip("._-") or "model"


def upgrade() -> None:
    models = op.create_table(
        "models",
        sa.Column("id", sa.String(length=40), primary_key=True),
        sa.Column("tenant_id", sa.String(length=40), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("job_id", sa.String(length=40), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("stage", sa.String(length=20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("job_id"),
        sa.UniqueConstraint("tenant_id", "name", "version", name="uq_models_tenant_name_version"),
    )
    op.create_index(
        "uq_models_one_production",
        "models",
        ["tenant_id", "name"],
        unique=True,
        postgresql_where=PRODUCTION,
        sqlite_where=PRODUCTION,
    )
    conn = op.get_bind()
    succeeded = conn.execute(
        sa.select(
            jobs.c.id, jobs.c.tenant_id, jobs.c.dataset_id, jobs.c.finished_at, datasets.c.name
        )
        .join(datasets, datasets.c.id == jobs.c.dataset_id)
        .where(jobs.c.status == "succeeded")
        .order_by(jobs.c.finished_at, jobs.c.created_at, jobs.c.id)
    ).all()
    versions: dict[tuple[str, str], int] = {}
    rows = []
    now = datetime.now(timezone.utc)
    for job_id, tenant_id, dataset_id, finished_at, dataset_name in succeeded:
        name = _name(dataset_name or dataset_id)
        version = versions[tenant_id, name] = versions.get((tenant_id, name), 0) + 1
        rows.append(
            {
                "id": f"mdl_{secrets.token_hex(12)}",
                "tenant_id": tenant_id,
                "job_id": job_id,
                "name": name,
                "version": version,
                "tags": [],
                "stage": "none",
                "created_at": finished_at or now,
                "updated_at": now,
            }
        )
    if rows:
        op.bulk_insert(models, rows)


def downgrade() -> None:
    op.drop_index("uq_models_one_production", table_name="models")
    op.drop_table("models")
