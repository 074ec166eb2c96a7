"""Initial schema: Headscale 0.29's tables.

Hand-written to match Headscale v0.29.2's hscontrol/db/schema.sql on SQLite (and what GORM
creates on PostgreSQL): users, pre_auth_keys, api_keys, nodes, policies, database_versions,
plus gormigrate's `migrations` bookkeeping table.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Types are spelled out here (not imported from models) so this revision never changes.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)  # DATETIME on SQLite, timestamptz on PostgreSQL
BOOL = sa.Boolean().with_variant(sa.NUMERIC(), "sqlite")  # Headscale: numeric on SQLite


def upgrade() -> None:
    op.create_table(
        "migrations",
        sa.Column("id", sa.Text().with_variant(sa.String(255), "postgresql"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )

    op.create_table(
        "users",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("name", sa.Text()),
        sa.Column("display_name", sa.Text()),
        sa.Column("email", sa.Text()),
        sa.Column("provider_identifier", sa.Text()),
        sa.Column("provider", sa.Text()),
        sa.Column("profile_pic_url", sa.Text()),
        sa.Column("created_at", TS),
        sa.Column("updated_at", TS),
        sa.Column("deleted_at", TS),
        sqlite_autoincrement=True,
    )
    op.create_index("idx_users_deleted_at", "users", ["deleted_at"])
    op.create_index(
        "idx_provider_identifier",
        "users",
        ["provider_identifier"],
        unique=True,
        sqlite_where=sa.text("provider_identifier IS NOT NULL"),
        postgresql_where=sa.text("provider_identifier IS NOT NULL"),
    )
    op.create_index(
        "idx_name_provider_identifier", "users", ["name", "provider_identifier"], unique=True
    )
    op.create_index(
        "idx_name_no_provider_identifier",
        "users",
        ["name"],
        unique=True,
        sqlite_where=sa.text("provider_identifier IS NULL"),
        postgresql_where=sa.text("provider_identifier IS NULL"),
    )

    op.create_table(
        "pre_auth_keys",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("key", sa.Text()),
        sa.Column("prefix", sa.Text()),
        sa.Column("hash", sa.LargeBinary()),
        sa.Column("user_id", ID),
        sa.Column("reusable", BOOL),
        sa.Column("ephemeral", BOOL, server_default=sa.text("false")),
        sa.Column("used", BOOL, server_default=sa.text("false")),
        sa.Column("tags", sa.Text()),
        sa.Column("expiration", TS),
        sa.Column("created_at", TS),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_pre_auth_keys_user", ondelete="SET NULL"
        ),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "idx_pre_auth_keys_prefix",
        "pre_auth_keys",
        ["prefix"],
        unique=True,
        sqlite_where=sa.text("prefix IS NOT NULL AND prefix != ''"),
        postgresql_where=sa.text("prefix IS NOT NULL AND prefix != ''"),
    )

    op.create_table(
        "api_keys",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("prefix", sa.Text()),
        sa.Column("hash", sa.LargeBinary()),
        sa.Column("expiration", TS),
        sa.Column("last_seen", TS),
        sa.Column("created_at", TS),
        sqlite_autoincrement=True,
    )
    op.create_index("idx_api_keys_prefix", "api_keys", ["prefix"], unique=True)

    op.create_table(
        "nodes",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("machine_key", sa.Text()),
        sa.Column("node_key", sa.Text()),
        sa.Column("disco_key", sa.Text()),
        sa.Column("endpoints", sa.Text()),
        sa.Column("host_info", sa.Text()),
        sa.Column("ipv4", sa.Text()),
        sa.Column("ipv6", sa.Text()),
        sa.Column("hostname", sa.Text()),
        sa.Column("given_name", sa.String(63)),
        sa.Column("user_id", ID),
        sa.Column("register_method", sa.Text()),
        sa.Column("tags", sa.Text()),
        sa.Column("auth_key_id", ID),
        sa.Column("last_seen", TS),
        sa.Column("expiry", TS),
        sa.Column("approved_routes", sa.Text()),
        sa.Column("created_at", TS),
        sa.Column("updated_at", TS),
        sa.Column("deleted_at", TS),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_nodes_user", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["auth_key_id"], ["pre_auth_keys.id"], name="fk_nodes_auth_key"),
        sqlite_autoincrement=True,
    )

    op.create_table(
        "policies",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("data", sa.Text()),
        sa.Column("created_at", TS),
        sa.Column("updated_at", TS),
        sa.Column("deleted_at", TS),
        sqlite_autoincrement=True,
    )
    op.create_index("idx_policies_deleted_at", "policies", ["deleted_at"])

    op.create_table(
        "database_versions",
        sa.Column("id", ID, primary_key=True),
        sa.Column("version", sa.Text(), nullable=False),
        sa.Column("updated_at", TS),
    )


def downgrade() -> None:
    op.drop_table("database_versions")
    op.drop_index("idx_policies_deleted_at", table_name="policies")
    op.drop_table("policies")
    op.drop_table("nodes")
    op.drop_index("idx_api_keys_prefix", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_index("idx_pre_auth_keys_prefix", table_name="pre_auth_keys")
    op.drop_table("pre_auth_keys")
    op.drop_index("idx_name_no_provider_identifier", table_name="users")
    op.drop_index("idx_name_provider_identifier", table_name="users")
    op.drop_index("idx_provider_identifier", table_name="users")
    op.drop_index("idx_users_deleted_at", table_name="users")
    op.drop_table("users")
    op.drop_table("migrations")
