"""Primary routes and HA probes with several instances: the leader elects, the others follow.

The leader writes its election to the shared state ("route_primaries"); the change log makes
every other instance load and adopt it, so all of them give clients the same primaries even
though election is sticky (history-dependent). Probing is the leader's job too: a PingRequest
for a node whose map session is on another instance travels there as a cluster message, and
the client's answer (an HTTP request through the load balancer, so to any instance) comes back
to the leader the same way. A single instance uses none of this.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlmodel import Session

from pyheadscale.state import changelog, persist
from pyheadscale.state.errors import PersistError
from pyheadscale.state.membership import Message
from pyheadscale.state.model import IPNetwork
from pyheadscale.state.tailnet import Tailnet

if TYPE_CHECKING:
    from pyheadscale.control.routectl import RouteController

log = logging.getLogger("pyheadscale.routes")

KEY = "route_primaries"
PING_TOPIC = "routes.ping"
PONG_TOPIC = "routes.pong"
_PING_ID = re.compile(r"^[0-9a-f]{16}$")  # PingTracker's ids
_INSTANCE = re.compile(r"^[A-Za-z0-9._-]{1,80}$")


def _read(engine: Engine) -> Any:
    with Session(engine) as s:
        return changelog.read_shared(s, KEY)


def _put(tx: persist.Tx, value: Any) -> None:
    changelog.put_shared(tx.s, KEY, value)
    tx.touch("cluster_state", KEY)


def parse_primaries(value: Any) -> dict[IPNetwork, int]:
    out: dict[IPNetwork, int] = {}
    table = value.get("primaries") if isinstance(value, dict) else None
    for prefix, nid in (table or {}).items():
        try:
            out[ipaddress.ip_network(prefix)] = int(nid)
        except (ValueError, TypeError):
            continue
    return out


class SharedPrimaries:
    def __init__(self, tailnet: Tailnet, controller: RouteController) -> None:
        self.tailnet = tailnet
        self.ctl = controller
        self.m = tailnet.membership
        self._dirty = False
        self._writer: asyncio.Task[None] | None = None

    def start(self) -> None:
        if not self.m.clustered:
            return
        self.m.on_leadership(self.ctl.leading)
        self.m.on_message(PING_TOPIC, self._on_ping)
        self.m.on_message(PONG_TOPIC, self._on_pong)
        self.tailnet.on_table("cluster_state", self._on_state)
        self.ctl._spawn(self._load())

    # --- where a node's session is --------------------------------------------------------

    def held_elsewhere(self, node_id: int) -> bool:
        holder = self.tailnet.presence.get(node_id) if self.m.clustered else None
        return holder is not None and holder != self.m.instance_id

    def url_suffix(self) -> str:
        """Names the prober in the ping URL, so whichever instance gets the answer knows
        where to send it."""
        return f"&i={self.m.instance_id}" if self.m.clustered else ""

    # --- probes across instances ----------------------------------------------------------

    def relay_ping(self, node_id: int, request: dict[str, Any]) -> None:
        self.ctl._spawn(self._send(PING_TOPIC, {"node": node_id, "request": request}))

    def relay_pong(self, ping_id: str, instance: str) -> bool:
        """An answer to another instance's probe: pass it on (True) or not ours at all."""
        if (not self.m.clustered or not _PING_ID.match(ping_id)
                or not _INSTANCE.match(instance) or instance == self.m.instance_id):
            return False
        self.ctl._spawn(self._send(PONG_TOPIC, {"id": ping_id, "to": instance}))
        return True

    async def _send(self, topic: str, msg: Message) -> None:
        try:
            await self.m.send(topic, msg)
        except (PersistError, ValueError) as e:
            log.warning("HA probe message not sent: %s", e)

    def _on_ping(self, msg: Message) -> None:
        nid, request = msg.get("node"), msg.get("request")
        if (isinstance(nid, int) and isinstance(request, dict)
                and set(request) == {"PingRequest"} and self.tailnet.bus.subscribed(nid)):
            self.ctl.deliver(nid, request)

    def _on_pong(self, msg: Message) -> None:
        ping_id = msg.get("id")
        if msg.get("to") == self.m.instance_id and isinstance(ping_id, str):
            self.ctl.pings.complete(ping_id)

    # --- the shared table -----------------------------------------------------------------

    def _on_state(self, keys: set[str] | None) -> None:
        if keys is None or KEY in keys:
            self.ctl._spawn(self._load())

    async def _load(self) -> None:
        if self.m.is_leader:
            return  # the leader's own table is the source
        try:
            value = await asyncio.to_thread(_read, self.tailnet.engine)
        except Exception as e:  # the next change of the table loads it again
            log.warning("could not read the leader's primary routes: %s", e)
            return
        if value is not None and not self.m.is_leader:
            self.ctl.adopt(parse_primaries(value))

    def publish(self) -> None:
        """Share the leader's election (the latest one; writes are coalesced)."""
        if not self.m.clustered:
            return
        self._dirty = True
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        while self._dirty and self.m.is_leader:
            self._dirty = False
            value = {"primaries": {str(p): nid
                                   for p, nid in self.ctl.primaries.primaries.items()}}

            try:
                await self.tailnet.run_in_tx(functools.partial(_put, value=value))
            except PersistError as e:  # shared again with the next election
                log.warning("could not share the primary routes: %s", e)
                return
