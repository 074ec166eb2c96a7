"""Where the API (and `policy ... --bypass-...`) reads and writes the policy text.

Database mode keeps every version as a row of `policies` (the newest live row is current,
as Headscale does); file mode reads `policy.path` and refuses writes. Validation uses the real
policy engine. In the server, validation, storage and the live swap belong to the control
plane's PolicyController; the synchronous helpers here serve GET (which needs the row's
update time) and the CLI's bypass mode, which opens the database without a server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlmodel import Session

from pyheadscale.db import models as db

ERR_UPDATE_DISABLED = "update is disabled for modes other than 'database'"
ERR_NOT_FOUND = "acl policy not found"


class PolicyNotFound(LookupError):
    pass


class PolicyUpdateDisabled(PermissionError):
    pass


class PolicyReadError(OSError):
    pass


@dataclass(frozen=True)
class StoredPolicy:
    data: str
    updated_at: datetime | None


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


# --- synchronous DB access (run in a thread by the server; directly by the CLI bypass) -------


def load_latest(engine: Engine) -> StoredPolicy:
    with Session(engine) as s:
        row = s.execute(
            select(db.Policy).where(db.Policy.deleted_at.is_(None))  # type: ignore[union-attr]
            .order_by(db.Policy.id.desc()).limit(1)  # type: ignore[union-attr]
        ).scalars().first()
        if row is None:
            raise PolicyNotFound(ERR_NOT_FOUND)
        return StoredPolicy(row.data or "", _aware(row.updated_at))


def insert(engine: Engine, data: str) -> StoredPolicy:
    now = datetime.now(UTC)
    with Session(engine) as s, s.begin():
        row = db.Policy(data=data, created_at=now, updated_at=now)
        s.add(row)
        s.flush()
        return StoredPolicy(row.data, _aware(row.updated_at) or now)


def read_file(path: str | Path | None) -> StoredPolicy:
    p = Path(path) if path else Path("")
    try:
        data = p.read_text()
        mtime = datetime.fromtimestamp(p.stat().st_mtime, UTC)
    except OSError as e:
        raise PolicyReadError(f"reading policy from path {str(p.absolute())!r}: {e}") from None
    return StoredPolicy(data, mtime)


# --- the server side --------------------------------------------------------------------------


class PolicyService:
    """API view of the running policy: reads with their update time; validation, storage and
    the live swap go through the control plane's PolicyController (control.policy)."""

    def __init__(self, control: Any) -> None:
        self.control = control

    @property
    def _cfg(self) -> Any:
        return self.control.cfg

    @property
    def _ctl(self) -> Any:
        return self.control.policy

    @property
    def mode(self) -> str:
        return str(getattr(self._ctl, "mode", None) or self._cfg.policy.mode or "file")

    async def get(self) -> StoredPolicy:
        if self.mode == "database":
            return await asyncio.to_thread(load_latest, self.control.tailnet.engine)
        return await asyncio.to_thread(read_file, self._cfg.policy.path)

    def tag_exists(self, tag: str) -> bool:
        manager = getattr(self._ctl, "manager", None)
        return manager is not None and bool(manager.tag_exists(tag))

    def tag_owned_by_tags(self, tag: str, owner_tags: Sequence[str]) -> bool:
        if tag in owner_tags:  # a held tag needs no policy
            return True
        manager = getattr(self._ctl, "manager", None)
        return manager is not None and bool(manager.tag_owned_by_tags(tag, owner_tags))

    async def check(self, text: str) -> None:
        await asyncio.to_thread(self._ctl.check, text)

    async def set(self, text: str) -> StoredPolicy:
        if self.mode != "database":
            raise PolicyUpdateDisabled(ERR_UPDATE_DISABLED)
        manager = self._ctl.build(text, run_tests=True)
        nodes = self.control.tailnet.list_nodes()
        if manager is not None and nodes:
            manager.ssh_policy(nodes[0])  # Headscale rejects SSH rules that fail to compile
        try:
            row = await self._ctl.set(text)
        except Exception as e:
            if type(e).__name__ == "PolicyUpdateDisabled":
                raise PolicyUpdateDisabled(ERR_UPDATE_DISABLED) from None
            raise
        return StoredPolicy(row.data or "", _aware(row.updated_at) or datetime.now(UTC))
