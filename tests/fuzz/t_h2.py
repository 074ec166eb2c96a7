"""HTTP/2 frames inside Noise records, through H2ControlConnection into the real control
plane (register, map polls, SSH actions): client frames made by h2, then edited in the
plaintext (so they still pass the AEAD) and sealed into records of random sizes."""

from __future__ import annotations

import asyncio
import os
import random

import h2.config
import h2.connection
import h2.errors
import h2.exceptions
import h2.settings

from pyheadscale.control.h2limits import BodyBudget, H2Limits
from pyheadscale.control.h2server import H2ControlConnection
from pyheadscale.noise import MAX_PLAINTEXT, RecordLayer
from tests.fuzz.harness import FuzzContext
from tests.fuzz.mutate import chunks, mutate
from tests.fuzz.t_control import request_body

PATHS = ["/machine/map", "/machine/register", "/machine/ssh/action/1/2", "/machine/x", "/",
         "/machine/map?x=1", "*", ""]


class NullSink:
    def __init__(self) -> None:
        self.bytes = 0

    async def write(self, data: bytes) -> None:
        self.bytes += len(data)

    def ready(self) -> bool:
        return True

    def write_nowait(self, data: bytes) -> None:
        self.bytes += len(data)

    async def close(self) -> None:
        return None

    def abort(self) -> None:
        self.closed = True


def client_frames(rng: random.Random, ctx: FuzzContext, mk_index: int | None) -> bytes:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                             header_encoding=None))
    c.initiate_connection()
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(10)
        try:
            if op < 5:
                sid = c.get_next_available_stream_id()
                path = rng.choice(PATHS)
                hdrs = [(":method", rng.choice(["POST", "GET", "PUT"])), (":scheme", "https"),
                        (":authority", "unused"), (":path", path)]
                body = request_body(rng, ctx, path, mk_index) if rng.random() < 0.9 else b""
                if rng.random() < 0.3:
                    hdrs.append(("content-length", str(rng.choice((len(body), 0, 1 << 30)))))
                c.send_headers(sid, hdrs, end_stream=not body)
                if body:
                    room = min(len(body), c.local_flow_control_window(sid))
                    c.send_data(sid, body[:room], end_stream=rng.random() < 0.9)
            elif op == 5:
                c.ping(rng.randbytes(8))
            elif op == 6:
                c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE:
                                   rng.choice((0, 1, 65535, 1 << 30)),
                                   h2.settings.SettingCodes.MAX_FRAME_SIZE: 16384})
            elif op == 7 and c.open_outbound_streams:
                c.reset_stream(max(c.streams), rng.choice(list(h2.errors.ErrorCodes)))
            elif op == 8:
                c.increment_flow_control_window(rng.randrange(1, 1 << 20))
            else:
                c.close_connection(rng.choice(list(h2.errors.ErrorCodes)))
        except (h2.exceptions.ProtocolError, ValueError):
            pass
    return c.data_to_send()


async def run(ctx: FuzzContext, part: int, n: int) -> int:
    rng = ctx.rng("h2", part)
    budget = BodyBudget(64 << 20)
    limits = H2Limits(body_timeout=0.05, handshake_timeout=0.5, unregistered_idle_timeout=0.5)
    tn = ctx.server.tailnet
    for i in range(n):
        mk_index = rng.randrange(len(ctx.nodes)) if rng.random() < 0.6 else None
        machine = ctx.nodes[mk_index][0] if mk_index is not None else os.urandom(32)
        tx, rx = os.urandom(32), os.urandom(32)
        client = RecordLayer(rx, tx)
        conn = H2ControlConnection(
            records=RecordLayer(tx, rx), sink=NullSink(), dispatch=ctx.server.control.dispatch,
            machine_key=machine, capver=rng.choice((113, 130, 142)), limits=limits,
            budget=budget, is_registered=lambda mk: bool(tn.nodes_by_machine_key(mk)),
            remote=f"198.51.100.{rng.randrange(256)}")
        conn.start()
        plain = client_frames(rng, ctx, mk_index)
        if rng.random() < 0.4:
            plain = mutate(rng, plain)
        records = b"".join(client.seal(plain[j:j + MAX_PLAINTEXT])
                           for j in range(0, len(plain), rng.choice((9, 100, MAX_PLAINTEXT))))
        for chunk in chunks(rng, records):
            conn.feed(chunk)
            if conn.closing:
                break
        for _ in range(rng.choice((1, 3, 10))):
            await asyncio.sleep(0)
        conn.close("input done")
        await conn.wait_closed()
        if conn.buffered:
            ctx.fail("h2", i, f"{conn.buffered} body bytes still counted after close")
        if i % 200 == 0:
            await asyncio.sleep(0.01)  # let cancelled handlers finish their cleanup
    await asyncio.sleep(0.05)
    if budget.used:
        ctx.fail("h2", -1, f"body budget still holds {budget.used} bytes")
    return n


