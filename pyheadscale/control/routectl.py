"""Subnet routes and exit nodes at run time: primary election, auto-approval, HA probing.

`RouteController` listens to the tailnet's changes (synchronously, before sessions see them)
and keeps `PrimaryRoutes` current; when the primaries move it hands the new table to
`on_primaries` (the control plane, which bumps the map context and tells the affected nodes'
peers).

autoApprovers (Headscale `AutoApproveRoutes`): announced routes the policy approves are added
to the node's approved routes on registration, on announcement and on a policy reload. Approval
is only ever added, never taken back.

HA health probing (Headscale 0.29 `HAHealthProber`): every `node.routes.ha.probe_interval`
each online node that serves a prefix some other online node also serves gets a PingRequest in
its map stream; the client answers with an HTTP HEAD to `/machine/ping-response?id=`. A node
that stays silent for `probe_timeout` is unhealthy and loses its primaries; an answer makes it
healthy again (without taking anything back). A cycle's verdicts are applied together, after
its last probe ended, so one election sees them all (two routers that come back in the same
cycle leave the primary where it was). A silence only counts against a session that was
already there at the previous cycle and has not been replaced since; one that does not count
("defer") leaves that router's mark as it was, and the election after the cycle keeps the
primary of every prefix that router serves (`held_prefixes`): a verdict of that prefix is
missing, so moving it might be what the complete picture would not do. Every other verdict is
recorded, and every other prefix is elected on them: a prefix's election reads only the marks
of its own routers, so a router serving several prefixes (one backup for several sites) judged
in a cycle is judged for all of them alike, and a prefix none of whose routers deferred is
decided on a complete picture (a reconnecting router cannot hold off failover elsewhere). A
held prefix is decided by the next cycle, or before it by an election another change calls
for, on the marks as they stand then. A new map session clears the node's unhealthy mark (it
just proved it can reach us), and so does going offline or announcing no approved route any
more (it is no candidate then).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping, Sequence
from typing import Any, Literal

from aiohttp import web

from pyheadscale.config import HARoutesConfig
from pyheadscale.control.policyctl import PolicyController
from pyheadscale.control.routeshare import SharedPrimaries
from pyheadscale.policy import PolicyManager
from pyheadscale.state.changes import Change, ChangeKind, Field
from pyheadscale.state.errors import StateError
from pyheadscale.state.model import IPNetwork
from pyheadscale.state.routes import PrimaryRoutes, is_route_candidate
from pyheadscale.state.tailnet import Tailnet

# Receives the new primaries (node ID -> routes) and the IDs of nodes whose primaries moved.
PrimariesListener = Callable[[Mapping[int, Sequence[IPNetwork]], Iterable[int]], None]

# One probe's outcome: an answer, a silence that counts, a node that went away meanwhile,
# or a silence that proves nothing yet (the session is too new or was replaced).
Verdict = Literal["healthy", "unhealthy", "skip", "defer"]

log = logging.getLogger("pyheadscale.routes")

PING_PATH = "/machine/ping-response"
# Changes after which a node's announced/approved routes, owner or tags may differ.
_APPROVE_INPUTS = {ChangeKind.NODE_ADDED, ChangeKind.NODE_CHANGED}
# Changes after which the set of online nodes serving a prefix may differ.
_ROUTE_INPUTS = _APPROVE_INPUTS | {ChangeKind.NODE_ONLINE, ChangeKind.NODE_REMOVED,
                                   ChangeKind.FULL}


class Outbox:
    """Server-initiated messages (PingRequests) waiting for a node's next map frame."""

    def __init__(self) -> None:
        self._items: dict[int, dict[str, Any]] = {}

    def put(self, node_id: int, fields: dict[str, Any]) -> None:
        self._items.setdefault(node_id, {}).update(fields)

    def take(self, node_id: int) -> dict[str, Any] | None:
        return self._items.pop(node_id, None)


