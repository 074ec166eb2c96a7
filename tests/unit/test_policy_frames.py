"""Policy changes on the wire: shared source lists.

Long PacketFilter SrcIPs lists are encoded and compressed once and spliced into every frame
that carries them (mapper/encode.py). The reference is ``delta``: every frame SharedDeltas
serves must decode to what ``delta`` sends, and a client applying them must hold what a
client applying ``delta``'s responses holds, after every change of a random chain (tags set
and dropped, policies swapped, the same policy set again).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from pyheadscale.mapper import MapContext, PeerCache, decode_frame, delta, encode_frame, to_plain
from pyheadscale.mapper.encode import SHARED_MIN, compress
from pyheadscale.mapper.fanout import SharedDeltas
from pyheadscale.mapper.full import KnownPeers, full_map_and_peers
from pyheadscale.mapper.snapshot import Snapshot
from pyheadscale.policy import PolicyManager
from pyheadscale.state.changes import Change, ChangeKind, Field
from pyheadscale.state.model import Node, User
from pyheadscale.tailcfg import dumps
from tests.unit._statefix import make_node

NOW = datetime(2026, 8, 22, 16, 0, tzinfo=UTC)
USERS = {1: User(id=1, name="alice"), 2: User(id=2, name="bob"), 3: User(id=3, name="carol")}
TAGS = ["tag:web", "tag:db", "tag:ops"]
# What a client keeps from a map message until a later one carries it again.
HELD = ("Node", "PacketFilter", "SSHPolicy", "DNSConfig", "DERPMap")


def _nodes(rng: random.Random, n: int) -> dict[int, Node]:
    out = {}
    for i in range(1, n + 1):
        tags = (rng.choice(TAGS),) if rng.random() < 0.2 else ()
        out[i] = make_node(i, user=rng.choice([1, 2, 3]), tags=tags,
                           node_key=bytes([i]) * 32, machine_key=bytes([i]) * 32)
    return out


def _policy(rng: random.Random) -> str:
    aliases = ["autogroup:member", "alice@", "bob@", "group:eng", *TAGS, "100.64.0.0/26", "*"]
    acls = []
    for _ in range(rng.randint(3, 8)):
        acls.append({"action": "accept",
                     "src": rng.sample(aliases, rng.randint(1, 2)),
                     "dst": [f"{d}:{rng.choice(['22', '80,443', '*'])}"
                             for d in rng.sample(aliases[:-1], rng.randint(1, 2))]})
    doc: dict[str, Any] = {"groups": {"group:eng": ["alice@", "carol@"]},
                           "tagOwners": {t: ["alice@"] for t in TAGS}, "acls": acls}
    if rng.random() < 0.5:
        doc["ssh"] = [{"action": "accept", "src": ["autogroup:member"],
                       "dst": [rng.choice(TAGS)], "users": ["root"]}]
    return json.dumps(doc)


def _apply(state: dict[str, Any], msg: Any) -> None:
    if msg is None:
        return
    for name in HELD:
        if name in msg:
            state[name] = msg[name]


def _ctx(pm: PolicyManager, gen: int) -> MapContext:
    return MapContext(policy=pm, generation=gen, base_domain="ts.example")


def test_policy_frames_decode_to_what_delta_sends() -> None:
    rng = random.Random(11)
    steps = 0
    for _ in range(6):
        nodes = _nodes(rng, rng.randint(36, 48))
        text = _policy(rng)
        pm = PolicyManager(text, list(USERS.values()), list(nodes.values()), run_tests=False)
        gen = 1
        ctx = _ctx(pm, gen)
        shared = SharedDeltas()
        cache = PeerCache()
        snap = Snapshot(nodes, USERS, ctx, NOW, cache)
        got_state: dict[int, dict[str, Any]] = {}
        want_state: dict[int, dict[str, Any]] = {}
        got_known: dict[int, KnownPeers] = {}
        want_known: dict[int, KnownPeers] = {}
        for v in nodes.values():
            frame, got_known[v.id] = shared.first_frame(snap, v)
            first, _ = decode_frame(frame)
            want, want_known[v.id] = full_map_and_peers(nodes, USERS, v, ctx, NOW, PeerCache())
            assert first == to_plain(want)  # shared source lists decode to the same map
            got_state[v.id], want_state[v.id] = {}, {}
            _apply(got_state[v.id], first)
            _apply(want_state[v.id], first)
        for _ in range(6):
            k = rng.randrange(3)
            batch = [Change(ChangeKind.POLICY)]
            if k == 0:  # one node's tags (SetTags): only some filters change
                nid = rng.choice(list(nodes))
                n = nodes[nid]
                nodes = dict(nodes)
                nodes[nid] = (replace(n, tags=(), user_id=rng.choice([1, 2, 3])) if n.tags
                              else replace(n, tags=(rng.choice(TAGS),), user_id=None))
                pm.update(nodes=list(nodes.values()))
                batch.insert(0, Change(ChangeKind.NODE_CHANGED, nid,
                                       frozenset({Field.TAGS, Field.USER, Field.EXPIRY})))
            else:  # another policy, or the same one set again (nothing changes)
                text = _policy(rng) if k == 1 else text
                pm = PolicyManager(text, list(USERS.values()), list(nodes.values()),
                                   run_tests=False)
            gen += 1
            ctx = _ctx(pm, gen)
            snap = Snapshot(nodes, USERS, ctx, NOW, cache)
            for v in nodes.values():
                want, want_known[v.id] = delta(batch, nodes, USERS, v, ctx, NOW,
                                               want_known[v.id], PeerCache())
                frame = shared.frame(batch, snap, v, got_known[v.id])
                got = decode_frame(frame)[0] if frame is not None else None
                assert (got is None) == (want is None), f"viewer {v.id}"
                _apply(want_state[v.id], to_plain(want) if want is not None else None)
                _apply(got_state[v.id], got)
                assert got_state[v.id] == want_state[v.id], f"viewer {v.id}"
                assert got_known[v.id] == want_known[v.id], f"viewer {v.id}: peers"
                if got is not None and want is not None:
                    plain = to_plain(want)
                    assert {k: x for k, x in got.items() if k != "ControlTime"} == {
                        k: x for k, x in plain.items() if k != "ControlTime"}
            steps += 1
    assert steps >= 30


def test_long_source_lists_are_compressed_once_and_shared() -> None:
    nodes = {i: make_node(i, user=1 + i % 2) for i in range(1, 41)}
    text = json.dumps({"acls": [
        {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:80"]},
        {"action": "accept", "src": ["alice@"], "dst": ["bob@:22"]}]})
    pm = PolicyManager(text, list(USERS.values()), list(nodes.values()), run_tests=False)
    a, b = pm.packet_filter(nodes[1]), pm.packet_filter(nodes[2])
    src = a[0]["SrcIPs"]
    assert len(src) >= SHARED_MIN and b[0]["SrcIPs"] == src
    piece = compress(dumps(src))
    frames = [encode_frame({"PacketFilter": f, "ControlTime": "x"}) for f in (a, b)]
    for f, rules in zip(frames, (a, b), strict=True):
        assert piece in f  # the same compressed bytes in both frames
        obj, rest = decode_frame(f)
        assert rest == b"" and obj == {"PacketFilter": rules, "ControlTime": "x"}
    # An equal list that is another object (a recompiled policy) gets the same piece.
    again = [{**r, "SrcIPs": list(r["SrcIPs"])} for r in a]
    assert piece in encode_frame({"PacketFilter": again})



def test_raw_frames_decode_alone_and_between_compressed_ones() -> None:
    import zstandard

    from pyheadscale.mapper.encode import RAW_MAX, raw_frame

    rng = random.Random(3)
    dec = zstandard.ZstdDecompressor()
    for n in [*range(1, 300), *range(RAW_MAX - 20, RAW_MAX + 1)]:
        data = rng.randbytes(n)
        frame = raw_frame(data)
        assert dec.decompress(frame) == data  # one frame, its content size in the header
        assert zstandard.get_frame_parameters(frame).content_size == n
        both = compress(b"[1,") + frame + compress(b"2]")
        assert dec.decompressobj(read_across_frames=True).decompress(both) == (
            b"[1," + data + b"2]")
    for bad in (b"", bytes(RAW_MAX + 1)):
        with pytest.raises(ValueError):
            raw_frame(bad)
