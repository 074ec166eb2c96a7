"""KnownPeers (mapper/known.py) is a peer ID -> PeerView mapping, whatever its storage.

Two properties: (1) any sequence of operations leaves it equal, entry for entry, to a dict
that went through the same operations; (2) map sessions fed random sequences of change
batches through SharedDeltas (shared frames, per-viewer deltas, FULL resends) end every
batch holding exactly what a full map computed afresh would hold: the same peers with the
same views in KnownPeers, and the same peers, endpoints, keys, online flags and allowed IPs
in the client's copy the frames built up.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Collection
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pyheadscale.mapper import MapContext, PeerCache, decode_frame, full_map_and_peers, to_plain
from pyheadscale.mapper.context import NODE_ATTR_DISABLE_IPV4, AllowAllPolicy
from pyheadscale.mapper.fanout import SharedDeltas
from pyheadscale.mapper.known import (
    BLOCK,
    PLAIN_VIEW,
    KnownPeers,
    PeerView,
    block_bits,
    plain_blocks,
)
from pyheadscale.mapper.snapshot import Snapshot
from pyheadscale.state.changes import Change, ChangeKind, Field
from pyheadscale.state.model import Node, User
from tests.unit._statefix import key, make_node

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
USERS = {1: User(id=1, name="alice"), 2: User(id=2, name="bob")}
EXIT = PeerView((ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")))
NO_V4 = PeerView((), True)

# IDs around block edges, far apart (one block each) and huge.
ids_st = st.one_of(st.integers(0, 3 * BLOCK), st.sampled_from([2**20, 2**20 + 1, 2**40]))
views_st = st.sampled_from([PLAIN_VIEW, PLAIN_VIEW, EXIT, NO_V4])
ops_st = st.lists(st.one_of(
    st.tuples(st.just("set"), ids_st, views_st),
    st.tuples(st.just("del"), ids_st),
    st.tuples(st.just("plain"), st.lists(ids_st, max_size=8)),
    st.tuples(st.just("block"), st.integers(0, 3), st.integers(0, (1 << BLOCK) - 1)),
    st.tuples(st.just("copy")),
), max_size=60)


@given(ops_st)
@settings(max_examples=300, deadline=None)
def test_known_peers_behaves_as_the_dict_it_replaces(ops: list[tuple[Any, ...]]) -> None:
    kp, ref = KnownPeers(), dict[int, PeerView]()
    for op in ops:
        if op[0] == "set":
            kp[op[1]] = ref[op[1]] = op[2]
        elif op[0] == "del":
            if op[1] in ref:
                del kp[op[1]], ref[op[1]]
            else:
                try:
                    del kp[op[1]]
                except KeyError:
                    pass
                else:
                    raise AssertionError("deleted an unknown peer")
        elif op[0] == "plain":
            if len(op[1]) % 2:
                kp.add_plain_blocks(plain_blocks(op[1]))
            else:
                kp.add_plain(op[1])
            ref.update(dict.fromkeys(op[1], PLAIN_VIEW))
        elif op[0] == "block":
            block, bits = op[1], op[2]
            ids = [block * BLOCK + o for o in range(BLOCK) if bits >> o & 1]
            assert block_bits(ids) == bits
            kp.add_plain_block(block, bits)
            ref.update(dict.fromkeys(ids, PLAIN_VIEW))
        else:
            other = KnownPeers()
            other.assign(kp)
            assert other == kp and other.copy() == kp
            kp = KnownPeers(dict(other.items()))  # rebuilt entry by entry: equal fields
            assert kp == other
        assert dict(kp.items()) == ref and kp == ref
        assert len(kp) == len(ref) and list(kp) == sorted(ref) and kp.ids() == set(ref)
        assert set(kp.non_plain()) == {i for i, v in ref.items() if v != PLAIN_VIEW}
        for i in (0, 1, BLOCK - 1, BLOCK, 2**20, 2**40, 7):
            assert (i in kp) == (i in ref) and kp.get(i) == ref.get(i)
        # Known with any view (the non-plain ones too), across blocks, and one unknown ID.
        probe = [*list(ref)[:5], BLOCK + 1, 2**20]
        for ids in (probe, probe[:-1], probe[:2], [i for i in ref if ref[i] != PLAIN_VIEW]):
            assert kp.has_all_blocks(plain_blocks(ids)) == all(i in ref for i in ids)
    assert "x" not in kp


class ShiftPolicy(AllowAllPolicy):
    """Viewers never see `hidden`; odd viewers get no routes; `no_v4` have IPv4 hidden."""

    def __init__(self, hidden: Collection[int], no_v4: Collection[int]) -> None:
        self.hidden = set(hidden)
        self.no_v4 = set(no_v4)

    def can_see(self, viewer: Node, peer: Node) -> bool:
        return viewer.id != peer.id and peer.id not in self.hidden

    def routes_for_peer(self, viewer: Node, peer: Node, primaries: Any) -> Any:
        return [] if viewer.id % 2 else super().routes_for_peer(viewer, peer, primaries)

    def nodes_with_attr(self, attr: str) -> Collection[int]:
        return self.no_v4 if attr == NODE_ATTR_DISABLE_IPV4 else ()


def _node(i: int, rng: random.Random) -> Node:
    routes = ("0.0.0.0/0", "::/0") if rng.random() < 0.2 else ()
    node = make_node(1, routes=routes, approved=routes, user_id=rng.choice([1, 2]),
                     machine_key=key(i % 256), node_key=key(rng.randrange(256)),
                     disco_key=key(rng.randrange(256)), online=rng.random() < 0.7,
                     capver=rng.choice([100, 145]), last_seen=NOW,
                     endpoints=(f"192.0.2.{rng.randrange(1, 250)}:41641",))
    # make_node's addresses only go to 255: node i gets 100.64.0.0 + i instead.
    return replace(node, id=i, hostname=f"n{i}", given_name=f"n{i}",
                   ipv4=ipaddress.IPv4Address(0x64400000 + i),
                   ipv6=ipaddress.IPv6Address((0xFD7A115CA1E0 << 80) + i))


def _apply(client: dict[int, dict[str, Any]], frame: bytes | None) -> None:
    """What a client makes of a frame, for the fields compared below."""
    if frame is None:
        return
    obj, rest = decode_frame(frame)
    assert rest == b""
    resp = to_plain(obj)
    if "Peers" in resp:
        client.clear()
        client.update({p["ID"]: p for p in resp["Peers"]})
    for p in resp.get("PeersChanged", ()):
        client[p["ID"]] = p
    for i in resp.get("PeersRemoved", ()):
        client.pop(i, None)
    for pc in resp.get("PeersChangedPatch", ()):
        entry = client[pc["NodeID"]]  # never a patch for a peer the client does not hold
        for k in ("Key", "DiscoKey", "Endpoints", "Online"):
            if k in pc:
                entry[k] = pc[k]


_COMPARED = ("Key", "DiscoKey", "Endpoints", "Online", "AllowedIPs", "Addresses", "Name")


def _step(rng: random.Random, nodes: dict[int, Node], policy: ShiftPolicy,
          used: set[int]) -> list[Change]:
    """Mutate the tailnet the way one batch of changes says, and return the batch. IDs are
    never reused (``used``), as the database never does."""
    batch: list[Change] = []
    for _ in range(rng.randint(1, 4)):
        what = rng.random()
        ids = sorted(nodes)
        nid = rng.choice(ids) if ids else 0
        if what < 0.2 or not ids:
            nid = rng.choice([rng.randint(1, 3 * BLOCK), 2**20 + rng.randint(0, 3)])
            if nid not in used:
                used.add(nid)
                nodes[nid] = _node(nid, rng)
                batch.append(Change(ChangeKind.NODE_ADDED, nid))
        elif what < 0.3:
            del nodes[nid]
            batch.append(Change(ChangeKind.NODE_REMOVED, nid))
        elif what < 0.55:
            nodes[nid] = replace(nodes[nid], endpoints=(f"198.51.100.{rng.randrange(250)}:1",),
                                 disco_key=key(rng.randrange(256)), version=nodes[nid].version + 1)
            batch.append(Change(ChangeKind.NODE_PATCH, nid,
                                frozenset({Field.ENDPOINTS, Field.DISCO_KEY})))
        elif what < 0.7:
            nodes[nid] = replace(nodes[nid], online=not nodes[nid].online,
                                 version=nodes[nid].version + 1)
            batch.append(Change(ChangeKind.NODE_ONLINE, nid, frozenset({Field.ONLINE})))
        elif what < 0.8:
            fresh = _node(nid, rng)
            nodes[nid] = replace(nodes[nid], hostinfo=fresh.hostinfo,
                                 approved_routes=fresh.approved_routes,
                                 version=nodes[nid].version + 1)
            batch.append(Change(ChangeKind.NODE_CHANGED, nid,
                                frozenset({Field.APPROVED_ROUTES, Field.ROUTES})))
        elif what < 0.95:
            policy.hidden = set(rng.sample(ids, min(len(ids), rng.randint(0, 3))))
            policy.no_v4 = set(rng.sample(ids, min(len(ids), rng.choice([0, 0, 0, 1]))))
            batch.append(Change(ChangeKind.POLICY))
        else:
            batch.append(Change(ChangeKind.FULL))
    return batch


@given(st.integers(0, 2**32))
@settings(max_examples=15, deadline=None)
def test_sessions_hold_what_a_fresh_full_map_holds(seed: int) -> None:
    rng = random.Random(seed)
    nodes = {i: _node(i, rng) for i in rng.sample(range(1, 3 * BLOCK), 8)}
    used = set(nodes)
    policy = ShiftPolicy((), ())
    cache, shared = PeerCache(), SharedDeltas()
    sessions: dict[int, tuple[KnownPeers, dict[int, dict[str, Any]]]] = {}
    generation = 1
    for _ in range(25):
        batch = _step(rng, nodes, policy, used)
        if any(c.kind is ChangeKind.POLICY for c in batch):
            generation += 1
        # A fresh context each batch (what dispatch does on a change): hidden IPv4 is read
        # from the policy when the context is made.
        ctx = MapContext(policy=policy, generation=generation)
        snap = Snapshot(nodes, USERS, ctx, NOW, cache)
        for vid in list(sessions):
            if vid not in nodes:
                del sessions[vid]  # the app ends a deleted node's stream
                continue
            known, client = sessions[vid]
            _apply(client, shared.frame(batch, snap, nodes[vid], known))
        for vid in nodes.keys() - sessions.keys():
            frame, known = shared.first_frame(snap, nodes[vid])
            client = {}
            _apply(client, frame)
            sessions[vid] = (known, client)
        for vid, (known, client) in sessions.items():
            want, want_known = full_map_and_peers(nodes, USERS, nodes[vid], ctx, NOW)
            assert known == want_known
            peers = {p["ID"]: p for p in to_plain(want).get("Peers", [])}
            assert client.keys() == peers.keys()
            for pid, entry in peers.items():
                assert {k: client[pid].get(k) for k in _COMPARED} == \
                    {k: entry.get(k) for k in _COMPARED}


def test_a_full_resend_that_leaves_no_peer_removes_the_ones_held() -> None:
    # No Peers in a MapResponse means "unchanged", so a full map for a viewer that now sees
    # nobody must say which peers went.
    rng = random.Random(5)
    nodes = {i: replace(_node(i, rng), approved_routes=()) for i in (1, 2, 200)}
    policy = ShiftPolicy({2, 200}, ())
    ctx = MapContext(policy=policy, generation=2)
    held = KnownPeers({2: PLAIN_VIEW, 200: PLAIN_VIEW})
    for known in (held.copy(), held.copy()):
        frame = SharedDeltas().frame([Change(ChangeKind.FULL)],
                                     Snapshot(nodes, USERS, ctx, NOW, PeerCache()), nodes[1],
                                     known)
        assert frame is not None
        resp = to_plain(decode_frame(frame)[0])
        assert "Peers" not in resp and resp["PeersRemoved"] == [2, 200] and "Node" in resp
        assert len(known) == 0
