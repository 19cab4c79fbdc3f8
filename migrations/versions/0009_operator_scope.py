"""the `operator` scope: existing admin keys of the default tenant keep administering every
tenant (`admin` alone is bounded to its own tenant from now on)

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29 10:10:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ORDER = ("read", "write", "admin", "operator")

api_keys = sa.table(
    "api_keys",
    sa.column("id", sa.String),
    sa.column("tenant_id", sa.String),
    sa.column("scopes", sa.JSON),
)


def _rewrite(change: str) -> None:
    """Add (`change` == "add") `operator` to the default tenant's admin keys, or take it
    back (`remove`), leaving `admin`."""
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(api_keys.c.id, api_keys.c.scopes).where(api_keys.c.tenant_id == "default")
    ).all()
    for key_id, scopes in rows:
        have = set(scopes or [])
        if change == "add" and "admin" in have:
            have.add("operator")
        elif change == "remove" and "operator" in have:
            have.discard("operator")
            have.add("admin")  # before this revision, admin meant every tenant
        else:
            continue
        new = [s for s in ORDER if s in have]
        if new != list(scopes):
            conn.execute(api_keys.update().where(api_keys.c.id == key_id).values(scopes=new))


def upgrade() -> None:
    _rewrite("add")


def downgrade() -> None:
    _rewrite("remove")
