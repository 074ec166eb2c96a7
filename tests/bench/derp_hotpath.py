"""The relay's Python forwarding path alone: CPU microseconds per packet, no sockets, no TLS.

    python -m tests.bench.derp_hotpath [--pairs 10] [--batch 48] [--seconds 3]

DerpServer with `pairs` sender/receiver connections on in-memory transports; each round feeds
every sender one read's worth of SendPacket frames (`batch` 1,300-byte packets, through
get_buffer/buffer_updated, the way a transport hands over a read), and counts what the
receivers' transports got. CPU time (process_time) per forwarded packet is the figure; it
is far steadier than the end-to-end benchmark on a busy machine, so it is the one to watch
while changing derp/conn.py. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

from derp import protocol as p
from derp.conn import ClientConn
from derp.keys import generate_private_key
from derp.server import DerpServer
from tests.bench.common import emit_json, install_uvloop
from tests.memtransport import MemTransport

PAYLOAD = 1300


def _attach(srv: DerpServer) -> tuple[ClientConn, MemTransport, bytes]:
    priv = generate_private_key()
    pub = p.public_key_of(priv)
    conn = srv.new_connection("127.0.0.1", 1)
    t = MemTransport()
    conn.start(t)
    conn.data_received(p.client_info_frame(priv, srv.public_key, p.ClientInfo()))
    return conn, t, pub


async def run(pairs: int, batch: int, seconds: float) -> dict[str, Any]:
    srv = DerpServer(generate_private_key())
    senders = []
    receivers = []
    for _ in range(pairs):
        a, _, _ = _attach(srv)
        _, tb, pub_b = _attach(srv)
        frame = p.send_packet_frame(pub_b, b"\x04" + os.urandom(PAYLOAD - 1))
        senders.append((a, frame * batch))
        receivers.append(tb)
    for t in receivers:
        t.out = t.writes = 0
    rounds = 0
    c0 = time.process_time()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for conn, chunk in senders:
            view = memoryview(chunk)
            while view:
                buf = conn.get_buffer(len(view))
                k = min(len(buf), len(view))
                buf[:k] = view[:k]
                conn.buffer_updated(k)
                view = view[k:]
        await asyncio.sleep(0)  # anything the loop has to run
        rounds += 1
    cpu = time.process_time() - c0
    packets = rounds * pairs * batch
    got = sum(t.out for t in receivers) // (5 + 32 + PAYLOAD)
    if got != packets:
        raise SystemExit(f"forwarded {got} of {packets} packets")
    writes = sum(t.writes for t in receivers)
    return {"packets": packets, "cpu_s": round(cpu, 3),
            "us_per_packet": round(cpu / packets * 1e6, 3),
            "packets_per_write": round(packets / writes, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=48, help="packets per sender per read")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args(argv)
    uv = install_uvloop()
    res = asyncio.run(run(args.pairs, args.batch, args.seconds))
    print(f"{res['us_per_packet']} µs CPU per forwarded packet ({res['packets']} packets, "
          f"{res['packets_per_write']} per write, uvloop {uv})")
    emit_json({"benchmark": "derp_hotpath", "pairs": args.pairs, "batch": args.batch,
               "uvloop": uv, **res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
