"""pyheadscale-only tables for several instances on one PostgreSQL database (alembic 0004).

Headscale has no such tables and ignores them. SQLite databases have them too (one schema
for both backends) but a single instance never writes them.
"""

from datetime import datetime
from typing import Any

from sqlalchemy import Column, ForeignKey, Index, Integer, Text
from sqlmodel import Field, SQLModel

from pyheadscale.db.models import (
    _ID,
    JSONText,
    _created_at,
    _id_column,
    _id_ref,
    _table_args,
    _time,
)

__all__ = ["ClusterChange", "ClusterInstance", "ClusterPresence", "ClusterRegistration",
           "ClusterState"]


class ClusterChange(SQLModel, table=True):
    """One committed write: which rows it touched ({table: [ids]}; [] = the whole table)."""

    __tablename__ = "cluster_changes"
    __table_args__ = _table_args()

    id: int | None = Field(default=None, sa_column=_id_column())
    instance: str = Field(sa_column=Column("instance", Text(), nullable=False))
    created_at: datetime | None = _created_at()
    rows: dict[str, Any] | None = Field(default=None, sa_column=Column("rows", JSONText()))


class ClusterInstance(SQLModel, table=True):
    """A running instance: its heartbeat, how far it has read the change log, and what its
    embedded relay offers (DERP node, mesh URL and key)."""

    __tablename__ = "cluster_instances"

    id: str = Field(sa_column=Column("id", Text(), primary_key=True))
    name: str | None = Field(default=None, sa_column=Column("name", Text()))
    started_at: datetime | None = _time("started_at")
    heartbeat_at: datetime | None = _time("heartbeat_at")
    applied_id: int | None = _id_ref("applied_id")
    info: dict[str, Any] | None = Field(default=None, sa_column=Column("info", JSONText()))


class ClusterPresence(SQLModel, table=True):
    """A node's live map session: which instance holds it (online while the row exists)."""

    __tablename__ = "cluster_presence"
    __table_args__ = (Index("idx_cluster_presence_instance", "instance_id"),)

    node_id: int = Field(sa_column=Column(
        "node_id", _ID,
        ForeignKey("nodes.id", name="fk_cluster_presence_node", ondelete="CASCADE"),
        primary_key=True, autoincrement=False))
    instance_id: str = Field(sa_column=Column("instance_id", Text(), nullable=False))
    capver: int | None = Field(default=None, sa_column=Column("capver", Integer()))
    since: datetime | None = _time("since")


class ClusterState(SQLModel, table=True):
    """A small shared value the leader sets (primary routes, the relay mesh key)."""

    __tablename__ = "cluster_state"

    key: str = Field(sa_column=Column("key", Text(), primary_key=True))
    value: Any = Field(default=None, sa_column=Column("value", JSONText()))
    updated_at: datetime | None = _time("updated_at")


class ClusterRegistration(SQLModel, table=True):
    """An interactive registration waiting for approval, visible to every instance."""

    __tablename__ = "cluster_registrations"

    auth_id: str = Field(sa_column=Column("auth_id", Text(), primary_key=True))
    machine_key: str | None = Field(default=None, sa_column=Column("machine_key", Text()))
    data: dict[str, Any] | None = Field(default=None, sa_column=Column("data", JSONText()))
    created_at: datetime | None = _time("created_at")
    expires_at: datetime | None = _time("expires_at")
    node_id: int | None = _id_ref("node_id")
    error: str | None = Field(default=None, sa_column=Column("error", Text()))
