"""Peer sets kept as ID blocks (pyheadscale/idblocks.py) instead of one int object per peer.

IdBlocks must behave as the frozenset it replaces; KnownPeers.diff as the set differences the
mapper took before; the evaluation's position-mask -> ID translation as the plain bit walk
for any ID layout; PolicyManager.peer_ids as the pairwise reference on random policies, and
its filters, shared between nodes that serve the same entries, as the reference's. And a
policy delta built with the block diff must equal, byte for byte and in what the stream
then holds, the one built with plain set operations.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyheadscale.idblocks import BLOCK, IdBlocks
from pyheadscale.mapper import MapContext, PeerCache, to_plain
from pyheadscale.mapper.delta import BatchView, delta_into
from pyheadscale.mapper.full import full_map_and_peers
from pyheadscale.mapper.known import PLAIN_VIEW, KnownPeers, PeerView, plain_blocks
from pyheadscale.policy import PolicyManager, reference
from pyheadscale.policy.evaluate import _bits, _MaskToIds
from pyheadscale.state.changes import Change, ChangeKind
from pyheadscale.state.model import Node
from tests.unit.test_known_peers import EXIT, NO_V4, NOW, USERS, ShiftPolicy, _node
from tests.unit.test_policy_perf_equivalence import (
    mutate,
    random_node,
    random_tailnets,
)

ids_st = st.one_of(st.integers(0, 3 * BLOCK), st.sampled_from([2**20, 2**20 + 1, 2**40]))


@given(st.lists(ids_st, max_size=40), st.lists(ids_st, max_size=40), ids_st)
@settings(max_examples=300, deadline=None)
def test_id_blocks_behave_as_a_frozenset(a: list[int], b: list[int], probe: int) -> None:
    sa, sb = IdBlocks.of(a), IdBlocks.of(b)
    fa, fb = frozenset(a), frozenset(b)
    assert list(sa) == sorted(fa) and len(sa) == len(fa)
    assert sa == fa and fa == sa and (sa == sb) == (fa == fb)
    assert (probe in sa) == (probe in fa) and "x" not in sa and -1 not in sa
    assert sa | sb == fa | fb and sa & sb == fa & fb and sa - sb == fa - fb
    assert (sa <= sb) == (fa <= fb) and (sa >= fb) == (fa >= fb)
    blocks = {}
    for i in b:
        blocks[i // BLOCK] = blocks.get(i // BLOCK, 0) | 1 << (i % BLOCK)
    assert sa.covers(blocks.items()) == (fb <= fa)
    w = sa.without(probe)
    assert w == fa - {probe} and 0 not in w.blocks.values()
    assert hash(sa) == hash(IdBlocks.of(reversed(a)))


@given(st.lists(st.tuples(ids_st, st.sampled_from([PLAIN_VIEW, PLAIN_VIEW, EXIT, NO_V4])),
                max_size=40), st.lists(ids_st, max_size=40))
@settings(max_examples=300, deadline=None)
def test_known_diff_is_the_set_difference(held: list[tuple[int, PeerView]],
                                          visible: list[int]) -> None:
    known = KnownPeers(dict(held))
    vis = IdBlocks.of(visible)
    added, removed = known.diff(vis)
    assert added == sorted(set(visible) - known.ids())
    assert removed == sorted(known.ids() - set(visible))


@pytest.mark.parametrize("layout", ["dense", "gaps", "shuffled", "sparse", "late"])
def test_mask_translation_matches_the_bit_walk(layout: str) -> None:
    rng = random.Random(layout)
    n = 700
    if layout == "dense":
        ids = list(range(1, n + 1))
    elif layout == "gaps":  # deleted nodes: ascending runs
        ids = sorted(rng.sample(range(1, n + 40), n))
    elif layout == "shuffled":
        ids = rng.sample(range(1, n + 1), n)
    elif layout == "sparse":
        ids = sorted(rng.sample(range(1, 2**40), n))
    else:  # a long-lived tailnet: IDs start high
        ids = list(range(50_000, 50_000 + n))
    to_ids = _MaskToIds(ids)
    for _ in range(40):
        mask = rng.getrandbits(n) & rng.getrandbits(n)
        if rng.random() < 0.2:
            mask = (1 << n) - 1
        want = IdBlocks.of(ids[j] for j in _bits(mask))
        got = to_ids(mask)
        assert got == want and 0 not in got.blocks.values()
    assert to_ids(0) == IdBlocks({})


class _SetPolicy:
    """A PolicyManager that answers peer_ids with a plain set: delta_into's set path."""

    def __init__(self, pm: PolicyManager) -> None:
        self.pm = pm

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pm, name)

    def peer_ids(self, viewer: Node, nodes: Mapping[int, Node]) -> AbstractSet[int]:
        return set(self.pm.peer_ids(viewer, nodes))

    # The Policy protocol's methods, spelled out so isinstance() checks see them.
    def packet_filter(self, viewer: Node) -> list[dict[str, Any]]:
        return self.pm.packet_filter(viewer)

    def can_see(self, viewer: Node, peer: Node) -> bool:
        return self.pm.can_see(viewer, peer)

    def ssh_policy(self, viewer: Node) -> dict[str, Any] | None:
        return self.pm.ssh_policy(viewer)

    def node_capmap(self, viewer: Node) -> dict[str, Any]:
        return self.pm.node_capmap(viewer)

    def peer_capmap(self, peer: Node) -> dict[str, Any]:
        return self.pm.peer_capmap(peer)

    def nodes_with_attr(self, attr: str) -> Any:
        return self.pm.nodes_with_attr(attr)

    def routes_for_peer(self, viewer: Node, peer: Node, primaries: Any) -> Any:
        return self.pm.routes_for_peer(viewer, peer, primaries)


