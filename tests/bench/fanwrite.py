"""One change fanned out to N open map sessions through the real write path, in-process.

    python -m tests.bench.fanwrite --nodes 3000

Each session is a real map stream (``stream_maps``) on its own ``H2ControlConnection`` with
real Noise records, fed by one ``ChangeBus`` and one ``SharedDeltas``, writing to a sink
that only counts bytes (no sockets, no clients: their CPU is not in the figures). Measured:
the event loop's CPU from publishing one endpoint change until every other session has
written its frame (per session, in µs), and when the first and the last frame left (the
tail a p99 sees). Then a join-storm miniature: batches of NODE_ADDED changes, each reaching
every open session. The last line is one JSON object; tests/bench/control.py measures the
whole server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import h2.config
import h2.connection
import h2.settings

from pyheadscale.control.h2server import H2ControlConnection
from pyheadscale.control.poll import MapPoll, stream_maps
from pyheadscale.control.types import ControlRequest, ResponseStream
from pyheadscale.mapper import MapContext, PeerCache
from pyheadscale.mapper.fanout import SharedDeltas
from pyheadscale.noise import Initiator, generate_private_key, public_key, respond
from pyheadscale.state.changes import Change, ChangeBus, ChangeKind, Field
from pyheadscale.state.model import Node
from tests.bench.mapstate import USERS, _node


@dataclass
class CountingSink:
    """Takes ciphertext at once and keeps only counts; the clock of the last write."""

    stats: Stats
    closed: bool = False

    async def write(self, data: bytes) -> None:
        self.write_nowait(data)

    def ready(self) -> bool:
        return not self.closed

    def write_nowait(self, data: bytes) -> None:
        s = self.stats
        s.writes += 1
        s.bytes += len(data)
        s.last = time.perf_counter()
        if s.first == 0.0:
            s.first = s.last
        if s.writes >= s.expect and s.done is not None and not s.done.done():
            s.done.set_result(None)

    async def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


@dataclass
class Stats:
    writes: int = 0
    bytes: int = 0
    first: float = 0.0
    last: float = 0.0
    expect: int = 1 << 62
    done: asyncio.Future[None] | None = None
    marks: list[float] = field(default_factory=list)

    def arm(self, expect: int) -> asyncio.Future[None]:
        self.writes, self.bytes, self.first, self.last = 0, 0, 0.0, 0.0
        self.expect = expect
        self.done = asyncio.get_running_loop().create_future()
        return self.done


def _open(conn: H2ControlConnection, client_records: Any, node_id: int) -> None:
    """The client's preface, SETTINGS with the largest windows, and the map request."""
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.local_settings = h2.settings.Settings(client=True, initial_values={
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    client.initiate_connection()
    client.increment_flow_control_window(2**31 - 1 - 65535)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, [(":method", "POST"), (":scheme", "https"),
                              (":authority", "bench"), (":path", "/machine/map"),
                              ("x-node", str(node_id))], end_stream=True)
    conn.feed(client_records.seal(client.data_to_send()))


async def run(n: int, changes: int, group: int) -> dict[str, float]:
    nodes: dict[int, Node] = {i: _node(i) for i in range(1, n + 1)}
    bus = ChangeBus(batch_delay=0.05)
    tn = SimpleNamespace(nodes=nodes, users=USERS, bus=bus, get_node=nodes.__getitem__)
    ctx = MapContext()
    poll = MapPoll(tn, lambda: ctx, PeerCache(), SharedDeltas(),  # type: ignore[arg-type]
                   lambda _nid: None)
    stats = Stats()
    ready = 0
    all_ready = asyncio.Event()

    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        nonlocal ready
        nid = int(req.headers["x-node"])
        sub = bus.subscribe(nid)
        await resp.start(200, [("content-type", "application/json")])
        ready += 1
        if ready == n:
            all_ready.set()
        await stream_maps(poll, nid, sub, resp)

    skey = generate_private_key()
    conns = []
    for i in range(1, n + 1):
        ini = Initiator(generate_private_key(), public_key(skey), 131)
        res = respond(skey, ini.initiation())
        client_records = ini.finish(res.message).records()
        conn = H2ControlConnection(records=res.records(), sink=CountingSink(stats),
                                   dispatch=dispatch, machine_key=res.peer_static,
                                   capver=res.version, conn_id=i)
        conn.start()
        _open(conn, client_records, i)
        conns.append(conn)
    await all_ready.wait()
    await asyncio.sleep(0.2)  # first maps written

    per_session: list[float] = []
    tails: list[float] = []
    firsts: list[float] = []
    for r in range(changes):
        nid = 1 + (r * 7919) % n
        nodes[nid] = replace(nodes[nid], endpoints=(f"198.51.100.{r % 250 + 1}:{41641 + r}",))
        done = stats.arm(n - 1)
        cpu0 = time.thread_time()
        t0 = time.perf_counter()
        bus.publish(Change(ChangeKind.NODE_PATCH, nid, frozenset({Field.ENDPOINTS})))
        await asyncio.wait_for(done, 60)
        # The loop's CPU includes the batching window's idle wait only as idle (thread time).
        per_session.append((time.thread_time() - cpu0) / (n - 1) * 1e6)
        firsts.append(stats.first - t0 - bus.batch_delay)
        tails.append(stats.last - t0 - bus.batch_delay)
        await asyncio.sleep(0.3)  # a quiet spell: the next change is not a storm's

    # A join storm in miniature: batches of NODE_ADDED for nodes new to the tailnet, each
    # reaching every open session (no first maps here: those are the mapper's).
    storm_cpu = time.thread_time()
    batches = 0
    for start in range(n + 1, n + 1 + group * 10, group):
        ids = range(start, start + group)
        for i in ids:
            nodes[i] = _node(i)
        done = stats.arm(n)
        bus.publish(*(Change(ChangeKind.NODE_ADDED, i) for i in ids))
        await asyncio.wait_for(done, 60)
        batches += 1
    storm_per_frame = (time.thread_time() - storm_cpu) / (batches * n) * 1e6

    for c in conns:
        c.close()
    await asyncio.sleep(0.1)
    return {"nodes": n, "change_cpu_us_per_session": statistics.median(per_session),
            "change_first_write_ms": statistics.median(firsts) * 1e3,
            "change_last_write_ms": statistics.median(tails) * 1e3,
            "storm_cpu_us_per_frame": storm_per_frame}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--changes", type=int, default=5, help="endpoint changes, one at a time")
    ap.add_argument("--group", type=int, default=32, help="joins per storm batch")
    args = ap.parse_args()
    try:
        import uvloop
        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    out = runner(run(args.nodes, args.changes, args.group))
    for k, v in out.items():
        print(f"{k:30} {v:,.3f}" if isinstance(v, float) else f"{k:30} {v:,}")
    print(json.dumps({k: round(v, 3) for k, v in out.items()}))


if __name__ == "__main__":
    main()
