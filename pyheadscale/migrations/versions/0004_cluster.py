"""pyheadscale-only tables for several instances on one PostgreSQL database.

- cluster_changes: the change log. Every committed write appends one row naming the rows it
  touched, in the same transaction; the other instances read the log in id order and reload
  those rows into memory.
- cluster_instances: the running instances (heartbeat, how far each has read the log, what its
  embedded relay offers to the DERP map and the relay mesh).
- cluster_presence: which instance holds each connected node's map session (a node is online
  while it has a row here), with the node's capability version.
- cluster_state: small shared values the leader sets (primary routes, relay mesh key).
- cluster_registrations: interactive registrations waiting for approval, so a client's
  follow-up or the admin's approval may reach any instance.

SQLite (one instance) creates the tables too, so a database can move between backends, but
never writes them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out here (not imported from models) so this revision never changes.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "cluster_changes",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("instance", sa.Text(), nullable=False),
        sa.Column("created_at", TS),
        sa.Column("rows", sa.Text()),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "cluster_instances",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("name", sa.Text()),
        sa.Column("started_at", TS),
        sa.Column("heartbeat_at", TS),
        sa.Column("applied_id", ID),
        sa.Column("info", sa.Text()),
    )
    op.create_table(
        "cluster_presence",
        sa.Column("node_id", ID,
                  sa.ForeignKey("nodes.id", name="fk_cluster_presence_node", ondelete="CASCADE"),
                  primary_key=True, autoincrement=False),
        sa.Column("instance_id", sa.Text(), nullable=False),
        sa.Column("capver", sa.Integer()),
        sa.Column("since", TS),
    )
    op.create_index("idx_cluster_presence_instance", "cluster_presence", ["instance_id"])
    op.create_table(
        "cluster_state",
        sa.Column("key", sa.Text(), primary_key=True),
        sa.Column("value", sa.Text()),
        sa.Column("updated_at", TS),
    )
    op.create_table(
        "cluster_registrations",
        sa.Column("auth_id", sa.Text(), primary_key=True),
        sa.Column("machine_key", sa.Text()),
        sa.Column("data", sa.Text()),
        sa.Column("created_at", TS),
        sa.Column("expires_at", TS),
        sa.Column("node_id", ID),
        sa.Column("error", sa.Text()),
    )


def downgrade() -> None:
    op.drop_table("cluster_registrations")
    op.drop_table("cluster_state")
    op.drop_index("idx_cluster_presence_instance", table_name="cluster_presence")
    op.drop_table("cluster_presence")
    op.drop_table("cluster_instances")
    op.drop_table("cluster_changes")
