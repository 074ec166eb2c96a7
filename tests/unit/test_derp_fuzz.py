"""Seeded fuzzing of the DERP codec, the server connection state machine and live sockets.

Over 100,000 random or mutated inputs in total: the bulk drives the sans-IO parsers and the
server's ClientConn through an in-memory transport; a few hundred go over real TCP.  Nothing
may raise, and afterwards the relay must hold no connection, route or task.
"""

from __future__ import annotations

import asyncio
import random

from derp import protocol as p
from derp import stun
from derp.http import serve_derp
from derp.keys import generate_private_key
from derp.server import DerpServer
from tests.fuzz.mutate import chunks, mutate
from tests.fuzz.relay import RelayConns, valid_frames
from tests.netutil import say_and_hang_up

SEED = 0xD3E9


def test_sans_io_codecs_fuzz() -> None:
    rng = random.Random(SEED)
    keys = [rng.randbytes(32) for _ in range(4)]
    cases = 0
    for _ in range(30000):
        frames = valid_frames(rng, keys)
        stream = b"".join(rng.sample(frames, rng.randrange(1, len(frames))))
        if rng.random() < 0.7:
            stream = mutate(rng, stream)
        dec = p.FrameDecoder(max_frame=rng.choice((1024, 1 << 20)))
        try:
            for chunk in chunks(rng, stream):
                for ftype, payload in dec.feed(chunk):
                    p.decode_server_frame(ftype, payload)
        except p.FrameTooLarge:
            pass
        cases += 1
    for _ in range(20000):
        raw = rng.choice((rng.randbytes(rng.randrange(40)), mutate(rng, b'{"meshKey":"' +
                          b"ab" * 32 + b'","version":2,"CanAckPings":true}')))
        for parse in (p.ClientInfo.from_json, p.ServerInfo.from_json):
            try:
                parse(raw)
            except p.HandshakeError:
                pass
            cases += 1
    req = stun.build_binding_request(bytes(12))
    resp = stun.build_binding_response(bytes(12), "2001:db8::1", 1)
    for _ in range(20000):
        for base in (req, resp):
            data = mutate(rng, base) if rng.random() < 0.9 else rng.randbytes(40)
            for parse in (stun.parse_binding_request, stun.parse_binding_response):
                try:
                    parse(data)
                except stun.StunError:
                    pass
                cases += 1
    assert cases >= 100000


async def test_server_state_machine_fuzz() -> None:
    rng = random.Random(SEED + 1)
    mesh_key = "77" * 32
    srv = DerpServer(generate_private_key(), mesh_key=mesh_key)
    privs = [generate_private_key() for _ in range(6)]
    pubs = [p.public_key_of(k) for k in privs]
    hello = [p.client_info_frame(k, srv.public_key, p.ClientInfo(
        mesh_key=mesh_key if i % 3 == 0 else "")) for i, k in enumerate(privs)]
    conns = RelayConns(srv, hello, pubs)
    cases = 0
    for i in range(30000):
        conn = conns.feed(rng, i)
        cases += 1
        if rng.random() < 0.05:
            conn.pause_writing()
        elif rng.random() < 0.05:
            conn.resume_writing()
        if i % 50 == 0:
            await asyncio.sleep(0)
            conns.prune()
    conns.close()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert cases == 30000
    assert srv.connection_count() == 0
    assert not srv._active and not srv._dups and not srv._sent_to and not srv._watchers
    await srv.close()


async def test_live_connections_fuzz() -> None:
    rng = random.Random(SEED + 2)
    srv = DerpServer(generate_private_key())
    lst = await serve_derp(srv, "127.0.0.1", 0, None)
    port = lst.sockets[0].getsockname()[1]
    upgrade = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
    priv = generate_private_key()
    hello = p.client_info_frame(priv, srv.public_key, p.ClientInfo())

    async def one(i: int) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        kind = i % 4
        if kind == 0:  # random bytes instead of HTTP
            data = rng.randbytes(rng.randrange(1, 300))
        elif kind == 1:  # mutated request head
            data = mutate(rng, upgrade + hello)
        elif kind == 2:  # mutated handshake
            data = upgrade + mutate(rng, hello)
        else:  # valid handshake then mutated frames
            frames = valid_frames(rng, [p.public_key_of(priv)])
            data = upgrade + hello + mutate(rng, b"".join(frames))
        await say_and_hang_up(r, w, data, 0.3)

    for start in range(0, 300, 50):
        await asyncio.gather(*(one(i) for i in range(start, start + 50)))
    # the relay still works afterwards
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await asyncio.wait_for(r.read(), 2)).startswith(b"HTTP/1.1 200 OK")
    w.close()
    for _ in range(50):
        if srv.connection_count() == 0:
            break
        await asyncio.sleep(0.02)
    assert srv.connection_count() == 0
    lst.close()
    await srv.close()
    await asyncio.sleep(0.05)
    stuck = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not stuck, stuck
