"""How this instance stands among the others sharing its database: its id, whether it is the
leader (the one instance that runs the duties that must run once: ephemeral-node GC, primary
route election and HA probes, auto-approval, reaping), and short messages to the others.

Pure bookkeeping: pyheadscale/cluster/ drives it from PostgreSQL (advisory locks, NOTIFY). A
single instance (SQLite, or no cluster) is alone: it always leads and its messages come
straight back to it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("pyheadscale.cluster")

Message = dict[str, Any]


class Membership:
    def __init__(self, instance_id: str = "", *, clustered: bool = False) -> None:
        self.instance_id = instance_id
        self.clustered = clustered
        self.is_leader = not clustered
        self._leadership: list[Callable[[bool], None]] = []
        self._handlers: dict[str, Callable[[Message], None]] = {}
        # Set by the cluster runtime: delivers a message to every instance (this one too).
        self.sender: Callable[[str, Message], Awaitable[None]] | None = None

    def on_leadership(self, callback: Callable[[bool], None]) -> None:
        """`callback(True)` when this instance becomes the leader, `(False)` when it stops."""
        self._leadership.append(callback)

    def set_leader(self, leader: bool) -> None:
        if leader == self.is_leader:
            return
        self.is_leader = leader
        log.info("this instance %s the leader", "is now" if leader else "is no longer")
        for cb in list(self._leadership):
            try:
                cb(leader)
            except Exception:  # one duty failing to start must not stop the others
                log.exception("leadership callback failed")

    def on_message(self, topic: str, handler: Callable[[Message], None]) -> None:
        self._handlers[topic] = handler

    async def send(self, topic: str, message: Message) -> None:
        """To every instance, this one included; alone, it is handled at once."""
        if self.sender is None:
            self.deliver(topic, message)
        else:
            await self.sender(topic, message)

    def deliver(self, topic: str, message: Message) -> None:
        handler = self._handlers.get(topic)
        if handler is None:
            return
        try:
            handler(message)
        except Exception:  # a bad message from a peer must not break the listener
            log.exception("handling cluster message %r failed", topic)
