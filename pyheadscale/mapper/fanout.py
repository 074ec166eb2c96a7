"""One encoded delta per batch, shared by every viewer the batch reaches the same way.

The bus hands every map session the same batch (the same list object). Most viewers are in
the same situation towards it: the batch is not about them, they see every node it touches,
and they already know the peers it patches or removes. For those the delta is the same
bytes, so it is built, encoded and compressed once (the first such viewer pays) and the
others only check the situation (set operations over the batch's nodes) and update their
known peers. A peer entry sent whole is shared only when it is the same for every viewer
(no routes, no hidden IPv4: ``PLAIN_VIEW``). Any other viewer gets its own delta from ``delta_into``; the result is the
same either way (tests/unit/test_fanout.py compares the two).

Not locked: use one per event loop, like ``PeerCache``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pyheadscale.mapper.context import AllowAllPolicy, MapContext, visible_blocks
from pyheadscale.mapper.delta import BatchView, _patch, delta_into, route_nodes
from pyheadscale.mapper.encode import encode_frame
from pyheadscale.mapper.firstmap import PeerRuns
from pyheadscale.mapper.full import HOME_DERP_CAPVER, PLAIN_VIEW, KnownPeers, user_profiles
from pyheadscale.mapper.known import plain_blocks
from pyheadscale.mapper.snapshot import Snapshot
from pyheadscale.state.changes import Change, ChangeKind, Field
from pyheadscale.state.model import Node
from pyheadscale.tailcfg import format_time

__all__ = ["SharedDeltas"]


@dataclass
class _Plan:
    batch: list[Change]  # held so the id() it is filed under stays this batch's
    view: BatchView
    shareable: bool
    present: frozenset[int] = frozenset()  # touched nodes in the snapshot
    present_blocks: tuple[tuple[int, int], ...] = ()  # present as KnownPeers bits
    removed: frozenset[int] = frozenset()  # touched nodes no longer there
    entries: frozenset[int] = frozenset()  # present nodes sent whole
    patched: frozenset[int] = frozenset()  # present nodes sent as a PeerChange
    held: tuple[tuple[int, int], ...] = ()  # patched and removed (the viewer must know them
    # all) as KnownPeers bits
    entry_blocks: tuple[tuple[int, int], ...] = ()  # entries as KnownPeers bits
    frame: bytes | None = None
    built: bool = False
    routers: frozenset[int] | None = None  # route_nodes() of the snapshot, once per batch


class SharedDeltas:
    """Recent batches' plans and shared frames."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._plans: dict[tuple[int, int, bool], _Plan] = {}
        self.runs = PeerRuns()  # full maps: first frames and FULL resends
        self.shared = 0  # frames served from a shared encoding
        self.own = 0  # deltas built for one viewer

    def _plan(self, batch: list[Change], ctx: MapContext, legacy: bool) -> _Plan:
        key = (id(batch), ctx.generation, legacy)
        plan = self._plans.get(key)
        if plan is None or plan.batch is not batch:
            view = BatchView.of(batch)
            # A policy or profile change reconciles each viewer's own peer set: never shared.
            shareable = not (view.full or view.policy or view.user_ids is None or view.user_ids)
            plan = _Plan(batch, view, shareable)
            if len(self._plans) >= self.size:
                del self._plans[next(iter(self._plans))]  # oldest first (insertion order)
            self._plans[key] = plan
        return plan

    def frame(self, batch: list[Change], snap: Snapshot, viewer: Node,
              known: KnownPeers) -> bytes | None:
        """The encoded frame of the viewer's delta (None: nothing for it); updates ``known``."""
        legacy = 0 < viewer.capver < HOME_DERP_CAPVER
        plan = self._plan(batch, snap.ctx, legacy)
        nodes = snap.nodes
        if plan.view.full and viewer.id in nodes:
            frame, peers = self.first_frame(snap, nodes[viewer.id])
            if peers or not known:
                known.assign(peers)
                return frame
            # It sees no peer now: delta_into's full map also removes those it held.
        if plan.shareable and viewer.id not in plan.view.touched:
            if not plan.built:
                self._build(plan, snap, legacy)
            if (plan.shareable and known.has_all_blocks(plan.held)
                    and self._sees_all(snap.ctx, viewer, nodes, plan)):
                self.shared += 1
                for p in plan.removed:
                    del known[p]
                known.add_plain_blocks(plan.entry_blocks)
                return plan.frame
        resp = self._own(plan, snap, viewer, known)
        return encode_frame(resp) if resp is not None else None

    def _own(self, plan: _Plan, snap: Snapshot, viewer: Node,
             known: KnownPeers) -> dict[str, Any] | None:
        """The viewer's delta built for it alone (``delta_into``)."""
        self.own += 1
        return delta_into(plan.view, snap.nodes, snap.users, viewer, snap.ctx, snap.now, known,
                          snap.cache, self._routers(plan, snap.nodes, viewer))

    @staticmethod
    def _routers(plan: _Plan, nodes: Mapping[int, Node], viewer: Node) -> frozenset[int] | None:
        # Only a viewer reconciling its whole peer set reads it (a policy change, or its own
        # identity changed); one scan per batch then. Not for a viewer that merely sees
        # another node reconcile (a joiner's batch holds every later joiner's NODE_ADDED):
        # that was a scan of every node per joiner.
        b = plan.view
        if not (b.policy or b.own.get(viewer.id, (False, False))[1]):
            return None
        if plan.routers is None:
            plan.routers = route_nodes(nodes)
        return plan.routers

    def first_frame(self, snap: Snapshot, viewer: Node) -> tuple[bytes, KnownPeers]:
        """A stream's first map (framed) and the peers it carries with their views."""
        return self.runs.first_frame(snap, viewer)

    def kinds(self, batch: list[Change], snap: Snapshot, viewer: Node) -> frozenset[ChangeKind]:
        """The batch's change kinds, gathered once with its plan."""
        return self._plan(batch, snap.ctx, 0 < viewer.capver < HOME_DERP_CAPVER).view.kinds

    def delta(self, batch: list[Change], snap: Snapshot, viewer: Node,
              known: KnownPeers) -> dict[str, Any] | None:
        """The viewer's own delta as a dictionary (to add to it); updates ``known``."""
        plan = self._plan(batch, snap.ctx, 0 < viewer.capver < HOME_DERP_CAPVER)
        return self._own(plan, snap, viewer, known)

    @staticmethod
    def _sees_all(ctx: MapContext, viewer: Node, nodes: Mapping[int, Node],
                  plan: _Plan) -> bool:
        if type(ctx.policy) is AllowAllPolicy:
            return True
        # A lookup per block of the batch, not a policy test per node: a storm's batches
        # touch thousands of nodes and every session asks (after a restart: N x N tests).
        vis = visible_blocks(ctx.policy, viewer, nodes)
        if vis is not None:
            return vis.covers(plan.present_blocks)
        can_see = ctx.policy.can_see
        return all(can_see(viewer, nodes[i]) for i in plan.present if i in nodes)

    @staticmethod
    def _build(plan: _Plan, snap: Snapshot, legacy: bool) -> None:
        """The delta of a viewer that sees every node of the batch, knows those it patches
        or removes and is not itself in the batch: ``delta_into``'s rules for that case."""
        nodes, ctx, now, cache = snap.nodes, snap.ctx, snap.now, snap.cache
        b = plan.view
        present = frozenset(b.touched & nodes.keys())
        entries = set(present & b.full_ids)
        for pid in present - entries:
            fields = b.patch_fields.get(pid, set())
            if Field.DISCO_KEY in fields and not nodes[pid].online:
                entries.add(pid)  # a disco patch must say Online:true; send the node instead
        plan.present = present
        plan.present_blocks = plain_blocks(present)
        plan.removed = frozenset(b.touched - present)
        plan.entries = frozenset(entries)
        plan.patched = present - plan.entries
        plan.held = plain_blocks(plan.patched | plan.removed)
        plan.entry_blocks = plain_blocks(plan.entries)
        plan.built = True
        changed = [nodes[p] for p in sorted(plan.entries)]
        if ctx.ipv4_disabled or any(p.approved_routes for p in changed):
            # Such an entry may differ between viewers (routes, hidden IPv4): each its own.
            plan.shareable = False
            return
        resp: dict[str, Any] = {}
        if changed:
            resp["PeersChanged"] = [cache.get(p, ctx, now, legacy_derp=legacy, view=PLAIN_VIEW)
                                    for p in changed]
        if plan.removed:
            resp["PeersRemoved"] = sorted(plan.removed)
        patches = [pc for p in sorted(plan.patched)
                   if (pc := _patch(nodes[p], frozenset(b.patch_fields.get(p, ())))) is not None]
        if patches:
            resp["PeersChangedPatch"] = patches
        if b.dns:
            resp["DNSConfig"] = ctx.dns_fragment
        if b.derp:
            resp["DERPMap"] = ctx.derp_fragment
        if changed:
            profiles = user_profiles(changed, snap.users)
            if profiles:
                resp["UserProfiles"] = profiles
        if resp:
            resp["ControlTime"] = format_time(now)
            plan.frame = encode_frame(resp)
