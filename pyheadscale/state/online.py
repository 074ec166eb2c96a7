"""What a node's own map polls change: its endpoints, disco key and Hostinfo (through the pure
`apply_map_request`), its capability version, and whether it is online."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import delete, update
from sqlmodel import col

from pyheadscale.db import models as db
from pyheadscale.db.cluster import ClusterInstance, ClusterPresence
from pyheadscale.state import changelog, persist
from pyheadscale.state.base import TailnetBase, serialized, utcnow
from pyheadscale.state.changes import PATCH_FIELDS, Change, ChangeKind, Field
from pyheadscale.state.errors import PersistError, Unavailable
from pyheadscale.state.mapreq import apply_map_request

log = logging.getLogger("pyheadscale.state")


def _write_rows(rows: list[tuple[int, dict[str, Any]]], tx: persist.Tx) -> None:
    for node_id, values in rows:
        tx.update(db.Node, node_id, values)


# Fields a map request may change that are written behind: nobody else depends on when they
# reach the database. A new hostname or given name (unique across instances) or new routes
# (route approval, primary election) are written at once, as every other write is.
_BEHIND_FIELDS = frozenset({Field.ENDPOINTS, Field.DISCO_KEY, Field.HOME_DERP, Field.HOSTINFO})
_FIELD_COLUMN = {Field.ENDPOINTS: "endpoints", Field.DISCO_KEY: "disco_key",
                 Field.HOME_DERP: "host_info", Field.HOSTINFO: "host_info",
                 Field.ROUTES: "host_info", Field.HOSTNAME: "hostname",
                 Field.GIVEN_NAME: "given_name"}
# How long a map request's report waits in memory before the batch it joins is written: a
# connect storm of N nodes is a few transactions, not N; another instance learns of an
# endpoint change this much later.
WRITE_BEHIND_S = 0.25
RETRY_S = 5.0  # after a failed flush (the database away)


class OnlineTracking(TailnetBase):
    _flush_timer: asyncio.TimerHandle | None = None
    _flushing: asyncio.Task[int] | None = None

    @serialized
    async def update_from_map_request(
        self, node_id: int, *, endpoints: Iterable[str] | None = None,
        disco_key: bytes | None = None, hostinfo: Mapping[str, Any] | None = None,
        capver: int | None = None,
    ) -> frozenset[Field]:
        """Apply a MapRequest's endpoints, disco key (non-zero only) and hostinfo; returns
        what changed (ENDPOINTS, DISCO_KEY, HOME_DERP, HOSTINFO, HOSTNAME, GIVEN_NAME,
        ROUTES). Empty values never overwrite known ones. Sessions learn it at once; the
        database gets endpoints, disco key and host info in the next batch (write-behind)."""
        old = self.get_node(node_id)
        new, fields = apply_map_request(old, endpoints=endpoints or (), disco_key=disco_key,
                                        hostinfo=hostinfo,
                                        taken_names=self._taken_names(old.id))
        if capver and capver != old.capver and not fields:
            # Live-only: no DB write, no peer-visible change.
            self.nodes[node_id] = replace(old, capver=capver)
            return frozenset()
        if new is old:
            return frozenset()
        new = replace(new, capver=capver or old.capver, updated_at=utcnow(),
                      version=old.version + 1)
        kind = ChangeKind.NODE_PATCH if fields <= PATCH_FIELDS else ChangeKind.NODE_CHANGED
        if fields <= _BEHIND_FIELDS:
            self._put_node(new)
            self._publish(Change(kind, new.id, fields))
            self._write_behind(node_id, {_FIELD_COLUMN[f] for f in fields})
            return fields
        try:
            await self._write_node(old, new, kind, fields)
        except Unavailable:
            if self.changelog is None:
                raise
            # Several instances and no database: this instance's sessions still learn the
            # node's new endpoints and disco key (a restarted client keeps talking to its
            # peers here); the others learn them when flush_unsaved() writes them.
            log.warning("node %d: no database, its new %s reach only this instance's "
                        "sessions for now", node_id, sorted(f.value for f in fields))
            self._put_node(new)
            self._publish(Change(kind, new.id, fields))
            self._write_behind(node_id, {_FIELD_COLUMN[f] for f in fields})
        return fields

    def _write_behind(self, node_id: int, columns: set[str]) -> None:
        self.unsaved.setdefault(node_id, set()).update(columns)
        if self._flush_timer is None and self._flushing is None:
            self._flush_timer = asyncio.get_running_loop().call_later(
                WRITE_BEHIND_S, self._start_flush)

    def _start_flush(self) -> None:
        self._flush_timer = None
        self._flushing = asyncio.get_running_loop().create_task(self._flush_behind())

    async def _flush_behind(self) -> int:
        delay = WRITE_BEHIND_S
        try:
            return await self.flush_unsaved()
        except (PersistError, Unavailable) as e:
            # Kept in memory and retried; cluster mode also flushes once the database is back.
            log.warning("%d nodes' map-request changes not written yet: %s",
                        len(self.unsaved), e)
            delay = RETRY_S
            return 0
        finally:
            self._flushing = None
            if self.unsaved and self._flush_timer is None:
                self._flush_timer = asyncio.get_running_loop().call_later(
                    delay, self._start_flush)

    @serialized
    async def flush_unsaved(self) -> int:
        """Write what map requests and session starts changed and only memory holds yet
        (write-behind, or cluster mode while the database was away): one transaction.
        Returns how many nodes were written."""
        pending, self.unsaved = self.unsaved, {}
        rows = []
        for nid, columns in sorted(pending.items()):
            n = self.nodes.get(nid)
            if n is not None:
                vals = persist.node_values(n)
                rows.append((nid, {c: vals[c] for c in sorted(columns)}))
        if not rows:
            return 0
        try:
            await self._commit(functools.partial(_write_rows, rows))
        except BaseException:
            for nid, columns in pending.items():  # newer reports merge in, none is lost
                self.unsaved.setdefault(nid, set()).update(columns)
            raise
        return len(rows)

    async def close(self) -> None:
        """Shutdown: what is still behind is written first."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        if self.unsaved:
            try:
                await self.flush_unsaved()
            except (PersistError, Unavailable) as e:
                log.warning("shutdown: %d nodes' map-request changes not written: %s",
                            len(self.unsaved), e)
        await super().close()

    @serialized
    async def set_online(self, node_id: int, online: bool, at: datetime | None = None) -> bool:
        """Mark a node online/offline (with last_seen); returns whether the flag flipped.
        Offline ephemeral nodes are scheduled for deletion; reconnecting cancels it.

        In cluster mode the node's presence row says which instance holds its session: a
        session opened here takes the node over, and one that ends here only takes the node
        offline if no other instance took it over meanwhile."""
        old = self.nodes.get(node_id)
        if old is None:
            return False
        now = at or utcnow()
        cl = self.changelog
        me = self.membership.instance_id
        if cl is not None:
            held_here = self.presence.get(node_id) == me
            if online and old.online and held_here:
                return False
            if not online and not held_here:
                return False  # another instance holds it now (or nobody did)
        elif old.online == online:
            return False
        if online:
            self.gc.cancel(node_id)
        elif old.ephemeral:
            self.gc.schedule(node_id)
        flipped = old.online != online
        capver = old.capver

        def tx_fn(tx: persist.Tx) -> None:
            assert cl is not None
            tx.update(db.Node, node_id, {"last_seen": now})
            if online:
                changelog.set_presence(tx.s, node_id, me, capver, now)
            else:
                changelog.clear_presence(tx.s, [node_id], me)
            tx.touch("cluster_presence", node_id)

        if cl is None:
            # Alone on the database: last_seen waits for the next write-behind batch.
            self._write_behind(node_id, {"last_seen"})
        else:
            # The presence row tells the other instances at once who holds the session.
            try:
                await self._commit(tx_fn)
            except PersistError:
                # Online state is runtime-only; a lost last_seen write must not hide it
                # (after an outage, reassert_presence() tells the other instances).
                log.warning("could not persist last_seen for node %d", node_id)
            if online:
                self.presence[node_id] = me
            else:
                self.presence.pop(node_id, None)
        if not flipped:
            return False
        self._put_node(self._bump(old, online=online, last_seen=now))
        self._publish(Change(ChangeKind.NODE_ONLINE, node_id,
                             frozenset({Field.ONLINE if online else Field.OFFLINE})))
        return True

    @serialized
    async def reassert_presence(self, sessions: Iterable[int]) -> None:
        """Cluster mode, after (re)connecting to the database: the presence rows of this
        instance become exactly `sessions` (the map sessions it holds), so writes it could
        not make while the database was away reach the other instances now."""
        cl = self.changelog
        if cl is None:
            return
        me = self.membership.instance_id
        live = sorted(i for i in set(sessions) if i in self.nodes)
        now = utcnow()
        caps = {i: self.nodes[i].capver for i in live}

        def tx_fn(tx: persist.Tx) -> None:
            gone = tx.s.execute(delete(ClusterPresence).where(
                col(ClusterPresence.instance_id) == me,
                col(ClusterPresence.node_id).not_in(live)).returning(
                col(ClusterPresence.node_id))).scalars()
            for nid in [*gone, *live]:
                tx.touch("cluster_presence", int(nid))
            for nid in live:
                changelog.set_presence(tx.s, nid, me, caps[nid], now)

        await self._commit(tx_fn)
        for nid in [n for n, holder in self.presence.items() if holder == me]:
            if nid not in live:
                del self.presence[nid]
        for nid in live:
            self.presence[nid] = me

    @serialized
    async def drop_instances(self, instance_ids: Iterable[str]) -> list[int]:
        """Cluster mode: instances that are gone (dead, or this one shutting down). Their
        presence rows and instance rows go; the nodes they held are offline until they
        reconnect somewhere. Returns those nodes' IDs."""
        ids = sorted(set(instance_ids))
        now = utcnow()
        if self.changelog is None or not ids:
            return []

        def tx_fn(tx: persist.Tx) -> list[int]:
            res = tx.s.execute(delete(ClusterPresence).where(
                col(ClusterPresence.instance_id).in_(ids)).returning(
                col(ClusterPresence.node_id)))
            gone = sorted(int(r) for r in res.scalars())
            if gone:
                tx.s.execute(update(db.Node).where(col(db.Node.id).in_(gone))
                             .values(last_seen=now))
            tx.s.execute(delete(ClusterInstance).where(col(ClusterInstance.id).in_(ids)))
            for nid in gone:
                tx.touch("cluster_presence", nid)
                tx.touch("nodes", nid)
            for i in ids:
                tx.touch("cluster_instances", i)
            return gone

        gone = await self._commit(tx_fn)
        changes = []
        for nid in gone:
            if self.presence.get(nid) in ids:
                del self.presence[nid]
            n = self.nodes.get(nid)
            if n is None or not n.online or nid in self.presence:
                continue
            self._put_node(self._bump(n, online=False, last_seen=now))
            changes.append(Change(ChangeKind.NODE_ONLINE, nid, frozenset({Field.OFFLINE})))
            if n.ephemeral:
                self.gc.schedule(nid)
        if changes:
            self._publish(*changes)
        return gone
