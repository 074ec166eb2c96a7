"""What a node's own map polls change: its endpoints, disco key and Hostinfo (through the pure
`apply_map_request`), its capability version, and whether it is online."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from pyheadscale.db import models as db
from pyheadscale.state.base import TailnetBase, serialized, utcnow
from pyheadscale.state.changes import PATCH_FIELDS, Change, ChangeKind, Field
from pyheadscale.state.errors import PersistError
from pyheadscale.state.mapreq import apply_map_request

log = logging.getLogger("pyheadscale.state")


class OnlineTracking(TailnetBase):
    @serialized
    async def update_from_map_request(
        self, node_id: int, *, endpoints: Iterable[str] | None = None,
        disco_key: bytes | None = None, hostinfo: Mapping[str, Any] | None = None,
        capver: int | None = None,
    ) -> frozenset[Field]:
        """Apply a MapRequest's endpoints, disco key (non-zero only) and hostinfo; returns
        what changed (ENDPOINTS, DISCO_KEY, HOME_DERP, HOSTINFO, HOSTNAME, GIVEN_NAME,
        ROUTES). Empty values never overwrite known ones."""
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
        await self._write_node(old, new, kind, fields)
        return fields

    @serialized
    async def set_online(self, node_id: int, online: bool, at: datetime | None = None) -> bool:
        """Mark a node online/offline (with last_seen); returns whether the flag flipped.
        Offline ephemeral nodes are scheduled for deletion; reconnecting cancels it."""
        old = self.nodes.get(node_id)
        if old is None:
            return False
        now = at or utcnow()
        if online:
            self.gc.cancel(node_id)
        elif old.ephemeral:
            self.gc.schedule(node_id)
        if old.online == online:
            return False
        new = self._bump(old, online=online, last_seen=now)
        try:
            await self._commit(lambda tx: tx.update(db.Node, node_id, {"last_seen": now}))
        except PersistError:
            # Online state is runtime-only; a lost last_seen write must not hide it.
            log.warning("could not persist last_seen for node %d", node_id)
        self._put_node(new)
        self._publish(Change(ChangeKind.NODE_ONLINE, node_id,
                             frozenset({Field.ONLINE if online else Field.OFFLINE})))
        return True
