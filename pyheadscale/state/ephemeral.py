"""Ephemeral-node garbage collection (Headscale `db/node.go` EphemeralGarbageCollector).

An ephemeral node that goes offline is deleted after `node.ephemeral.inactivity_timeout`
unless it reconnects first. Timers are per node; scheduling again replaces the old timer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("pyheadscale.ephemeral")

class EphemeralGC:
    def __init__(self, timeout: float, delete: Callable[[int], Awaitable[Any]]) -> None:
        self.timeout = timeout
        self._delete = delete
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def scheduled(self) -> list[int]:
        return list(self._timers)

    def schedule(self, node_id: int, delay: float | None = None) -> None:
        if self._closed:
            return
        self.cancel(node_id)
        loop = asyncio.get_running_loop()
        self._timers[node_id] = loop.call_later(
            self.timeout if delay is None else max(0.0, delay), self._fire, node_id)

    def cancel(self, node_id: int) -> None:
        h = self._timers.pop(node_id, None)
        if h is not None:
            h.cancel()

    def _fire(self, node_id: int) -> None:
        self._timers.pop(node_id, None)
        task = asyncio.get_running_loop().create_task(self._run(node_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, node_id: int) -> None:
        try:
            await self._delete(node_id)
        except Exception:  # a failed GC must not kill the loop; it is retried on next offline
            log.exception("deleting ephemeral node %d failed", node_id)

    async def close(self) -> None:
        self._closed = True
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
