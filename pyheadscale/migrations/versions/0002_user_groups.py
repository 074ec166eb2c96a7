"""users.idp_groups: the groups claim of a user's last OIDC login (pyheadscale-only).

A nullable TEXT column holding a JSON list of strings. Headscale's GORM models do not name it,
so Headscale ignores it; rows Headscale wrote read as "no groups". Added and dropped with plain
ALTER TABLE on both backends (SQLite >= 3.35 drops columns natively), so the users table is
never rebuilt and its partial unique indexes stay exactly as Headscale created them.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("idp_groups", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("users", "idp_groups")
