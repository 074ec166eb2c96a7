"""What N map sessions hold between frames, measured in-process (no network, no server).

    python -m tests.bench.mapstate --nodes 2000

A join storm in miniature: nodes join in groups (one batch of NODE_ADDED changes per group,
as the bus coalesces them); every session already open gets its frame for the batch from
one ``SharedDeltas``, each new node gets its first map; then 50 nodes change their
endpoints, one batch each. Reported: the memory the sessions' known peers hold between
frames (tracemalloc, in a second run: it slows everything), the objects the cyclic GC
tracks and the time of one full collection with every session alive, the last first map's
size (what a stream holding on to its first frame would keep), and the CPU of the storm and
of one change. The last line is one JSON object. The figures are the map layer's alone;
tests/bench/control.py measures the whole server.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import time
import tracemalloc
from datetime import UTC, datetime

from pyheadscale.mapper import MapContext, PeerCache
from pyheadscale.mapper.fanout import SharedDeltas
from pyheadscale.mapper.snapshot import Snapshot
from pyheadscale.state.changes import Change, ChangeKind, Field
from pyheadscale.state.model import Node, User

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
CREATED = datetime(2026, 12, 1, tzinfo=UTC)
USERS = {1: User(id=1, name="bench")}


def _node(i: int, endpoint_round: int = 0) -> Node:
    return Node(
        id=i, machine_key=i.to_bytes(32, "big"), node_key=(i + 1 << 20).to_bytes(32, "big"),
        disco_key=(i + 2 << 20).to_bytes(32, "big"), hostname=f"bench-{i}",
        given_name=f"bench-{i}", user_id=1,
        ipv4=ipaddress.IPv4Address(0x64400000 + i), ipv6=ipaddress.IPv6Address(
            (0xFD7A115CA1E0 << 80) + i),
        register_method="authkey", created_at=CREATED, updated_at=CREATED, tags=(),
        hostinfo={"Hostname": f"bench-{i}", "OS": "linux",
                  "NetInfo": {"PreferredDERP": 999}},
        endpoints=(f"192.0.2.{i % 250 + 1}:{41641 + endpoint_round}",),
        approved_routes=(), online=True, capver=142, version=1 + endpoint_round)


class GCClock:
    """Wall time the cyclic GC spends collecting, per generation (gc.callbacks)."""

    def __init__(self) -> None:
        self.spent = [0.0, 0.0, 0.0]
        self.runs = [0, 0, 0]
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.spent[info["generation"]] += time.perf_counter() - self._t0
            self.runs[info["generation"]] += 1


def run(n: int, group: int, traced: bool) -> dict[str, float]:
    nodes: dict[int, Node] = {}
    ctx = MapContext()
    cache = PeerCache()
    shared = SharedDeltas()
    sessions: dict[int, object] = {}  # node id -> its stream's known peers
    first_bytes = 0
    clock = GCClock()
    gc.callbacks.append(clock)
    cpu0 = time.process_time()
    for start in range(1, n + 1, group):
        ids = range(start, min(start + group, n + 1))
        for i in ids:
            nodes[i] = _node(i)
        batch = [Change(ChangeKind.NODE_ADDED, i) for i in ids]
        snap = Snapshot(nodes, USERS, ctx, NOW, cache)
        for vid, known in sessions.items():
            shared.frame(batch, snap, nodes[vid], known)  # type: ignore[arg-type]
        for i in ids:
            frame, known = shared.first_frame(snap, nodes[i])
            first_bytes = len(frame)
            sessions[i] = known
    join_cpu = time.process_time() - cpu0
    gc.callbacks.remove(clock)
    cpu0 = time.process_time()
    for i in range(1, n + 1, max(1, n // 50)):  # 50 endpoint changes, one batch each
        nodes[i] = _node(i, 1)
        batch = [Change(ChangeKind.NODE_PATCH, i, frozenset({Field.ENDPOINTS}))]
        snap = Snapshot(nodes, USERS, ctx, NOW, cache)
        for vid, known in sessions.items():
            shared.frame(batch, snap, nodes[vid], known)  # type: ignore[arg-type]
    change_cpu = (time.process_time() - cpu0) / 50
    gc.collect()
    if traced:
        held_with, _ = tracemalloc.get_traced_memory()
        sessions.clear()
        gc.collect()
        held = held_with - tracemalloc.get_traced_memory()[0]
        return {"known_peers_mib": held / 2**20,
                "known_peers_bytes_per_pair": held / (n * (n - 1))}
    tracked = len(gc.get_objects())
    full_gc = float("inf")
    for _ in range(3):  # the quickest of three: a busy machine only adds
        t0 = time.thread_time()
        gc.collect()
        full_gc = min(full_gc, time.thread_time() - t0)
    return {"nodes": n, "gc_tracked_objects": tracked, "full_gc_ms": full_gc * 1000,
            "first_map_kib": first_bytes / 1024, "join_cpu_s": join_cpu,
            "join_gc_s": sum(clock.spent), "join_gc_full_s": clock.spent[2],
            "join_gc_full_runs": clock.runs[2],
            "cpu_per_change_ms": change_cpu * 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--group", type=int, default=32, help="joins per batch")
    args = ap.parse_args()
    out = run(args.nodes, args.group, traced=False)
    tracemalloc.start()
    out.update(run(args.nodes, args.group, traced=True))
    tracemalloc.stop()
    for k, v in out.items():
        print(f"{k:28} {v:,.3f}" if isinstance(v, float) else f"{k:28} {v:,}")
    print(json.dumps({k: round(v, 3) for k, v in out.items()}))


if __name__ == "__main__":
    main()
