"""What other instances committed, applied to this one's memory (cluster mode only).

The change log (changelog.py) names the rows each commit touched. Catching up reads the
entries after the last one applied, reloads those rows in the same read, and swaps them into
memory as a local write would: nodes replaced (version bumped when a peer could see the
difference), indices and addresses kept, and the Changes a local write would publish derived
from the difference between the old and the new object. Tables other rooms keep in memory
(the policy, OAuth clients, cluster state, pending registrations, the instance list) go to
their hooks. Catching up holds the write lock, so it never interleaves with a local write.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from sqlalchemy import Engine
from sqlmodel import Session

from pyheadscale.state import persist
from pyheadscale.state.base import TailnetBase
from pyheadscale.state.changelog import Touched, entries_after
from pyheadscale.state.changes import PATCH_FIELDS, Change, ChangeKind, Field
from pyheadscale.state.mapreq import hostinfo_fields
from pyheadscale.state.model import ApiKey, Node, PreAuthKey, User

log = logging.getLogger("pyheadscale.cluster")

BATCH = 500  # change-log entries read per round trip
TableHook = Callable[[set[str] | None], None]  # keys touched (as text), None: all of them

# Node attributes kept in the database and the Field a peer would see change.
_NODE_FIELDS: tuple[tuple[str, Field], ...] = (
    ("endpoints", Field.ENDPOINTS), ("disco_key", Field.DISCO_KEY),
    ("node_key", Field.NODE_KEY), ("expiry", Field.EXPIRY), ("last_seen", Field.LAST_SEEN),
    ("hostname", Field.HOSTNAME), ("given_name", Field.GIVEN_NAME), ("tags", Field.TAGS),
    ("user_id", Field.USER), ("ipv4", Field.ADDRESSES), ("ipv6", Field.ADDRESSES),
    ("approved_routes", Field.APPROVED_ROUTES),
)
_NODE_PERSISTED = ("machine_key", "hostinfo", "register_method", "auth_key_id", "ephemeral",
                   "created_at", "updated_at") + tuple(a for a, _ in _NODE_FIELDS)


def node_diff(old: Node, new: Node) -> frozenset[Field]:
    """What a peer could see change between two versions of a node (stored fields only)."""
    fields = {f for attr, f in _NODE_FIELDS if getattr(old, attr) != getattr(new, attr)}
    if old.hostinfo != new.hostinfo:
        fields |= hostinfo_fields(old.hostinfo, new.hostinfo)
    return frozenset(fields)


def node_change(node_id: int, fields: frozenset[Field]) -> Change:
    """The Change a local write publishes for these fields."""
    if fields == {Field.EXPIRY}:
        kind = ChangeKind.NODE_KEY_EXPIRY
    elif fields <= PATCH_FIELDS:
        kind = ChangeKind.NODE_PATCH
    else:
        kind = ChangeKind.NODE_CHANGED
    return Change(kind, node_id, fields)


def _stored(n: Node) -> tuple[object, ...]:
    return tuple(getattr(n, a) for a in _NODE_PERSISTED)


@dataclass
class Batch:
    last_id: int
    count: int
    touched: Touched
    loaded: persist.Loaded


def read_batch(s: Session, after: int, limit: int = BATCH) -> Batch | None:
    """The entries after `after` and the rows they name, read together (DB thread)."""
    entries = entries_after(s, after, limit)
    if not entries:
        return None
    touched = Touched()
    for e in entries:
        touched.merge(e.rows)
    return Batch(entries[-1].id, len(entries), touched,
                 persist.load_rows(s, touched, presence=True))


def fetch_batch(engine: Engine, after: int, limit: int = BATCH) -> Batch | None:
    with Session(engine) as s:
        return read_batch(s, after, limit)


class Replica(TailnetBase):
    def on_table(self, table: str, hook: TableHook) -> None:
        """Call `hook` after a catch-up touched `table` (kept in memory outside the tailnet)."""
        self.table_hooks.setdefault(table, []).append(hook)

    async def catch_up(self) -> int:
        """Apply what the other instances committed since the last change applied; returns
        how many log entries that was. A no-op for a single instance."""
        async with self._lock:
            return await self._catch_up_locked()

    async def _catch_up_locked(self, held: persist.Held | None = None) -> int:
        cl = self.changelog
        if cl is None:
            return 0
        loop = asyncio.get_running_loop()
        total = 0
        while True:
            if held is not None:
                batch = await loop.run_in_executor(self._executor, read_batch, held.session,
                                                   cl.applied)
            else:
                batch = await loop.run_in_executor(self._executor, fetch_batch, self.engine,
                                                   cl.applied)
            if batch is None:
                return total
            self._apply(batch.loaded, batch.touched)
            cl.applied = max(cl.applied, batch.last_id)
            total += batch.count
            if batch.count < BATCH:
                return total

    async def _resync_later(self) -> None:
        try:
            await self.resync()
        except Exception:  # the next catch-up or reconnection tries again
            log.exception("reloading from the database failed")

    async def resync(self) -> None:
        """Reload everything (this instance missed changes the log no longer holds)."""
        cl = self.changelog
        if cl is None:
            return
        async with self._lock:
            loaded = await asyncio.get_running_loop().run_in_executor(
                self._executor, lambda: persist.load_all(self.engine, cluster=True))
            self._apply(loaded, None)
            cl.applied = loaded.log_id
        log.info("memory reloaded from the database (log position %d)", cl.applied)

    # --- applying ---------------------------------------------------------------------------

    def _wanted(self, touched: Touched | None, table: str, known: Iterable[int],
                got: Iterable[int]) -> set[int]:
        keys = None if touched is None else touched.ids(table)
        if keys is None:
            return set(known) | set(got)
        return {int(k) for k in keys}

    def _apply(self, loaded: persist.Loaded, touched: Touched | None) -> None:
        """Swap reloaded rows into memory and publish what changed. `touched` None: `loaded`
        is everything (whatever memory has beyond it is gone)."""
        changes: list[Change] = []
        self._apply_users(loaded.users, touched, changes)
        self._apply_paks(loaded.preauth_keys, touched)
        self._apply_apikeys(loaded.api_keys, touched)
        self._apply_nodes(loaded, touched, changes)
        if changes:
            self._publish(*changes)
        for table, hooks in self.table_hooks.items():
            keys = None if touched is None else touched.ids(table)
            if keys == set():
                continue
            for hook in hooks:
                try:
                    hook(None if keys is None else {str(k) for k in keys})
                except Exception:  # one room failing to reload must not stop the others
                    log.exception("reloading %s after a change from another instance failed",
                                  table)

    def _apply_users(self, users: list[User], touched: Touched | None,
                     changes: list[Change]) -> None:
        got = {u.id: u for u in users}
        for uid in sorted(self._wanted(touched, "users", self.users, got)):
            new, old = got.get(uid), self.users.get(uid)
            if new == old:
                continue
            if new is None:
                del self.users[uid]
            else:
                self.users[uid] = new
            changes.append(Change(ChangeKind.USER, user_id=uid))

    def _apply_paks(self, paks: list[PreAuthKey], touched: Touched | None) -> None:
        got = {k.id: k for k in paks}
        for kid in sorted(self._wanted(touched, "pre_auth_keys", self.preauth_keys, got)):
            new = got.get(kid)
            if new is None:
                if kid in self.preauth_keys:
                    self._drop_pak(kid)
                    self._clear_node_key_refs(kid)
            elif new != self.preauth_keys.get(kid):
                self._put_pak(new)

    def _apply_apikeys(self, keys: list[ApiKey], touched: Touched | None) -> None:
        got = {a.id: a for a in keys}
        for kid in sorted(self._wanted(touched, "api_keys", self.api_keys, got)):
            new = got.get(kid)
            if new is None:
                self._drop_apikey(kid)
            elif new != self.api_keys.get(kid):
                self._put_apikey(new)

    def _apply_nodes(self, loaded: persist.Loaded, touched: Touched | None,
                     changes: list[Change]) -> None:
        got = {n.id: n for n in loaded.nodes}
        wanted = self._wanted(touched, "nodes", self.nodes, got)
        if touched is not None:
            pres = touched.ids("cluster_presence")
            wanted |= (set(self.nodes) | set(got)) if pres is None else {int(i) for i in pres}
        # Removals first: an address freed here may belong to a node added below.
        for nid in sorted(wanted - set(got)):
            old = self._drop_node(nid)
            if old is not None:
                self.ipam.release(old.ipv4, old.ipv6)
                self.gc.cancel(nid)
                self.presence.pop(nid, None)
                changes.append(Change(ChangeKind.NODE_REMOVED, nid))
        me = self.membership.instance_id
        for nid in sorted(wanted & set(got)):
            row, old = got[nid], self.nodes.get(nid)
            holder, capver = loaded.presence.get(nid, (None, 0))
            if holder == me and old is not None:
                # Our own session: memory knows its state (and live capver) best.
                online, capver = old.online, old.capver
            else:
                online = holder is not None
                capver = capver or (old.capver if old is not None else 0)
            if holder is None:
                self.presence.pop(nid, None)
            else:
                self.presence[nid] = holder
            behind = self.unsaved.get(nid)
            if behind and old is not None:
                # What its map requests reported and is not written yet is newer.
                row = replace(row, **{persist.NODE_ATTR[c]: getattr(old, persist.NODE_ATTR[c])
                                      for c in behind})
            new = replace(row, online=online, capver=capver)
            if old is None:
                for a in new.addresses:
                    self.ipam.reserve(a)
                self._put_node(replace(new, version=1))
                changes.append(Change(ChangeKind.NODE_ADDED, nid))
                self._schedule_gc(new)
                continue
            self._apply_node(old, new, changes)

    def _apply_node(self, old: Node, new: Node, changes: list[Change]) -> None:
        fields = node_diff(old, new)
        flip = old.online != new.online
        if not flip and new.capver == old.capver and _stored(old) == _stored(new):
            return
        if (old.ipv4, old.ipv6) != (new.ipv4, new.ipv6):
            self.ipam.release(*(a for a in old.addresses if a not in new.addresses))
            for a in new.addresses:
                self.ipam.reserve(a)
        bump = bool(fields) or flip or new.capver != old.capver
        self._put_node(replace(new, version=old.version + (1 if bump else 0)))
        if flip:
            changes.append(Change(ChangeKind.NODE_ONLINE, new.id, frozenset(
                {Field.ONLINE if new.online else Field.OFFLINE})))
            self._schedule_gc(new)
        visible = fields - {Field.LAST_SEEN} if flip else fields
        if visible:
            changes.append(node_change(new.id, visible))
        if visible & {Field.TAGS, Field.USER}:
            changes.append(Change(ChangeKind.POLICY))

    def _schedule_gc(self, n: Node) -> None:
        if not n.ephemeral:
            return
        if n.online:
            self.gc.cancel(n.id)
        else:
            self.gc.schedule(n.id)
