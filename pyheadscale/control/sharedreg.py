"""Pending interactive registrations every instance knows (cluster mode).

A registration is opened on one instance (the client's register request), waited on by the
client's Followup request (which the load balancer may send to another), and completed on a
third (`headscale auth register` on any instance's socket, or an OIDC login). So each open
registration is also a `cluster_registrations` row: the change log makes every instance mirror
it in its own `PendingRegistrations`, and completing, rejecting or discarding it on one
instance resolves the mirrors (a waiting client is answered wherever it waits). Alone, the
class is `PendingRegistrations` with two no-op awaits.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select
from sqlmodel import Session, col

from pyheadscale.auth.webflow import (
    AuthIDs,
    Pending,
    PendingRegistrations,
    RegistrationRefused,
    UnknownAuthID,
    refusal,
)
from pyheadscale.db.cluster import ClusterRegistration
from pyheadscale.gojson import DecodeError
from pyheadscale.hostinfo import decode_hostinfo
from pyheadscale.state import persist
from pyheadscale.state.errors import PersistError
from pyheadscale.state.model import Node
from pyheadscale.state.tailnet import Tailnet
from pyheadscale.tailcfg import KeyKind, KeyParseError, encode_key, parse_key

log = logging.getLogger("pyheadscale.auth")
TABLE = "cluster_registrations"


def _row_values(p: Pending, expiration_s: float) -> dict[str, Any]:
    now = datetime.fromtimestamp(p.opened, UTC)  # mirrored as `opened`: the same order
    return {"machine_key": encode_key(KeyKind.MACHINE, p.machine_key),
            "data": {"node_key": encode_key(KeyKind.NODE, p.node_key),
                     # Already decoded and capped by add() on this instance.
                     "hostinfo": p.hostinfo,
                     "expiry": p.expiry.isoformat() if p.expiry else None,
                     "ephemeral": p.ephemeral, "capver": p.capver},
            "created_at": now, "expires_at": now + timedelta(seconds=expiration_s),
            "node_id": None, "error": None}


def _read(engine: Engine, keys: set[str] | None) -> list[ClusterRegistration]:
    with Session(engine) as s:
        # Oldest first: mirrored in this order, a machine's newest URL is its newest here too.
        q = select(ClusterRegistration).order_by(col(ClusterRegistration.created_at))
        if keys is not None:
            q = q.where(col(ClusterRegistration.auth_id).in_(sorted(keys)))
        return list(s.execute(q).scalars())


class SharedPending(PendingRegistrations):
    def __init__(self, expiration_s: float, max_entries: int, tailnet: Tailnet, *,
                 per_source: int = 16, per_machine: int = 4, hostinfo_budget: int = 8 << 20,
                 rate: float = 1.0, burst: int = 20) -> None:
        super().__init__(expiration_s, max_entries, per_source=per_source,
                         per_machine=per_machine, hostinfo_budget=hostinfo_budget, rate=rate,
                         burst=burst)
        self.tailnet = tailnet
        self.shared = tailnet.changelog is not None
        self._tasks: set[asyncio.Task[Any]] = set()
        if self.shared:
            tailnet.on_table(TABLE, lambda keys: self._spawn(self._mirror(keys)))

    # --- writes the other instances hear of ---------------------------------------------

    async def publish(self, p: Pending) -> None:
        """Make a newly opened registration known to every instance (before its AuthURL
        goes out, so a Followup may land anywhere)."""
        if not self.shared:
            return
        vals = _row_values(p, self.expiration_s)

        def upsert(tx: persist.Tx) -> None:
            row = tx.s.get(ClusterRegistration, p.auth_id)
            if row is None:
                tx.s.add(ClusterRegistration(auth_id=p.auth_id, **vals))
            else:
                for k, v in vals.items():
                    setattr(row, k, v)
            tx.touch(TABLE, p.auth_id)

        try:
            await self.tailnet.run_in_tx(upsert)
        except PersistError as e:  # still usable on this instance
            log.warning("registration %s not shared with the other instances: %s",
                        p.auth_id, e)

    def complete(self, auth_id: str, result: Any) -> AuthIDs:
        closed = super().complete(auth_id, result)
        if self.shared and isinstance(result, Node):
            for a in closed:  # the machine's other URLs too: their waiters may be elsewhere
                self._spawn(self._resolve(a, node_id=result.id))
        return closed

    def reject(self, auth_id: str, reason: str) -> AuthIDs:
        closed = super().reject(auth_id, reason)
        if self.shared:
            for a in closed:
                self._spawn(self._resolve(a, error=reason))
        return closed

    def discard(self, auth_id: str) -> None:
        super().discard(auth_id)
        if self.shared:
            self._spawn(self._resolve(auth_id, drop=True))

    async def _resolve(self, auth_id: str, *, node_id: int | None = None,
                       error: str | None = None, drop: bool = False) -> None:
        def tx_fn(tx: persist.Tx) -> None:
            row = tx.s.get(ClusterRegistration, auth_id)
            if row is None:
                return
            if drop:
                tx.s.delete(row)
            else:
                row.node_id, row.error = node_id, error
            tx.touch(TABLE, auth_id)

        try:
            await self.tailnet.run_in_tx(tx_fn)
        except PersistError as e:
            log.warning("registration %s: the other instances were not told: %s", auth_id, e)

    # --- reads ---------------------------------------------------------------------------

    async def fetch(self, auth_id: str) -> Pending:
        """The registration, from this instance or (not mirrored yet) the database."""
        try:
            return self.get(auth_id)
        except UnknownAuthID:
            if not self.shared:
                raise
        try:
            await self._mirror({auth_id})
        except Exception as e:  # the database is away: unknown here
            log.warning("registration %s: not found locally, database unavailable: %s",
                        auth_id, e)
        return self.get(auth_id)

    async def _mirror(self, keys: set[str] | None) -> None:
        rows = await asyncio.to_thread(_read, self.tailnet.engine, keys)
        seen = set()
        now = datetime.now(UTC)
        for row in rows:
            seen.add(row.auth_id)
            self._mirror_row(row, now)
        for auth_id in (keys or set()) - seen:
            # Discarded elsewhere (an approval without a user, a Followup timing out there):
            # its client starts over. Not while this instance decides the machine's login:
            # the decision answers the URL (a node, not a new URL for a login just done).
            local = self._local(auth_id)
            if local is not None and not self.is_deciding(local):
                super().discard(auth_id)

    def _mirror_row(self, row: ClusterRegistration, now: datetime) -> None:
        # A decision made elsewhere closes this URL only: the deciding instance wrote a row
        # for every URL of the machine it closed (all it knew, opened no later than the one
        # it registered). A newer URL it had not seen yet stays open here, whatever the
        # instances' clocks say: its client waits on it, for a login still to come.
        local = self._local(row.auth_id)
        if row.node_id is not None:
            node = self.tailnet.nodes.get(row.node_id)
            if local is not None and node is not None:
                self._settle(row.auth_id, lambda f: f.set_result(node), whole_login=False)
            return
        if row.error is not None:
            if local is not None:
                self._settle(row.auth_id, refusal(row.error), whole_login=False)
            return
        if local is not None or row.expires_at is None or row.expires_at <= now:
            return
        data = row.data or {}
        try:
            mk = parse_key(KeyKind.MACHINE, row.machine_key or "")
            nk = parse_key(KeyKind.NODE, str(data.get("node_key") or ""))
            expiry = (datetime.fromisoformat(data["expiry"]) if data.get("expiry") else None)
        except (KeyParseError, ValueError, TypeError):
            log.warning("registration %s: unreadable shared row ignored", row.auth_id)
            return
        # The writer stored the decoded, capped form, but a row is still input from outside
        # this process: the same typed decoder and caps, leniently (drop what fails), as for
        # stored nodes. No source: the quota and rate were charged where the client asked.
        try:
            hostinfo = decode_hostinfo(data.get("hostinfo"), lenient=True)
            capver = data.get("capver") or 0
            if not isinstance(capver, int) or isinstance(capver, bool):
                raise TypeError("capver")
            opened = (row.created_at or now).timestamp()
            self.add(row.auth_id, machine_key=mk, node_key=nk, hostinfo=hostinfo,
                     expiry=expiry, ephemeral=data.get("ephemeral") is True, capver=capver,
                     opened=opened)
        except (DecodeError, TypeError) as e:
            log.warning("registration %s: unreadable shared row ignored: %s", row.auth_id, e)
        except RegistrationRefused as e:
            log.warning("registration %s: not mirrored here: %s", row.auth_id, e)

    def _local(self, auth_id: str) -> Pending | None:
        try:
            return self.get(auth_id)
        except UnknownAuthID:
            return None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
