"""Noise: handshake initiations and transport records, in memory and over /ts2021 sockets."""

from __future__ import annotations

import asyncio
import base64
import os

from pyheadscale.noise import (
    HandshakeError,
    Initiator,
    RecordError,
    RecordLayer,
    generate_private_key,
    public_key,
    respond,
)
from pyheadscale.noise.keys import load_or_create_private_key
from tests.fuzz.harness import FuzzContext
from tests.fuzz.mutate import chunks, mutate
from tests.netutil import say_and_hang_up

SOCKET_SHARE = 0.01  # of this target's inputs, over real TCP to the server's /ts2021


async def run(ctx: FuzzContext, part: int, n: int) -> int:
    rng = ctx.rng("noise", part)
    server_key = load_or_create_private_key(ctx.server.cfg.noise.private_key_path)
    inits = [Initiator(generate_private_key(), public_key(server_key), v).initiation()
             for v in (39, 113, 130, 142)]
    done = 0
    n_sockets = max(1, int(n * SOCKET_SHARE))
    for i in range(n - n_sockets):
        if i % 4 == 0:  # a handshake initiation, usually mutated
            init = rng.choice(inits)
            try:
                respond(server_key, mutate(rng, init) if rng.random() < 0.9 else init, 113)
            except HandshakeError:
                pass
        else:  # a record stream: valid records, then edits inside and between them
            tx, rx = os.urandom(32), os.urandom(32)
            client, server = RecordLayer(rx, tx), RecordLayer(tx, rx)
            stream = b"".join(client.seal(rng.randbytes(rng.choice((0, 1, 100, 4077, 9000))))
                              for _ in range(rng.randrange(1, 4)))
            if rng.random() < 0.8:
                stream = mutate(rng, stream)
            try:
                for c in chunks(rng, stream):
                    server.feed(c)
            except RecordError:
                pass
        done += 1
    done += await _sockets(ctx, rng, n_sockets, inits)
    return done


async def _sockets(ctx: FuzzContext, rng: object, n: int, inits: list[bytes]) -> int:
    """Upgrade requests with mutated handshakes, then garbage after a good one."""
    import random as _random

    assert isinstance(rng, _random.Random)
    port = int(ctx.url.rsplit(":", 1)[1])

    async def one(i: int) -> None:
        init = rng.choice(inits)
        hs = base64.b64encode(mutate(rng, init) if i % 2 else init).decode()
        head = (f"POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\n"
                f"Connection: upgrade\r\nX-Tailscale-Handshake: {hs}\r\n\r\n").encode()
        if i % 5 == 0:
            head = mutate(rng, head)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError as e:
            ctx.fail("noise", i, f"connect: {e!r}")
            return
        await say_and_hang_up(r, w, head + rng.randbytes(rng.randrange(0, 200)), 0.2)

    for start in range(0, n, 25):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + 25))))
    return n
