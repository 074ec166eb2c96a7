"""Headscale 0.30's v2-API schema: OAuth clients and tokens, key description/revocation.

- pre_auth_keys.description (a label set through the v2 API) and pre_auth_keys.revoked (a
  v2 DELETE soft-revokes: the key stays listed as invalid until it is reaped);
- api_keys.user_id: the user an API key acts for (v2 creates untagged auth keys for it);
- oauth_clients and oauth_access_tokens, laid out as Headscale 0.30's schema.sql (public id or
  prefix plus an Argon2id hash of the secret; scopes and tags as JSON text).

New columns are plain ALTER TABLE ADD COLUMN on both backends, so no table is rebuilt. What
already exists is left alone, so a database that Headscale's development line already gave
these tables and columns is adopted as it is.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 00:00:00
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out here (not imported from models) so this revision never changes.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    insp = sa.inspect(op.get_bind())
    tables = set(insp.get_table_names())

    def add(table: str, column: sa.Column[Any]) -> None:
        if column.name not in {c["name"] for c in insp.get_columns(table)}:
            op.add_column(table, column)

    add("pre_auth_keys", sa.Column("description", sa.Text(), nullable=True))
    add("pre_auth_keys", sa.Column("revoked", TS, nullable=True))
    add("api_keys", sa.Column("user_id", ID, nullable=True))
    if "oauth_clients" not in tables:
        _create_clients()
    if "oauth_access_tokens" not in tables:
        _create_tokens()


def _create_clients() -> None:
    op.create_table(
        "oauth_clients",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("client_id", sa.Text()),
        sa.Column("secret_hash", sa.LargeBinary()),
        sa.Column("scopes", sa.Text()),
        sa.Column("tags", sa.Text()),
        sa.Column("description", sa.Text()),
        sa.Column("user_id", ID),
        sa.Column("created_at", TS),
        sa.Column("revoked", TS),
        sqlite_autoincrement=True,
    )
    op.create_index("idx_oauth_clients_client_id", "oauth_clients", ["client_id"], unique=True)


def _create_tokens() -> None:
    op.create_table(
        "oauth_access_tokens",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("prefix", sa.Text()),
        sa.Column("hash", sa.LargeBinary()),
        sa.Column("client_id", sa.Text()),
        sa.Column("scopes", sa.Text()),
        sa.Column("tags", sa.Text()),
        sa.Column("expiration", TS),
        sa.Column("created_at", TS),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "idx_oauth_access_tokens_prefix", "oauth_access_tokens", ["prefix"], unique=True
    )


def downgrade() -> None:
    op.drop_index("idx_oauth_access_tokens_prefix", table_name="oauth_access_tokens")
    op.drop_table("oauth_access_tokens")
    op.drop_index("idx_oauth_clients_client_id", table_name="oauth_clients")
    op.drop_table("oauth_clients")
    op.drop_column("api_keys", "user_id")
    op.drop_column("pre_auth_keys", "revoked")
    op.drop_column("pre_auth_keys", "description")
