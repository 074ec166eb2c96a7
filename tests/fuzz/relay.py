"""DERP inputs shared by the fuzz run's relay target (t_derp.py) and the unit DERP fuzz test:
valid frames to start mutating from, and a set of live in-memory relay connections to feed."""

from __future__ import annotations

import random

from derp import protocol as p
from derp.conn import ClientConn
from derp.server import DerpServer
from tests.fuzz.mutate import chunks, mutate
from tests.memtransport import MemTransport

MAX_LIVE = 8  # connections kept open at once; more are opened at random now and then


def valid_frames(rng: random.Random, keys: list[bytes]) -> list[bytes]:
    """One frame of every kind a client sends (and a few a server does), addressed to one
    of `keys` or to a stranger."""
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


class RelayConns:
    """Live connections to `srv` on in-memory transports, each opened with one of `hello`
    (the ClientInfo frames, sometimes mutated); `feed` sends one of them a run of frames."""

    def __init__(self, srv: DerpServer, hello: list[bytes], pubs: list[bytes]) -> None:
        self.srv = srv
        self.hello = hello
        self.pubs = pubs
        self.live: list[tuple[ClientConn, MemTransport]] = []

    def feed(self, rng: random.Random, i: int) -> ClientConn:
        """Maybe open a connection (input `i` names its port), then give a random live one
        four valid frames, often mutated, in network-sized pieces; returns that one."""
        if len(self.live) < MAX_LIVE or rng.random() < 0.2:
            who = rng.randrange(len(self.hello))
            conn = self.srv.new_connection(f"192.0.2.{who}", 1000 + i,
                                           not_ideal=rng.random() < 0.1)
            t = MemTransport(conn)
            first = self.hello[who] if rng.random() < 0.9 else mutate(rng, self.hello[who])
            conn.start(t, b"", first)
            self.live.append((conn, t))
        conn, t = rng.choice(self.live)
        stream = b"".join(rng.sample(valid_frames(rng, self.pubs), 4))
        if rng.random() < 0.6:
            stream = mutate(rng, stream)
        for c in chunks(rng, stream):
            if t.closing:
                break
            conn.data_received(c)
        return conn

    def prune(self) -> None:
        """Forget the connections the relay has closed."""
        self.live = [(c, t) for c, t in self.live if not t.closing]

    def close(self) -> None:
        for _, t in self.live:
            t.abort()
