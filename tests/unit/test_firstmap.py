"""First maps from shared compressed runs (mapper/firstmap.py) equal full_map_and_peers.

The reference is ``full_map_and_peers``: for random tailnets (sparse IDs across several runs,
expiries, tagged nodes, old clients), policies and viewers, the frame PeerRuns builds must
decode to the same response, carry the same peers, and reuse runs only while they are right.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import zstandard

from pyheadscale.mapper import MapContext, PeerCache, decode_frame, full_map_and_peers, to_plain
from pyheadscale.mapper.context import AllowAllPolicy
from pyheadscale.mapper.firstmap import RUN, PeerRuns
from pyheadscale.mapper.snapshot import Snapshot
from pyheadscale.state.model import Node, User
from tests.unit._statefix import key

NOW = datetime(2026, 8, 22, 16, 0, tzinfo=UTC)
USERS = {1: User(id=1, name="alice"), 2: User(id=2, name="bob", display_name="Bob")}


class HidePolicy(AllowAllPolicy):
    def __init__(self, hidden: set[int]) -> None:
        self.hidden = hidden

    def can_see(self, viewer: Node, peer: Node) -> bool:
        return viewer.id != peer.id and peer.id not in self.hidden


def _node(i: int, rng: random.Random) -> Node:
    tagged = rng.random() < 0.1
    # A few exit nodes: their entries depend on the viewer's routes, so runs holding one
    # are built per viewer.
    exits = tuple(map(ipaddress.ip_network, ("0.0.0.0/0", "::/0"))) if rng.random() < 0.03 else ()
    return Node(id=i, machine_key=key(i % 250), node_key=key((i + 7) % 250),
                disco_key=key((i + 3) % 250), hostname=f"n{i}", given_name=f"n{i}",
                user_id=None if tagged else rng.choice([1, 2, 3]),
                ipv4=ipaddress.IPv4Address(0x64400000 + i),
                ipv6=ipaddress.IPv6Address(f"fd7a:115c:a1e0::{i:x}"),
                register_method="authkey", created_at=NOW, updated_at=NOW,
                tags=("tag:x",) if tagged else (), online=rng.random() < 0.5,
                capver=rng.choice([100, 145]), version=1, approved_routes=exits,
                hostinfo={"RoutableIPs": [str(r) for r in exits]} if exits else {},
                expiry=NOW + timedelta(minutes=rng.choice([-5, 5, 500])))


def _check(runs: PeerRuns, nodes: dict[int, Node], viewer: Node, ctx: MapContext,
           now: datetime) -> None:
    want, want_known = full_map_and_peers(nodes, USERS, viewer, ctx, now, PeerCache())
    frame, known = runs.first_frame(Snapshot(nodes, USERS, ctx, now, PeerCache()), viewer)
    got, rest = decode_frame(frame)
    assert rest == b""
    assert got == to_plain(want)
    assert known == want_known


def test_first_frames_equal_the_reference_map() -> None:
    rng = random.Random(5)
    for _ in range(12):
        ids = sorted(rng.sample(range(1, 4 * RUN), rng.randint(1, 60)))
        nodes = {i: _node(i, rng) for i in ids}
        policy = rng.choice([AllowAllPolicy(), HidePolicy(set(rng.sample(ids, len(ids) // 4)))])
        ctx = MapContext(policy=policy, generation=1)
        runs = PeerRuns()
        for v in rng.sample(ids, min(6, len(ids))):
            _check(runs, nodes, nodes[v], ctx, NOW)
        # A member changes, an expiry passes, a node leaves: cached runs must follow.
        nodes[ids[0]] = replace(nodes[ids[0]], hostname="renamed", given_name="renamed",
                                version=2)
        later = NOW + timedelta(minutes=10)
        if len(ids) > 1:
            del nodes[ids[-1]]
        for v in list(nodes)[:4]:
            _check(runs, nodes, nodes[v], ctx, later)


def test_runs_are_shared_between_viewers_and_frames_concatenate() -> None:
    rng = random.Random(1)
    nodes = {i: _node(i, rng) for i in range(1, 3 * RUN)}
    for n in nodes.values():
        nodes[n.id] = replace(n, capver=145, approved_routes=())  # all shareable
    runs = PeerRuns()
    ctx = MapContext()
    frame, _ = runs.first_frame(Snapshot(nodes, USERS, ctx, NOW, PeerCache()), nodes[1])
    assert runs.built == 2  # runs 1 and 2; run 0 holds the viewer and is its own
    runs.first_frame(Snapshot(nodes, USERS, ctx, NOW, PeerCache()), nodes[2])
    assert runs.built == 2 and runs.reused == 2
    # More than one zstd frame, and a plain frame-by-frame decoder would stop after the first.
    body = frame[4:]
    assert body.count(b"\x28\xb5\x2f\xfd") >= 4
    assert zstandard.ZstdDecompressor().decompressobj().decompress(body).endswith(b'"Peers":[')


def test_a_run_with_a_router_is_built_per_viewer() -> None:
    rng = random.Random(2)
    nodes = {i: replace(_node(i, rng), approved_routes=()) for i in range(1, 2 * RUN)}
    exit4 = ipaddress.ip_network("0.0.0.0/0")
    nodes[RUN + 1] = replace(nodes[RUN + 1], approved_routes=(exit4,),
                             hostinfo={"RoutableIPs": ["0.0.0.0/0"]})
    runs = PeerRuns()
    _check(runs, nodes, nodes[1], MapContext(), NOW)
    assert runs.built == 0  # run 0 is the viewer's, run 1 holds the exit node
