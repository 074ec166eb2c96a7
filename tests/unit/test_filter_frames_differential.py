"""Policy and tag frames as the server builds them, against the straightforward build.

The fan-out builds a viewer's policy frame with shortcuts: the live NodeTable's key version
stands for comparing node IDs (policy peer_ids), a node's own filter is not kept between
frames, its own Node comes from a cache keyed by the node object and what else it reads,
and one PolicyManager is update()d from change to change, its evaluation index built on
first use or ahead (prepare(), as the control plane does while a window waits). The
reference for every frame is built without any of them: a PolicyManager compiled afresh
for the snapshot, the nodes as a plain dict, a fresh peer cache, and ``self_node`` built
as a dict. Through a random chain of policy sets, tag changes, capability-version-only
reports (a new node object at the same version), disable-ipv4 attrs and nodes joining and
leaving, every viewer's frame must decode to the reference's message and leave the stream
holding the same peers.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from pyheadscale.mapper import MapContext, PeerCache, decode_frame, delta, to_plain
from pyheadscale.mapper.fanout import SharedDeltas
from pyheadscale.mapper.full import KnownPeers, self_node
from pyheadscale.mapper.snapshot import Snapshot
from pyheadscale.policy import PolicyManager
from pyheadscale.state.changes import Change, ChangeKind, Field
from pyheadscale.state.model import Node, User
from pyheadscale.state.nodetable import NodeTable
from tests.unit._statefix import make_node

NOW = datetime(2026, 12, 7, 16, 0, tzinfo=UTC)
USERS = {1: User(id=1, name="alice"), 2: User(id=2, name="bob"), 3: User(id=3, name="carol")}
TAGS = ["tag:web", "tag:db", "tag:ops"]


def _node(rng: random.Random, i: int) -> Node:
    tags = (rng.choice(TAGS),) if rng.random() < 0.2 else ()
    return make_node(i, user=rng.choice([1, 2, 3]), tags=tags, node_key=bytes([i]) * 32,
                     machine_key=bytes([i]) * 32, capver=rng.choice([106, 130, 142]),
                     online=rng.random() < 0.8)


def _policy(rng: random.Random) -> str:
    aliases = ["autogroup:member", "alice@", "bob@", "group:eng", *TAGS, "100.64.0.0/27", "*"]
    acls = []
    for _ in range(rng.randint(2, 7)):
        acls.append({"action": "accept", "src": rng.sample(aliases, rng.randint(1, 2)),
                     "dst": [f"{d}:{rng.choice(['22', '80,443', '*'])}"
                             for d in rng.sample(aliases[:-1], rng.randint(1, 2))]})
    doc: dict[str, Any] = {"groups": {"group:eng": ["alice@", "carol@"]},
                           "tagOwners": {t: ["alice@"] for t in TAGS}, "acls": acls}
    if rng.random() < 0.4:
        doc["nodeAttrs"] = [{"target": [rng.choice(TAGS)], "attr": ["disable-ipv4"]}]
    if rng.random() < 0.4:
        doc["ssh"] = [{"action": "accept", "src": ["autogroup:member"],
                       "dst": [rng.choice(TAGS)], "users": ["root"]}]
    return json.dumps(doc)


def _ctx(pm: PolicyManager, gen: int) -> MapContext:
    return MapContext(policy=pm, generation=gen, base_domain="ts.example")


def _reference(batch: list[Change], nodes: dict[int, Node], text: str, gen: int,
               v: Node, known: KnownPeers) -> tuple[Any, KnownPeers]:
    """The viewer's message built without the fan-out's shortcuts."""
    fresh = PolicyManager(text, list(USERS.values()), list(nodes.values()), run_tests=False)
    ctx = _ctx(fresh, gen)
    want, known = delta(batch, nodes, USERS, v, ctx, NOW, known, PeerCache())
    if want is None:
        return None, known
    plain = to_plain(want)
    if "Node" in plain:
        assert plain["Node"] == to_plain(self_node(v, ctx, NOW))
    return plain, known


def test_policy_and_tag_frames_match_the_straightforward_build() -> None:
    rng = random.Random(23)
    frames = 0
    for _ in range(4):
        nodes = NodeTable((i, _node(rng, i)) for i in range(1, rng.randint(30, 42)))
        text = _policy(rng)
        pm = PolicyManager(text, list(USERS.values()), list(nodes.values()), run_tests=False)
        gen = 1
        shared, cache = SharedDeltas(), PeerCache()  # live for the whole chain, as a loop's
        snap = Snapshot(nodes, USERS, _ctx(pm, gen), NOW, cache)
        got_known: dict[int, KnownPeers] = {}
        want_known: dict[int, KnownPeers] = {}
        for v in nodes.values():
            _, got_known[v.id] = shared.first_frame(snap, v)
            want_known[v.id] = got_known[v.id].copy()
        next_id = max(nodes) + 1
        for _ in range(8):
            k = rng.randrange(5)
            batch = [Change(ChangeKind.POLICY)]
            if k == 0:  # SetTags on one node
                nid = rng.choice(list(nodes))
                n = nodes[nid]
                nodes[nid] = (replace(n, tags=(), user_id=rng.choice([1, 2, 3]),
                                      version=n.version + 1) if n.tags
                              else replace(n, tags=(rng.choice(TAGS),), user_id=None,
                                           version=n.version + 1))
                batch.insert(0, Change(ChangeKind.NODE_CHANGED, nid,
                                       frozenset({Field.TAGS, Field.USER, Field.EXPIRY})))
            elif k == 1:  # a node joins, another leaves (the key set changes)
                gone = rng.choice(list(nodes))
                del nodes[gone]
                got_known.pop(gone)
                want_known.pop(gone)
                nodes[next_id] = _node(rng, next_id)
                batch = [Change(ChangeKind.NODE_REMOVED, gone),
                         Change(ChangeKind.NODE_ADDED, next_id), *batch]
                next_id += 1
            elif k == 2:  # capability versions reported live: new objects, same version
                for nid in rng.sample(list(nodes), 5):
                    nodes[nid] = replace(nodes[nid], capver=rng.choice([106, 130, 142]))
            else:  # another policy, or the same one set again
                text = _policy(rng) if k == 3 else text
            if k == 3 or k == 4:
                pm = PolicyManager(text, list(USERS.values()), list(nodes.values()),
                                   run_tests=False)
            else:
                pm.update(nodes=list(nodes.values()))
            if rng.random() < 0.5:
                pm.prepare()  # the index built ahead, as the control plane does in the window
            gen += 1
            snap = Snapshot(nodes, USERS, _ctx(pm, gen), NOW, cache)
            plain_nodes = dict(nodes)
            for v in list(nodes.values()):
                if v.id not in got_known:  # joined now: its first map, as a new stream
                    _, got_known[v.id] = shared.first_frame(snap, v)
                    want_known[v.id] = got_known[v.id].copy()
                    continue
                want, want_known[v.id] = _reference(batch, plain_nodes, text, gen, v,
                                                    want_known[v.id])
                frame = shared.frame(batch, snap, v, got_known[v.id])
                got = decode_frame(frame)[0] if frame is not None else None
                assert got == want, f"viewer {v.id}"
                assert got_known[v.id] == want_known[v.id], f"viewer {v.id}: peers"
                frames += got is not None
    assert frames >= 600
