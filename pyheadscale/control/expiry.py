"""Tell sessions when node keys expire (Headscale's 5-second `ExpireExpiredNodes` task).

Setting an expiry publishes a change at once, but a time reached later changes nothing in the
tailnet, so this task looks every few seconds for expiries that passed since its last look and
publishes a key-expiry change for each: the node gets its own Node with `Expired` (the client
goes to NeedsLogin) and its peers a KeyExpiry patch (they stop using it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from pyheadscale.state.changes import Change, ChangeKind, Field
from pyheadscale.state.tailnet import Tailnet

log = logging.getLogger("pyheadscale.expiry")

CHECK_INTERVAL = 2.0  # seconds


def passed_between(tailnet: Tailnet, since: datetime, now: datetime) -> list[int]:
    """IDs of nodes whose expiry lies in (since, now]."""
    return [n.id for n in tailnet.nodes.values()
            if n.expiry is not None and since < n.expiry <= now]


class ExpiryWatcher:
    def __init__(self, tailnet: Tailnet, interval: float = CHECK_INTERVAL) -> None:
        self.tailnet = tailnet
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self.last_check = datetime.now(UTC)

    def start(self) -> None:
        self.last_check = datetime.now(UTC)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def check(self, now: datetime | None = None) -> list[int]:
        now = now or datetime.now(UTC)
        ids = passed_between(self.tailnet, self.last_check, now)
        self.last_check = now
        for nid in ids:
            log.info("node %d key expired", nid)
        if ids:
            self.tailnet.bus.publish(*(Change(ChangeKind.NODE_KEY_EXPIRY, nid,
                                              frozenset({Field.EXPIRY})) for nid in ids))
        return ids

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:  # never let one bad pass end the checks
                log.exception("expiry check failed")