@pytest.mark.parametrize("seed", range(30))
def test_policy_peer_sets_and_deltas_match_the_set_path(seed: int) -> None:
    rng = random.Random(seed)
    compiled = 0
    for attempt, users, nodes, pm in random_tailnets(rng):
        compiled += 1
        # Streams as they were under an allow-all first map, then the policy arrives.
        by_id = {n.id: n for n in nodes}
        known = {n.id: full_map_and_peers(by_id, {}, n, MapContext(), NOW)[1] for n in nodes}
        for step in range(3):
            by_id = {n.id: n for n in nodes}
            for n in nodes:
                got = pm.peer_ids(n, by_id)
                assert isinstance(got, IdBlocks)
                assert got == reference.peers(pm, n, nodes), f"{seed}/{attempt}: {n.id}"
                assert pm.packet_filter(n) == reference.packet_filter(pm, n)
            stranger = random_node(rng, 150, users)
            with_stranger = {**by_id, stranger.id: stranger}
            assert not isinstance(pm.peer_ids(nodes[0], with_stranger), IdBlocks)
            assert pm.peer_ids(nodes[0], with_stranger) == (
                set(reference.peers(pm, nodes[0], nodes))
                | ({stranger.id} if pm.can_see(nodes[0], stranger) else set()))
            ctx = MapContext(policy=pm, generation=step + 1)
            ctx_set = MapContext(policy=_SetPolicy(pm), generation=step + 1)
            b = BatchView.of([Change(ChangeKind.POLICY)])
            for n in nodes:
                k_blocks, k_set = known[n.id].copy(), known[n.id].copy()
                r1 = delta_into(b, by_id, USERS, n, ctx, NOW, k_blocks, PeerCache())
                r2 = delta_into(b, by_id, USERS, n, ctx_set, NOW, k_set, PeerCache())
                assert to_plain(r1) == to_plain(r2) and k_blocks == k_set, f"{seed}/{attempt} step {step}: {n.id}"
                known[n.id] = k_blocks
            nodes = mutate(rng, nodes, users)
            known = {n.id: known.get(n.id, KnownPeers()) for n in nodes}
            pm.update(nodes=nodes)
    assert compiled >= 3


class _BlocksPolicy(ShiftPolicy):
    """ShiftPolicy answering peer_ids with IdBlocks, as PolicyManager does."""

    def peer_ids(self, viewer: Node, nodes: Mapping[int, Node]) -> AbstractSet[int]:
        return IdBlocks.of(i for i in nodes if i != viewer.id and i not in self.hidden)


@given(st.integers(0, 2**32))
@settings(max_examples=40, deadline=None)
def test_block_diff_deltas_equal_set_deltas_with_routes_and_hidden_ipv4(seed: int) -> None:
    rng = random.Random(seed)
    ids = rng.sample(range(1, 3 * BLOCK), 10)
    nodes = {i: _node(i, rng) for i in ids}
    blocks = _BlocksPolicy(rng.sample(ids, 2), rng.sample(ids, rng.choice([0, 0, 1])))
    plain = ShiftPolicy(blocks.hidden, blocks.no_v4)
    ctx_a = MapContext(policy=blocks, generation=1)
    ctx_b = MapContext(policy=plain, generation=1)
    b = BatchView.of([Change(ChangeKind.POLICY),
                      Change(ChangeKind.NODE_CHANGED, rng.choice(ids))])
    for vid in ids:
        # Held: a random part of the tailnet, some with a view this viewer no longer gets.
        held = KnownPeers({p: rng.choice([PLAIN_VIEW, EXIT, NO_V4])
                           for p in rng.sample(ids, rng.randint(0, len(ids)))})
        ka, kb = held.copy(), held.copy()
        ra = delta_into(b, nodes, USERS, nodes[vid], ctx_a, NOW, ka, PeerCache())
        rb = delta_into(b, nodes, USERS, nodes[vid], ctx_b, NOW, kb, PeerCache())
        assert to_plain(ra) == to_plain(rb) and ka == kb



@pytest.mark.parametrize("seed", range(10))
def test_block_lookups_answer_as_the_policy_does_per_node(seed: int) -> None:
    """The first map's "sees the whole run" and a shared delta's "sees every node of the
    batch" ask the index's IdBlocks a block at a time: the same answers as can_see per node."""
    from pyheadscale.mapper.context import visible_blocks
    from pyheadscale.mapper.fanout import SharedDeltas, _Plan
    from pyheadscale.mapper.firstmap import RUN, _sees_run

    rng = random.Random(seed)
    for _, _, nodes, pm in random_tailnets(rng):
        by_id = {n.id: n for n in nodes}
        ctx = MapContext(policy=pm, generation=1)
        for n in nodes:
            vis = visible_blocks(pm, n, by_id)
            assert isinstance(vis, IdBlocks)
            for block in {i // RUN for i in by_id}:
                # Its own run never counts as a whole (the first map builds it apart).
                run_ids = sorted(i for i in by_id if i // RUN == block and i != n.id)
                assert _sees_run(vis, block, run_ids) == all(
                    pm.can_see(n, by_id[i]) for i in run_ids), f"{seed}: {n.id} run {block}"
            for _ in range(5):
                size = min(len(by_id), rng.choice([1, 2, 3, len(by_id)]))
                touched = frozenset(rng.sample(sorted(by_id), rng.randint(1, size)))
                plan = _Plan([], BatchView.of([]), True, present=touched,
                             present_blocks=plain_blocks(touched))
                assert SharedDeltas._sees_all(ctx, n, by_id, plan) == all(
                    pm.can_see(n, by_id[i]) for i in touched), f"{seed}: {n.id}"
