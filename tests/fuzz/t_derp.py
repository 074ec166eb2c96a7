"""DERP frames and handshakes into the embedded relay (the admission check asks the real
tailnet), its sans-IO codec, ClientInfo/ServerInfo JSON, and STUN packets into the STUN
server's datagram handler."""

from __future__ import annotations

import asyncio
from typing import Any

from derp import protocol as p
from derp import stun
from tests.fuzz.harness import FuzzContext
from tests.fuzz.mutate import chunks, mutate
from tests.fuzz.relay import RelayConns, valid_frames


async def run(ctx: FuzzContext, part: int, n: int) -> int:
    rng = ctx.rng("derp", part)
    assert ctx.server.derp is not None
    srv = ctx.server.derp.server
    privs = ctx.node_privs + [p.public_key_of(bytes(32))]  # the last one is not a node
    pubs = [p.public_key_of(k) for k in ctx.node_privs]
    hello = [p.client_info_frame(k, srv.public_key, p.ClientInfo()) for k in privs]
    conns = RelayConns(srv, hello, pubs)
    for i in range(n):
        kind = i % 10
        if kind < 3:  # the sans-IO decoder, both directions' frame sets
            stream = b"".join(rng.sample(valid_frames(rng, pubs), 4))
            dec = p.FrameDecoder(max_frame=rng.choice((1024, p.CLIENT_MAX_FRAME)))
            try:
                for c in chunks(rng, mutate(rng, stream) if rng.random() < 0.7 else stream):
                    for ftype, payload in dec.feed(c):
                        p.decode_server_frame(ftype, payload)
            except p.DerpProtocolError:
                pass
        elif kind == 3:  # handshake JSON
            raw = mutate(rng, b'{"meshKey":"' + b"ab" * 32 + b'","version":2,"CanAckPings":true}')
            for parse in (p.ClientInfo.from_json, p.ServerInfo.from_json):
                try:
                    parse(raw)
                except p.HandshakeError:
                    pass
        else:  # a relay connection: ClientInfo (sometimes edited), then frames
            conns.feed(rng, i)
        if i % 50 == 0:
            await asyncio.sleep(0)  # admission checks and closes run here
            conns.prune()
    conns.close()
    for _ in range(5):
        await asyncio.sleep(0)
    if srv.connection_count():
        ctx.fail("derp", -1, f"{srv.connection_count()} relay connections left")
    return n


class _Transport:
    def __init__(self) -> None:
        self.sent = 0

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent += 1


async def run_stun(ctx: FuzzContext, part: int, n: int) -> int:
    rng = ctx.rng("stun", part)
    proto = stun.StunServerProtocol()
    proto.connection_made(_Transport())
    bases = [stun.build_binding_request(rng.randbytes(12)),
             stun.build_binding_response(rng.randbytes(12), "2001:db8::1", 3478),
             stun.build_binding_response(rng.randbytes(12), "192.0.2.1", 1)]
    for i in range(n):
        base = rng.choice(bases)
        data = mutate(rng, base) if rng.random() < 0.9 else rng.randbytes(rng.randrange(64))
        proto.datagram_received(data, (rng.choice(("192.0.2.9", "2001:db8::9")), 41641))
        try:
            stun.parse_binding_response(data)
        except stun.StunError:
            pass
        if i % 1000 == 0:
            await asyncio.sleep(0)
    return n


