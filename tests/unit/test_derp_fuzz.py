"""Seeded fuzzing of the DERP codec, the server connection state machine and live sockets.

Over 100,000 random or mutated inputs in total: the bulk drives the sans-IO parsers and the
server's ClientConn through an in-memory transport; a few hundred go over real TCP.  Nothing
may raise, and afterwards the relay must hold no connection, route or task.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from derp import protocol as p
from derp import stun
from derp.http import serve_derp
from derp.keys import generate_private_key
from derp.server import DerpServer

SEED = 0xD3E9


def _valid_frames(rng: random.Random, keys: list[bytes]) -> list[bytes]:
    k = rng.choice(keys)
    pkt = rng.randbytes(rng.choice((0, 1, 8, 61, 62, 200)))
    if rng.random() < 0.3:
        pkt = p.DISCO_MAGIC + rng.randbytes(60)
    return [
        p.send_packet_frame(k, pkt),
        p.send_packet_frame(rng.randbytes(32), pkt),
        p.note_preferred_frame(rng.random() < 0.5),
        p.ping_frame(rng.randbytes(8)),
        p.pong_frame(rng.randbytes(8)),
        p.KEEP_ALIVE_FRAME,
        p.WATCH_CONNS_FRAME,
        p.close_peer_frame(k),
        p.forward_packet_frame(rng.randbytes(32), k, pkt),
        p.peer_gone_frame(k),
        p.encode_frame(rng.randrange(256), rng.randbytes(rng.randrange(20))),
    ]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(5)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):]
        elif op == 2:
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randrange(1, 16))
        elif op == 3 and len(b) >= 5:  # hostile length field
            i = rng.randrange(len(b) - 4)
            b[i + 1:i + 5] = rng.choice((0, 31, 32, 33, 1000, 1001, 65568, 65569, 1 << 20,
                                         0xFFFFFFFF)).to_bytes(4, "big")
        else:
            b += rng.randbytes(rng.randrange(1, 40))
    return bytes(b)


def _chunks(rng: random.Random, data: bytes) -> list[bytes]:
    out = []
    i = 0
    while i < len(data):
        n = rng.choice((1, 2, 5, 7, 64, 1000, len(data)))
        out.append(data[i:i + n])
        i += n
    return out


def test_sans_io_codecs_fuzz() -> None:
    rng = random.Random(SEED)
    keys = [rng.randbytes(32) for _ in range(4)]
    cases = 0
    for _ in range(30000):
        frames = _valid_frames(rng, keys)
        stream = b"".join(rng.sample(frames, rng.randrange(1, len(frames))))
        if rng.random() < 0.7:
            stream = _mutate(rng, stream)
        dec = p.FrameDecoder(max_frame=rng.choice((1024, 1 << 20)))
        try:
            for chunk in _chunks(rng, stream):
                for ftype, payload in dec.feed(chunk):
                    p.decode_server_frame(ftype, payload)
        except p.FrameTooLarge:
            pass
        cases += 1
    for _ in range(20000):
        raw = rng.choice((rng.randbytes(rng.randrange(40)), _mutate(rng, b'{"meshKey":"' +
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
            data = _mutate(rng, base) if rng.random() < 0.9 else rng.randbytes(40)
            for parse in (stun.parse_binding_request, stun.parse_binding_response):
                try:
                    parse(data)
                except stun.StunError:
                    pass
                cases += 1
    assert cases >= 100000


class MemTransport:
    """Just enough of an asyncio transport for ClientConn, without a socket."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.out = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.out += len(data)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.conn.connection_lost, None)


async def test_server_state_machine_fuzz() -> None:
    rng = random.Random(SEED + 1)
    mesh_key = "77" * 32
    srv = DerpServer(generate_private_key(), mesh_key=mesh_key)
    privs = [generate_private_key() for _ in range(6)]
    pubs = [p.public_key_of(k) for k in privs]
    hello = [p.client_info_frame(k, srv.public_key, p.ClientInfo(
        mesh_key=mesh_key if i % 3 == 0 else "")) for i, k in enumerate(privs)]
    live: list[tuple[Any, MemTransport]] = []
    cases = 0
    for i in range(30000):
        if len(live) < 8 or rng.random() < 0.2:
            who = rng.randrange(len(privs))
            conn = srv.new_connection(f"192.0.2.{who}", 1000 + i, not_ideal=rng.random() < .1)
            t = MemTransport(conn)
            first = hello[who] if rng.random() < 0.9 else _mutate(rng, hello[who])
            conn.start(t, b"", first)
            live.append((conn, t))
        conn, t = rng.choice(live)
        stream = b"".join(rng.sample(_valid_frames(rng, pubs), 4))
        if rng.random() < 0.6:
            stream = _mutate(rng, stream)
        for chunk in _chunks(rng, stream):
            if t.closing:
                break
            conn.data_received(chunk)
        cases += 1
        if rng.random() < 0.05:
            conn.pause_writing()
        elif rng.random() < 0.05:
            conn.resume_writing()
        if i % 50 == 0:
            await asyncio.sleep(0)
            live = [(c, tr) for c, tr in live if not tr.closing]
    for _, t in live:
        t.abort()
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
            data = _mutate(rng, upgrade + hello)
        elif kind == 2:  # mutated handshake
            data = upgrade + _mutate(rng, hello)
        else:  # valid handshake then mutated frames
            frames = _valid_frames(rng, [p.public_key_of(priv)])
            data = upgrade + hello + _mutate(rng, b"".join(frames))
        try:
            w.write(data)
            await w.drain()
            await asyncio.wait_for(r.read(1 << 16), 0.3)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            w.close()

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
