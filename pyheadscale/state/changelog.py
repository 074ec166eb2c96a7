"""The change log that keeps several instances' memories equal (PostgreSQL only).

Every committed write appends one `cluster_changes` row naming the rows it touched and sends
its id on the NOTIFY channel, in the same transaction. Appending takes a transaction-level
advisory lock first and holds it to the commit, so ids are handed out in commit order: a reader
that has seen id N has seen every change before it, and catching up is "everything after the
last id applied" (a lost notification loses nothing).

A write of the tailnet also checks, under that lock, that this instance has applied every
change before it (`Stale` otherwise: the write is re-run once memory has caught up). So each
write is validated against memory that reflects every earlier commit of every instance, which
is what keeps addresses, given names and single-use keys unique across instances.

The functions are synchronous and run on the tailnet's database thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlmodel import Session, col

from pyheadscale.db.cluster import ClusterChange, ClusterPresence, ClusterState

CHANNEL = "pyheadscale_changes"
# pg_advisory_xact_lock key of the append lock (any fixed 64-bit value; "pyhs-log").
APPEND_LOCK = 0x7079_6873_2D6C_6F67
ALL: tuple[()] = ()  # a table touched as a whole (its readers reload all of it)


class Stale(Exception):
    """Another instance committed a change this one has not applied yet."""


@dataclass
class Touched:
    """The rows one transaction touched: table -> ids (or keys); None means the whole table."""

    tables: dict[str, set[Any] | None] = field(default_factory=dict)

    def add(self, table: str, key: Any = None) -> None:
        if table in self.tables and self.tables[table] is None:
            return
        if key is None:
            self.tables[table] = None
        else:
            self.tables.setdefault(table, set()).add(key)  # type: ignore[union-attr]

    def merge(self, rows: dict[str, Any] | None) -> None:
        for table, keys in (rows or {}).items():
            if not isinstance(table, str):
                continue
            if not isinstance(keys, list) or not keys:
                self.add(table)
            else:
                for k in keys:
                    self.add(table, k)

    def encode(self) -> dict[str, list[Any]]:
        return {t: sorted(keys, key=str) if keys is not None else list(ALL)
                for t, keys in self.tables.items()}

    def __bool__(self) -> bool:
        return bool(self.tables)

    def ids(self, table: str) -> set[Any] | None:
        """The keys touched in `table` (None: all of it; empty: none)."""
        if table not in self.tables:
            return set()
        return self.tables[table]


class ChangeLog:
    """This instance's side of the log: its id and how far it has applied the log."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.applied = 0  # id of the last change applied to memory

    def begin(self, s: Session, *, check: bool) -> None:
        """Take the append lock; with `check`, raise Stale if a change is not applied yet."""
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": APPEND_LOCK})
        if check:
            newer = s.execute(select(col(ClusterChange.id)).where(
                col(ClusterChange.id) > self.applied).limit(1)).first()
            if newer is not None:
                raise Stale()

    def append(self, s: Session, touched: Touched) -> int:
        row = ClusterChange(instance=self.instance_id, created_at=datetime.now(UTC),
                            rows=touched.encode())
        s.add(row)
        s.flush()
        cid = int(row.id or 0)
        s.execute(text("SELECT pg_notify(:c, :p)"), {"c": CHANNEL, "p": str(cid)})
        return cid


def append_external(s: Session, source: str, touched: Touched) -> int:
    """Log a write made outside any running instance (the CLI's direct database access)."""
    log = ChangeLog(source)
    log.begin(s, check=False)
    return log.append(s, touched)


def set_presence(s: Session, node_id: int, instance_id: str, capver: int,
                 at: datetime) -> None:
    """This instance now holds the node's map session (taking it over from any other)."""
    stmt = pg_insert(ClusterPresence).values(node_id=node_id, instance_id=instance_id,
                                             capver=capver, since=at)
    s.execute(stmt.on_conflict_do_update(
        index_elements=["node_id"],
        set_={"instance_id": instance_id, "capver": capver, "since": at}))


def clear_presence(s: Session, node_ids: Iterable[int], instance_id: str) -> None:
    """The sessions this instance held for these nodes ended (another's are left alone)."""
    ids = list(node_ids)
    if ids:
        s.execute(delete(ClusterPresence).where(
            col(ClusterPresence.node_id).in_(ids),
            col(ClusterPresence.instance_id) == instance_id))


@dataclass(frozen=True)
class Entry:
    id: int
    instance: str
    rows: dict[str, Any]


def entries_after(s: Session, after: int, limit: int) -> list[Entry]:
    cid = col(ClusterChange.id)
    res = s.execute(select(cid, col(ClusterChange.instance), col(ClusterChange.rows))
                    .where(cid > after).order_by(cid).limit(limit))
    return [Entry(int(i), str(inst), r if isinstance(r, dict) else {}) for i, inst, r in res]


def last_id(s: Session) -> int:
    return int(s.execute(text("SELECT COALESCE(MAX(id), 0) FROM cluster_changes")).scalar_one())


def put_shared(s: Session, key: str, value: Any) -> None:
    """Set a shared value (the caller's transaction logs it: touch cluster_state/key)."""
    stmt = pg_insert(ClusterState).values(key=key, value=value, updated_at=datetime.now(UTC))
    s.execute(stmt.on_conflict_do_update(
        index_elements=["key"], set_={"value": stmt.excluded.value,
                                      "updated_at": stmt.excluded.updated_at}))


def read_shared(s: Session, key: str) -> Any:
    row = s.get(ClusterState, key)
    return row.value if row is not None else None
