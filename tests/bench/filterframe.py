"""Per-viewer cost of a filter frame, in-process: the control benchmark's policy phase
replayed through the real fan-out (``SharedDeltas``), without network or server.

    python -m tests.bench.filterframe [--nodes 1000] [--rules 200] [--repeat 3] [--profile]

As in tests/bench/control.py: every node belongs to the benchmark's user, all hold their
first map under no policy (allow-all); then the generated policy is set (one POLICY batch to
every viewer), then one node is tagged ``tag:t0`` (NODE_CHANGED + POLICY). Each viewer's
frame for each batch is built as a map stream builds it (``SharedDeltas.frame``) and timed
by thread CPU (the least of --repeat runs); ``update()`` of the policy is timed apart. ``--profile`` prints where the
tag change's per-viewer time goes (cProfile, top functions). The last line is one JSON
object. The write path (Noise, HTTP/2) is not here: tests/bench/control.py measures it.
"""

from __future__ import annotations

import argparse
import cProfile
import ipaddress
import json
import pstats
import random
import time
from dataclasses import replace
from datetime import UTC, datetime

from pyheadscale.mapper import MapContext, PeerCache
from pyheadscale.mapper.fanout import SharedDeltas
from pyheadscale.mapper.full import KnownPeers
from pyheadscale.mapper.snapshot import Snapshot
from pyheadscale.policy import PolicyManager
from pyheadscale.state.changes import Change, ChangeKind, Field
from pyheadscale.state.model import Node, User
from pyheadscale.state.nodetable import NodeTable
from tests.bench.control import TAG, USER, policy_users
from tests.bench.policy import make_policy

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
CREATED = datetime(2026, 12, 1, tzinfo=UTC)


def make_nodes(n: int) -> NodeTable:
    """The tailnet as the server holds it (a NodeTable: policy.peer_ids relies on it)."""
    return NodeTable((i, Node(
        id=i, machine_key=i.to_bytes(32, "big"), node_key=(i + 1 << 20).to_bytes(32, "big"),
        disco_key=(i + 2 << 20).to_bytes(32, "big"), hostname=f"bench-{i}",
        given_name=f"bench-{i}", user_id=1,
        ipv4=ipaddress.IPv4Address(0x64400000 + i),
        ipv6=ipaddress.IPv6Address((0xFD7A115CA1E0 << 80) + i),
        register_method="authkey", created_at=CREATED, updated_at=CREATED, tags=(),
        hostinfo={"Hostname": f"bench-{i}", "OS": "linux", "NetInfo": {"PreferredDERP": 999}},
        endpoints=(f"192.0.2.{i % 250 + 1}:41641",), approved_routes=(), online=True,
        capver=142, version=1)) for i in range(1, n + 1))


def make_users() -> dict[int, User]:
    return {i: User(id=i, name=name, email=f"{name}@example.com")
            for i, name in enumerate(policy_users(), 1)}


def fan_out(shared: SharedDeltas, batch: list[Change], snap: Snapshot,
            sessions: dict[int, KnownPeers]) -> tuple[float, float, int, int]:
    """Every viewer's frame for ``batch``: (thread CPU seconds of the first viewer, which
    builds the snapshot's evaluation index, and of all of them; frames; bytes)."""
    frames = size = 0
    first = 0.0
    t0 = time.thread_time()
    for vid, known in sessions.items():
        frame = shared.frame(batch, snap, snap.nodes[vid], known)
        if not first:
            first = time.thread_time() - t0
        if frame is not None:
            frames += 1
            size += len(frame)
    return first, time.thread_time() - t0, frames, size


def run(n: int, rules: int, seed: int, profile: bool) -> dict[str, float]:
    nodes = make_nodes(n)
    users = make_users()
    cache = PeerCache()
    shared = SharedDeltas()
    ctx = MapContext(base_domain="ts.example", generation=1)
    snap = Snapshot(nodes, users, ctx, NOW, cache)
    sessions = {i: shared.first_frame(snap, nodes[i])[1] for i in nodes}

    text = make_policy(rules, random.Random(seed), policy_users())
    t0 = time.thread_time()
    pm = PolicyManager(text, list(users.values()), list(nodes.values()), run_tests=False)
    compile_s = time.thread_time() - t0
    ctx = replace(ctx, policy=pm, generation=2)
    snap = Snapshot(nodes, users, ctx, NOW, cache)
    pol_first, pol_s, pol_frames, pol_bytes = fan_out(shared, [Change(ChangeKind.POLICY)], snap, sessions)

    nodes[1] = replace(nodes[1], tags=(TAG,), user_id=None, version=2)
    t0 = time.thread_time()
    pm.update(nodes=list(nodes.values()))
    update_s = time.thread_time() - t0
    ctx = replace(ctx, generation=3)
    snap = Snapshot(nodes, users, ctx, NOW, cache)
    batch = [Change(ChangeKind.NODE_CHANGED, 1, frozenset({Field.TAGS, Field.USER,
                                                           Field.EXPIRY})),
             Change(ChangeKind.POLICY)]
    prof = cProfile.Profile(time.thread_time) if profile else None
    if prof is not None:
        prof.enable()
    tag_first, tag_s, tag_frames, tag_bytes = fan_out(shared, batch, snap, sessions)
    if prof is not None:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return {"nodes": n, "rules": rules, "policy_compile_s": compile_s,
            "policy_fanout_s": pol_s, "policy_first_viewer_s": pol_first,
            "policy_us_per_next_viewer": (pol_s - pol_first) / max(1, n - 1) * 1e6,
            "policy_frames": pol_frames, "policy_frame_bytes_mean": pol_bytes / max(1, pol_frames),
            "tag_update_s": update_s, "tag_fanout_s": tag_s, "tag_first_viewer_s": tag_first,
            "tag_us_per_next_viewer": (tag_s - tag_first) / max(1, n - 1) * 1e6, "tag_frames": tag_frames,
            "tag_frame_bytes_mean": tag_bytes / max(1, tag_frames)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--rules", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1, help="the control benchmark's default")
    ap.add_argument("--repeat", type=int, default=3, help="runs; each time figure is the least")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    out = run(args.nodes, args.rules, args.seed, args.profile)
    for _ in range(args.repeat - 1):  # a busy machine only adds
        again = run(args.nodes, args.rules, args.seed, False)
        out = {k: min(v, again[k]) if k.endswith(("_s", "_viewer")) else v
               for k, v in out.items()}
    for k, v in out.items():
        print(f"{k:28} {v:,.3f}" if isinstance(v, float) else f"{k:28} {v:,}")
    print(json.dumps({"benchmark": "filterframe", "user": USER,
                      **{k: round(v, 4) for k, v in out.items()}}))


if __name__ == "__main__":
    main()
