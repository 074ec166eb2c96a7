"""One encoding per batch (mapper/fanout.py) gives every viewer exactly its own delta.

The reference is ``delta``: for random tailnets, policies, batches and known-peer sets, the
frame SharedDeltas serves a viewer must decode to what ``delta`` builds for it, and both
must leave the same known peers (with their views) behind. Peers with routes and policies
that offer them per viewer (or hide IPv4) must take the per-viewer path and still agree.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from pyheadscale.mapper import MapContext, PeerCache, decode_frame, delta, to_plain
from pyheadscale.mapper.context import NODE_ATTR_DISABLE_IPV4, AllowAllPolicy
from pyheadscale.mapper.fanout import SharedDeltas
from pyheadscale.mapper.full import PLAIN_VIEW, KnownPeers, peer_view
from pyheadscale.mapper.snapshot import Snapshot
from pyheadscale.state.changes import PATCH_FIELDS, Change, ChangeKind, Field
from pyheadscale.state.model import IPNetwork, Node, User
from tests.unit._statefix import key, make_node

NOW = datetime(2026, 8, 22, 16, 0, tzinfo=UTC)
USERS = {1: User(id=1, name="alice"), 2: User(id=2, name="bob")}


class HidePolicy(AllowAllPolicy):
    """Viewers never see the nodes in `hidden` (a stand-in for a policy's visibility)."""

    def __init__(self, hidden: set[int]) -> None:
        self.hidden = hidden

    def can_see(self, viewer: Node, peer: Node) -> bool:
        return viewer.id != peer.id and peer.id not in self.hidden


class SplitPolicy(HidePolicy):
    """Odd viewers get no routes of any peer; some nodes have their IPv4 hidden."""

    def __init__(self, hidden: set[int], no_v4: set[int]) -> None:
        super().__init__(hidden)
        self.no_v4 = no_v4

    def routes_for_peer(self, viewer: Node, peer: Node,
                        primaries: Sequence[IPNetwork]) -> Sequence[IPNetwork]:
        return [] if viewer.id % 2 else super().routes_for_peer(viewer, peer, primaries)

    def nodes_with_attr(self, attr: str) -> Collection[int]:
        return self.no_v4 if attr == NODE_ATTR_DISABLE_IPV4 else ()


def _node(i: int, rng: random.Random) -> Node:
    exit_node = rng.random() < 0.15
    routes = ("0.0.0.0/0", "::/0") if exit_node else ()
    return make_node(i, routes=routes, approved=routes,
                     machine_key=key(i), node_key=key(0x40 + i), disco_key=key(0x80 + i),
                     hostname=f"n{i}", given_name=f"n{i}", user_id=rng.choice([1, 2]),
                     online=rng.random() < 0.7, capver=rng.choice([100, 145]),
                     endpoints=(f"192.0.2.{i}:41641",), version=rng.randint(1, 3),
                     last_seen=NOW)


def _change(rng: random.Random, ids: list[int]) -> Change:
    nid = rng.choice(ids)
    kind = rng.choice([ChangeKind.NODE_ADDED, ChangeKind.NODE_CHANGED, ChangeKind.NODE_PATCH,
                       ChangeKind.NODE_ONLINE, ChangeKind.NODE_REMOVED, ChangeKind.DNS,
                       ChangeKind.DERP, ChangeKind.NODE_KEY_EXPIRY])
    if kind is ChangeKind.NODE_PATCH:
        fields = frozenset(rng.sample(sorted(PATCH_FIELDS, key=lambda f: f.value), 2))
    elif kind is ChangeKind.NODE_CHANGED:
        fields = frozenset({rng.choice([Field.HOSTINFO, Field.TAGS, Field.GIVEN_NAME])})
    elif kind is ChangeKind.NODE_ONLINE:
        fields = frozenset({Field.ONLINE})
    else:
        fields = frozenset()
    if kind in (ChangeKind.DNS, ChangeKind.DERP):
        return Change(kind)
    return Change(kind, nid, fields)


def _plain_frame(frame: bytes | None) -> Any:
    if frame is None:
        return None
    obj, rest = decode_frame(frame)
    assert rest == b""
    return obj


def test_shared_frames_equal_each_viewers_own_delta() -> None:
    rng = random.Random(7)
    served = 0
    for _ in range(60):
        ids = list(range(1, 13))
        nodes = {i: _node(i, rng) for i in ids}
        for gone in rng.sample(ids, 2):  # changes about nodes deleted since
            del nodes[gone]
        policy = rng.choice([AllowAllPolicy(), HidePolicy(set(rng.sample(ids, 2))),
                             SplitPolicy(set(rng.sample(ids, 2)),
                                         set(rng.sample(ids, rng.choice([0, 0, 2]))))])
        ctx = MapContext(policy=policy, generation=rng.randint(1, 5))
        batch = [_change(rng, ids) for _ in range(rng.randint(1, 6))]
        shared = SharedDeltas()
        cache = PeerCache()
        for viewer in nodes.values():
            known = KnownPeers({
                i: peer_view(viewer, nodes[i], ctx) if i in nodes else PLAIN_VIEW
                for i in ids if i != viewer.id and rng.random() < 0.8})
            want, want_known = delta(batch, nodes, USERS, viewer, ctx, NOW, known, PeerCache())
            got_known = known.copy()
            frame = shared.frame(batch, Snapshot(nodes, USERS, ctx, NOW, cache), viewer, got_known)
            assert _plain_frame(frame) == (to_plain(want) if want is not None else None)
            assert got_known == want_known
        served += shared.shared
    assert served > 60  # the shared path really was taken


def test_viewer_in_the_batch_or_missing_a_peer_gets_its_own_delta() -> None:
    rng = random.Random(3)
    # No routes: every entry is the same for every viewer, so frames can be shared.
    nodes = {i: replace(_node(i, rng), approved_routes=()) for i in range(1, 5)}
    batch = [Change(ChangeKind.NODE_PATCH, 2, frozenset({Field.ENDPOINTS})),
             Change(ChangeKind.NODE_ADDED, 3)]
    shared = SharedDeltas()
    cache = PeerCache()
    ctx = MapContext()
    frames = {}
    for v, known in ((1, {2, 4}), (4, {1, 2}), (2, {1, 4}), (1, {4})):
        k = KnownPeers({i: peer_view(nodes[v], nodes[i], ctx) for i in known})
        frames[(v, tuple(sorted(known)))] = shared.frame(
            batch, Snapshot(nodes, USERS, ctx, NOW, cache), nodes[v], k)
    # 1 and 4 know node 2 and are not in the batch: the same bytes.
    assert frames[(1, (2, 4))] is frames[(4, (1, 2))]
    # 2 is in the batch (its own endpoints are not echoed), and a viewer that does not know
    # node 2 gets it whole instead of a patch.
    assert frames[(2, (1, 4))] != frames[(1, (2, 4))]
    whole = _plain_frame(frames[(1, (4,))])
    assert [p["ID"] for p in whole["PeersChanged"]] == [2, 3]
    assert shared.shared == 2 and shared.own == 2


def test_a_viewer_that_does_not_reconcile_never_scans_the_node_table(monkeypatch: Any) -> None:
    """A joiner's batch holds the NODE_ADDED of every node that joined after it: those nodes
    reconcile their own peer sets, the joiner does not, so building its delta must not scan
    every node for routers (route_nodes); a viewer whose own NODE_ADDED is in the batch
    still does, once per batch."""
    import pyheadscale.mapper.fanout as fanout

    scans: list[int] = []
    real = fanout.route_nodes

    def counting(nodes: Any) -> frozenset[int]:
        scans.append(len(nodes))
        return real(nodes)

    monkeypatch.setattr(fanout, "route_nodes", counting)
    rng = random.Random(5)
    nodes = {i: _node(i, rng) for i in range(1, 9)}
    ctx = MapContext(policy=AllowAllPolicy(), generation=1)
    snap = Snapshot(nodes, USERS, ctx, NOW, PeerCache())
    deltas = SharedDeltas()
    # Viewer 1 is in the batch (so it takes its own delta), but only as a patch of itself.
    batch = [Change(ChangeKind.NODE_ONLINE, 1, frozenset({Field.ONLINE})),
             Change(ChangeKind.NODE_ADDED, 8)]
    first, known = deltas.first_frame(snap, nodes[1])
    assert deltas.frame(batch, snap, nodes[1], known) is not None
    assert deltas.own == 1 and scans == []
    _, known8 = deltas.first_frame(snap, nodes[8])
    deltas.frame(batch, snap, nodes[8], known8)  # node 8's own NODE_ADDED: it reconciles
    assert scans == [len(nodes)]