class PingTracker:
    """Pending ping IDs -> futures resolved by the HEAD callback."""

    def __init__(self) -> None:
        self._pending: dict[str, tuple[int, asyncio.Future[None]]] = {}

    def register(self, node_id: int) -> tuple[str, asyncio.Future[None]]:
        ping_id = secrets.token_hex(8)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[ping_id] = (node_id, fut)
        return ping_id, fut

    def complete(self, ping_id: str) -> bool:
        entry = self._pending.pop(ping_id, None)
        if entry is None:
            return False
        if not entry[1].done():
            entry[1].set_result(None)
        return True

    def cancel(self, ping_id: str) -> None:
        entry = self._pending.pop(ping_id, None)
        if entry is not None and not entry[1].done():
            entry[1].cancel()


def held_prefixes(ha: Mapping[IPNetwork, Sequence[int]],
                  verdicts: Mapping[int, Verdict]) -> frozenset[IPNetwork]:
    """The prefixes whose primary the cycle's election keeps: those served by a router whose
    silence proved nothing ("defer"), since that router's verdict is missing."""
    deferred = {n for n, v in verdicts.items() if v == "defer"}
    return frozenset(p for p, routers in ha.items() if deferred.intersection(routers))


class RouteController:
    def __init__(self, tailnet: Tailnet, policy: PolicyController, *, ha: HARoutesConfig,
                 server_url: str, on_primaries: PrimariesListener) -> None:
        self.tailnet = tailnet
        self.policy = policy
        self.server_url = server_url.rstrip("/")
        self.on_primaries = on_primaries
        self.primaries = PrimaryRoutes()
        self.outbox = Outbox()
        self.pings = PingTracker()
        self.probe_interval = ha.probe_interval.total_seconds()
        self.probe_timeout = ha.probe_timeout.total_seconds()
        self._epoch: dict[int, int] = {}  # bumped on every reconnect of a node
        self._stable: dict[int, int] = {}  # epoch seen at the previous probe cycle
        self._tasks: set[asyncio.Task[Any]] = set()
        self._prober: asyncio.Task[None] | None = None
        self._manager: PolicyManager | None = None
        self._closed = False
        self.probes_answered = 0  # exported in /metrics: probe cycles can be observed
        # Several instances: the leader elects, probes and auto-approves; it shares the
        # primaries through the database and the others adopt them (routeshare.py).
        self.shared = SharedPrimaries(tailnet, self)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.tailnet.listeners.append(self._on_changes)
        self.tailnet.bus.session_listeners.append(self._on_session)
        self._manager = self.policy.manager
        self.primaries.compute(self.tailnet.nodes.values())
        self.on_primaries(self.primaries.by_node(), ())
        self._approve_later(self.tailnet.nodes)
        self.shared.start()
        if self.probe_interval > 0:
            self._prober = asyncio.create_task(self._probe_loop())

    def leading(self, leader: bool) -> None:
        """This instance became the leader: elect from the shared table, approve what the
        policy approves, probe from the next cycle."""
        if leader and not self._closed:
            # A follower kept no election state of its own: elect from the whole snapshot.
            self._recompute(None, share=True)
            self._approve_later(self.tailnet.nodes)

    async def stop(self) -> None:
        self._closed = True
        tasks = list(self._tasks) + ([self._prober] if self._prober else [])
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("HEAD", PING_PATH, self.ping_response)
        app.router.add_route("GET", PING_PATH, self.ping_response)
        app.router.add_route("POST", PING_PATH, self.ping_response)

    # --- change listener ------------------------------------------------------------------

    def _on_changes(self, changes: tuple[Change, ...]) -> None:
        if not any(c.kind in _ROUTE_INPUTS for c in changes):
            return  # endpoint/DERP patches and the like never move routes
        touched: set[int] = set()
        moved: set[int] | None = set()  # nodes whose serving may differ; None: all of them
        for c in changes:
            if c.node_id is not None and moved is not None:
                moved.add(c.node_id)
            if c.kind is ChangeKind.NODE_ONLINE and c.node_id is not None:
                if Field.ONLINE in c.fields:
                    # A fresh session starts healthy (Headscale Connect clears Unhealthy);
                    # this also covers a session held by another instance (_on_session
                    # only hears of the ones opened here).
                    self._epoch[c.node_id] = self._epoch.get(c.node_id, 0) + 1
                # Offline: no candidate, so no health to keep (Headscale Disconnect).
                self.primaries.set_unhealthy(c.node_id, False)
            elif c.kind is ChangeKind.NODE_REMOVED and c.node_id is not None:
                self.primaries.forget(c.node_id)
                self._epoch.pop(c.node_id, None)
                self._stable.pop(c.node_id, None)
            elif c.kind in _APPROVE_INPUTS and c.node_id is not None:
                touched.add(c.node_id)
                node = self.tailnet.nodes.get(c.node_id)
                if node is not None and not is_route_candidate(node):
                    self.primaries.set_unhealthy(c.node_id, False)  # no candidate any more
            elif c.kind is ChangeKind.FULL:
                touched |= set(self.tailnet.nodes)
                moved = None
        self._recompute(moved)
        if touched:
            self._approve_later(touched)

    def _on_session(self, node_id: int) -> None:
        """A streaming map session opened here, perhaps replacing a live one: the node
        reached us, so it is healthy again, and silences of its old session prove nothing."""
        self._epoch[node_id] = self._epoch.get(node_id, 0) + 1
        if self.primaries.set_unhealthy(node_id, False):
            log.info("HA: node %d opened a new map session, healthy again", node_id)
            self._recompute()

    def _recompute(self, moved: Iterable[int] | None = (), share: bool = False,
                   keep: Collection[IPNetwork] = ()) -> None:
        """Re-elect primaries after the nodes in `moved` changed (None: any node did); the
        prefixes in `keep` stay with their primary (PrimaryRoutes._elect)."""
        if not self.tailnet.membership.is_leader:
            return  # the leader elects; its table arrives through adopt()
        if moved is None:
            changed = self.primaries.compute(self.tailnet.nodes.values(), keep)
        else:
            changed = self.primaries.update(self.tailnet.nodes, moved, keep)
        if changed:
            self._announce(changed)
        if changed or share:
            self.shared.publish()

    def adopt(self, primaries: Mapping[IPNetwork, int]) -> None:
        """The leader's table (this instance follows)."""
        changed = self.primaries.adopt(primaries)
        if changed:
            self._announce(changed)

    def _announce(self, changed: Iterable[int]) -> None:
        log.info("primary routes now %s", {n: [str(p) for p in ps]
                                           for n, ps in self.primaries.by_node().items()})
        self.on_primaries(self.primaries.by_node(), changed)

    def policy_refreshed(self) -> None:
        """The control plane rebuilt its context for a policy change: a new policy (not
        just a recompile for new nodes) may auto-approve routes already announced."""
        manager = self.policy.manager
        if manager is not self._manager:
            self._manager = manager
            self._approve_later(self.tailnet.nodes)

    # --- autoApprovers --------------------------------------------------------------------

    def _approve_later(self, node_ids: Iterable[int]) -> None:
        if self.policy.manager is None or self._closed or not self.tailnet.membership.is_leader:
            return
        ids = [i for i in node_ids if i in self.tailnet.nodes
               and self.tailnet.nodes[i].announced_routes]
        if ids:
            self._spawn(self._auto_approve(ids))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _auto_approve(self, node_ids: list[int]) -> None:
        manager = self.policy.manager
        if manager is None:
            return
        for nid in node_ids:
            node = self.tailnet.nodes.get(nid)
            if node is None:
                continue
            approved = set(node.approved_routes)
            new = [r for r in manager.auto_approved_routes(node) if r not in approved]
            if not new:
                continue
            log.info("auto-approving routes %s for node %d (%s)", [str(r) for r in new],
                     nid, node.given_name)
            try:
                await self.tailnet.approve_routes(nid, [*node.approved_routes, *new])
            except StateError as e:
                log.warning("auto-approval for node %d failed: %s", nid, e)

    # --- HA health probing ----------------------------------------------------------------

    def _connected(self, node_id: int) -> bool:
        node = self.tailnet.nodes.get(node_id)
        if node is None or not node.online:
            return False
        return self.shared.held_elsewhere(node_id) or self.tailnet.bus.subscribed(node_id)

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            try:
                await self.probe_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed cycle must not end probing for good
                log.exception("HA probe cycle failed")

    async def probe_once(self) -> None:
        if not self.tailnet.membership.is_leader:
            self._stable.clear()
            return
        ha = self.primaries.ha_nodes()
        ids = sorted({i for nodes in ha.values() for i in nodes})
        for nid in list(self._stable):
            if nid not in ids:
                del self._stable[nid]
        probes = []
        probed: list[int] = []
        for nid in ids:
            if not self._connected(nid):
                self._stable.pop(nid, None)
                continue
            epoch = self._epoch.get(nid, 0)
            stable = self._stable.get(nid) == epoch
            self._stable[nid] = epoch
            probes.append(self._probe(nid, epoch, stable))
            probed.append(nid)
        if not probes:
            return
        verdicts = dict(zip(probed, await asyncio.gather(*probes), strict=True))
        healthy: dict[int, bool] = {}
        for nid, verdict in verdicts.items():
            node = self.tailnet.nodes.get(nid)
            if verdict == "healthy":
                healthy[nid] = True
            elif verdict == "unhealthy" and node is not None and node.online \
                    and is_route_candidate(node):  # still a candidate: the mark sticks
                healthy[nid] = False
        before = set(self.primaries.unhealthy)
        if self.primaries.set_health(healthy):
            for nid in sorted(self.primaries.unhealthy - before):
                log.warning("HA probe: node %d did not answer within %.1fs",
                            nid, self.probe_timeout)
            for nid in sorted(before - self.primaries.unhealthy):
                log.info("HA probe: node %d answers again", nid)
            self._recompute(keep=held_prefixes(ha, verdicts))

    def send_ping(self, node_id: int) -> tuple[str, asyncio.Future[None]]:
        ping_id, fut = self.pings.register(node_id)
        url = f"{self.server_url}{PING_PATH}?id={ping_id}{self.shared.url_suffix()}"
        request = {"PingRequest": {"URL": url, "Log": False}}
        if self.shared.held_elsewhere(node_id):
            self.shared.relay_ping(node_id, request)  # its session is on another instance
        else:
            self.deliver(node_id, request)
        return ping_id, fut

    def deliver(self, node_id: int, message: dict[str, Any]) -> None:
        """Put a server message on the node's next map frame (its session is here)."""
        self.outbox.put(node_id, message)
        # Wakes the node's map stream; the mapper ignores SELF changes without fields it knows.
        self.tailnet.bus.publish(Change(ChangeKind.SELF, node_id, frozenset({Field.PING}),
                                        target=node_id))

    async def _probe(self, node_id: int, epoch: int, stable: bool) -> Verdict:
        ping_id, fut = self.send_ping(node_id)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.probe_timeout)
        except TimeoutError:
            self.pings.cancel(ping_id)
            if not self._connected(node_id):
                return "skip"  # went away during the probe: no candidate, no verdict
            if self._epoch.get(node_id, 0) != epoch or not stable:
                return "defer"  # reconnected, or too fresh a session: proves nothing yet
            return "unhealthy"
        self.probes_answered += 1
        return "healthy"

    async def ping_response(self, request: web.Request) -> web.Response:
        ping_id = request.query.get("id", "")
        ok = self.pings.complete(ping_id) or self.shared.relay_pong(
            ping_id, request.query.get("i", ""))
        # Close the connection: each probe then proves the node can still open one.
        return web.Response(status=200 if ok else 404, headers={"Connection": "close"})
