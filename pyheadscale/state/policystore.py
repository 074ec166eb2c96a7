"""Where the policy text lives: the `policies` table (database mode) or `policy.path` (file
mode). The server's PolicyController, the REST API (through it) and the CLI's
`--bypass-server-and-access-database-directly` all read and write it here, so they agree on
what the current policy is.

Database mode keeps every version as a row; the current policy is the newest row that is not
soft-deleted (Headscale's `deleted_at IS NULL`). File mode reads the file and refuses writes.
The functions are synchronous; the server runs them in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, select
from sqlmodel import Session

from pyheadscale.config import PolicyConfig
from pyheadscale.db import models as db
from pyheadscale.state.changelog import append_external
from pyheadscale.state.persist import Tx

ERR_UPDATE_DISABLED = "update is disabled for modes other than 'database'"
ERR_NOT_FOUND = "acl policy not found"


class PolicyNotFound(LookupError):
    """Database mode and no policy has been stored yet."""


class PolicyUpdateDisabled(PermissionError):
    """A write in file mode (the file is the policy; edit it and send SIGHUP)."""

    def __init__(self) -> None:
        super().__init__(ERR_UPDATE_DISABLED)


class PolicyReadError(OSError):
    """The policy file cannot be read."""


@dataclass(frozen=True)
class StoredPolicy:
    data: str
    updated_at: datetime | None


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def load_latest(engine: Engine) -> StoredPolicy:
    """The current stored policy; PolicyNotFound when there is none."""
    with Session(engine) as s:
        row = s.execute(
            select(db.Policy).where(db.Policy.deleted_at.is_(None))  # type: ignore[union-attr]
            .order_by(db.Policy.id.desc()).limit(1)  # type: ignore[union-attr]
        ).scalars().first()
        if row is None:
            raise PolicyNotFound(ERR_NOT_FOUND)
        return StoredPolicy(row.data or "", _aware(row.updated_at))


def insert_tx(tx: Tx, data: str) -> StoredPolicy:
    """Store a new version in `tx`; it becomes the current policy."""
    now = datetime.now(UTC)
    tx.insert(db.Policy, {"data": data, "created_at": now, "updated_at": now})
    return StoredPolicy(data, now)


def insert(engine: Engine, data: str) -> StoredPolicy:
    """Store a new version from outside a running server (the CLI's direct access); on
    PostgreSQL the change log tells running instances to load it."""
    with Session(engine) as s, s.begin():
        tx = Tx(s)
        stored = insert_tx(tx, data)
        if engine.dialect.name == "postgresql":
            append_external(s, "cli", tx.touched)
        return stored


@dataclass(frozen=True)
class PolicyVersion:
    id: int
    data: str
    updated_at: datetime | None


def history(engine: Engine, limit: int) -> list[PolicyVersion]:
    """Stored versions, newest (the current one) first; soft-deleted rows are not versions."""
    with Session(engine) as s:
        rows = s.execute(
            select(db.Policy).where(db.Policy.deleted_at.is_(None))  # type: ignore[union-attr]
            .order_by(db.Policy.id.desc()).limit(limit)  # type: ignore[union-attr]
        ).scalars().all()
        return [PolicyVersion(r.id or 0, r.data or "", _aware(r.updated_at)) for r in rows]


def version(engine: Engine, version_id: int) -> PolicyVersion | None:
    with Session(engine) as s:
        r = s.get(db.Policy, version_id)
        if r is None or r.deleted_at is not None:
            return None
        return PolicyVersion(r.id or 0, r.data or "", _aware(r.updated_at))


def read_file(path: Path | None) -> StoredPolicy:
    """The policy file with its modification time; PolicyReadError when unreadable."""
    p = path if path is not None else Path("")
    try:
        data = p.read_text(encoding="utf-8")
        mtime = datetime.fromtimestamp(p.stat().st_mtime, UTC)
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyReadError(f"reading policy from path {str(p.absolute())!r}: {e}") from None
    return StoredPolicy(data, mtime)


class PolicyStore:
    """The policy source the configuration names (`policy.mode`, `policy.path`)."""

    def __init__(self, cfg: PolicyConfig, engine: Engine) -> None:
        self.cfg = cfg
        self.engine = engine

    @property
    def mode(self) -> str:
        return self.cfg.mode

    @property
    def path(self) -> Path | None:
        return self.cfg.path

    def get(self) -> StoredPolicy:
        """What `policy get` shows: PolicyNotFound (database) or PolicyReadError (file)."""
        if self.mode == "database":
            return load_latest(self.engine)
        return read_file(self.path)

    def current(self) -> StoredPolicy | None:
        """What the server runs: None for no policy (allow-all), as Headscale does when the
        table is empty or file mode has no path. An unreadable file raises PolicyReadError."""
        if self.mode == "file" and self.path is None:
            return None
        try:
            return self.get()
        except PolicyNotFound:
            return None

    def history(self, limit: int) -> list[PolicyVersion]:
        """Earlier versions (database mode; file mode keeps none)."""
        return history(self.engine, limit) if self.mode == "database" else []

    def version(self, version_id: int) -> PolicyVersion | None:
        return version(self.engine, version_id) if self.mode == "database" else None

    def put(self, text: str) -> StoredPolicy:
        """Store a new version (database mode only, else PolicyUpdateDisabled)."""
        if self.mode != "database":
            raise PolicyUpdateDisabled()
        return insert(self.engine, text)

    def put_tx(self, tx: Tx, text: str) -> StoredPolicy:
        """put() inside a tailnet transaction (a running server: logged for the others)."""
        if self.mode != "database":
            raise PolicyUpdateDisabled()
        return insert_tx(tx, text)
