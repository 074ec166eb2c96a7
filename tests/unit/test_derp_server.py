"""The relay end to end on 127.0.0.1: TLS, routing, PeerGone, dup policy, slow receivers,
mesh, verification, HTTP endpoints."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from derp import protocol as p
from derp.client import DerpClient, DerpClosed, DerpRejected
from derp.http import serve_derp
from derp.keys import generate_private_key
from derp.server import DerpServer
from derp.tls import cert_name, client_ssl_context, ensure_self_signed, server_ssl_context
from derp.verify import make_url_verifier
from tests.netutil import free_port

MESH_KEY = "5e" * 32
REPO = str(Path(__file__).resolve().parents[2])


class Relay:
    def __init__(self, server: DerpServer, listener: Any, url: str, port: int) -> None:
        self.server, self.listener, self.url, self.port = server, listener, url, port

    async def stop(self) -> None:
        self.listener.close()
        await self.server.close()
        await self.listener.wait_closed()


async def start_relay(tmp: Path | None, port: int = 0, **kw: Any) -> Relay:
    priv = kw.pop("private_key", None) or generate_private_key()
    srv = DerpServer(priv, **kw)
    ctx = None
    if tmp is not None:
        cf, kf = ensure_self_signed(tmp, "127.0.0.1")
        ctx = server_ssl_context(cf, kf)
    lst = await serve_derp(srv, "127.0.0.1", port, ctx)
    port = lst.sockets[0].getsockname()[1]
    scheme = "https" if ctx else "http"
    return Relay(srv, lst, f"{scheme}://127.0.0.1:{port}/derp", port)


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Relay]:
    r = await start_relay(tmp_path)
    yield r
    await r.stop()


@pytest.fixture
async def plain_relay() -> AsyncIterator[Relay]:
    r = await start_relay(None)
    yield r
    await r.stop()


async def connect(r: Relay, **kw: Any) -> DerpClient:
    return await DerpClient.connect(r.url, kw.pop("key", None) or generate_private_key(), **kw)


async def expect_closed(c: DerpClient, wait: float = 2.0) -> None:
    with pytest.raises(DerpClosed):
        while True:
            await c.recv(wait)


DISCO = p.DISCO_MAGIC + bytes(60)


# --------------------------------------------------------------------------------------------


async def test_tls_exchange_and_pinned_cert(relay: Relay, tmp_path: Path) -> None:
    cert_file = tmp_path / "127.0.0.1.crt"
    # the pin is the sha256 of the DER certificate the server presents
    ctx = client_ssl_context(cert_file)  # verifies chain + IP SAN
    a = await connect(relay, ssl=ctx)
    b = await connect(relay, ssl=ctx)
    assert a.server_key == relay.server.public_key
    assert a.server_info is not None and a.server_info.version == 2
    peer_der = a._transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    assert cert_name(cert_file) == "sha256-raw:" + hashlib.sha256(peer_der).hexdigest()
    assert a._transport.get_extra_info("ssl_object").selected_alpn_protocol() in (None,
                                                                                  "http/1.1")
    for i in range(50):
        a.send(b.public_key, b"a->b %d" % i)
        b.send(a.public_key, b"b->a %d" % i)
    for i in range(50):
        ev = await b.recv_packet(2)
        assert (ev.src, ev.data) == (a.public_key, b"a->b %d" % i)
        ev = await a.recv_packet(2)
        assert (ev.src, ev.data) == (b.public_key, b"b->a %d" % i)
    await a.ping(b"12345678")
    await a.close()
    await b.close()


def test_self_signed_cert_reused(tmp_path: Path) -> None:
    c1, k1 = ensure_self_signed(tmp_path, "127.0.0.1")
    first = c1.read_bytes()
    c2, _ = ensure_self_signed(tmp_path, "127.0.0.1")
    assert c2.read_bytes() == first
    cert = x509.load_pem_x509_certificate(first)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    der = cert.public_bytes(serialization.Encoding.DER)
    assert cert_name(c1) == "sha256-raw:" + hashlib.sha256(der).hexdigest()
    c3, _ = ensure_self_signed(tmp_path, "derp.example.com")
    san3 = x509.load_pem_x509_certificate(c3.read_bytes()).extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value
    assert san3.get_values_for_type(x509.DNSName) == ["derp.example.com"]


async def test_fast_start_keeps_pipelined_bytes(relay: Relay) -> None:
    b = await connect(relay)
    # ClientInfo and a SendPacket travel in the same write as the request head
    a = DerpClient(generate_private_key())
    loop = asyncio.get_running_loop()
    from derp.client import _ClientProtocol

    cctx = client_ssl_context()
    await loop.create_connection(lambda: _ClientProtocol(a), "127.0.0.1", relay.port, ssl=cctx)
    a._in_http = False
    a.server_key = relay.server.public_key
    a._expect_server_key = relay.server.public_key
    req = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n" \
          b"Derp-Fast-Start: 1\r\n\r\n"
    ci = p.client_info_frame(a.private_key, relay.server.public_key, p.ClientInfo())
    a._transport.write(req + ci + p.send_packet_frame(b.public_key, b"pipelined"))
    await asyncio.wait_for(a._handshake, 2)
    assert a.http_status is None  # no HTTP response at all
    ev = await b.recv_packet(2)
    assert ev.data == b"pipelined" and ev.src == a.public_key
    await a.close()
    await b.close()


async def test_fast_start_client_helper(plain_relay: Relay) -> None:
    a = await connect(plain_relay, fast_start_key=plain_relay.server.public_key)
    b = await connect(plain_relay)
    a.send(b.public_key, b"x")
    assert (await b.recv_packet(2)).data == b"x"
    await a.close()
    await b.close()


async def test_peer_gone_on_disconnect(plain_relay: Relay) -> None:
    a = await connect(plain_relay)
    b = await connect(plain_relay)
    c = await connect(plain_relay)
    a.send(b.public_key, b"hi")
    assert (await b.recv_packet(2)).src == a.public_key
    await a.close()
    ev = await b.recv(2)
    assert ev == p.PeerGone(a.public_key, p.PeerGoneReason.DISCONNECTED)
    # c never heard from a: nothing for it
    await c.ping()
    assert c.pending_events() == 0 or all(not isinstance(e, p.PeerGone) for e in c._events)
    await b.close()
    await c.close()


async def test_not_here_only_for_disco_and_rate_limited(plain_relay: Relay) -> None:
    a = await connect(plain_relay)
    nobody = os.urandom(32)
    a.send(nobody, b"\x04" + bytes(100))  # WireGuard-looking: silently dropped
    for _ in range(10):
        a.send(nobody, DISCO)
    await a.ping()
    gone = [e for e in list(a._events) if isinstance(e, p.PeerGone)]
    assert gone and all(g == p.PeerGone(nobody, p.PeerGoneReason.NOT_HERE) for g in gone)
    assert len(gone) == 3  # burst 3
    assert plain_relay.server.stats.dropped["unknown_dest"] == 11
    await a.close()


async def test_duplicate_connection_policy(plain_relay: Relay) -> None:
    k = generate_private_key()
    a1 = await connect(plain_relay, key=k)
    s = await connect(plain_relay)
    a1.send(s.public_key, b"from a1")  # s hears from the key: it would get PeerGone
    assert (await s.recv_packet(2)).data == b"from a1"
    a2 = await connect(plain_relay, key=k)
    # newest is active; the old one stays open
    s.send(a1.public_key, b"one")
    assert (await a2.recv_packet(2)).data == b"one"
    # any frame from a dup makes it the active one (lastWriterIsActive)
    a1.note_preferred(True)
    await a1.ping()
    s.send(a1.public_key, b"two")
    assert (await a1.recv_packet(2)).data == b"two"
    assert not any(isinstance(e, p.RecvPacket) for e in a2._events)
    # dropping the active one re-enables the survivor; no PeerGone while one remains
    await a1.close()
    await asyncio.sleep(0.05)
    s.send(a1.public_key, b"three")
    assert (await a2.recv_packet(2)).data == b"three"
    await s.ping()
    assert not any(isinstance(e, p.PeerGone) for e in s._events)
    await a2.close()
    ev = await s.recv(2)
    while isinstance(ev, p.Pong):
        ev = await s.recv(2)
    assert ev == p.PeerGone(a2.public_key, 0)
    await s.close()


async def test_trickled_big_frames_and_interleaved_senders_arrive_intact(
        plain_relay: Relay) -> None:
    # One sender dribbles 60 KB packets a few hundred bytes per write while another floods the
    # same receiver with small ones: every read shares the relay's receive buffer, the big
    # frames fill their own, and nothing may come out mixed up.
    slow = await connect(plain_relay)
    fast = await connect(plain_relay)
    rx = await connect(plain_relay)
    big = [os.urandom(60000) for _ in range(3)]
    small = iter([os.urandom(1300) for _ in range(100)])
    sent_small = []
    for pkt in big:
        frame = p.send_packet_frame(rx.public_key, pkt)
        for n, k in enumerate(range(0, len(frame), 700)):
            slow.write_raw(frame[k:k + 700])
            await slow.drain()
            if n % 10 == 0:
                x = next(small)
                fast.send(rx.public_key, x)
                sent_small.append(x)
            await asyncio.sleep(0)
    for x in small:
        fast.send(rx.public_key, x)
        sent_small.append(x)
    got: dict[bytes, list[bytes]] = {slow.public_key: [], fast.public_key: []}
    while len(got[slow.public_key]) < len(big) or len(got[fast.public_key]) < len(sent_small):
        ev = await rx.recv_packet(5)
        got[ev.src].append(ev.data)
    assert got[slow.public_key] == big
    assert got[fast.public_key] == sent_small
    for c in (slow, fast, rx):
        await c.close()


async def test_stalled_receiver_does_not_slow_others(plain_relay: Relay) -> None:
    plain_relay.server.write_timeout = 1.0
    a = await connect(plain_relay)
    stalled = await connect(plain_relay)
    stalled._transport.pause_reading()  # stops reading; its kernel buffers fill up
    d = await connect(plain_relay)
    e = await connect(plain_relay)
    big = os.urandom(1300)
    n_ok = 0
    for round_ in range(40):
        for _ in range(100):
            a.send(stalled.public_key, big)
        for i in range(5):
            d.send(e.public_key, b"%d.%d" % (round_, i))
        await a.drain()
        for i in range(5):
            ev = await e.recv_packet(2)
            assert ev.data == b"%d.%d" % (round_, i)
            n_ok += 1
    assert n_ok == 200
    st = plain_relay.server.stats
    assert st.dropped["queue_head"] > 0
    stalled_conn = next(c for c in plain_relay.server._all if c.key == stalled.public_key)
    assert len(stalled_conn._data) <= 32
    # the write timeout finally closes the stalled connection
    for _ in range(60):
        if not plain_relay.server.is_connected(stalled.public_key):
            break
        await asyncio.sleep(0.05)
    assert not plain_relay.server.is_connected(stalled.public_key)
    assert st.write_timeouts >= 1
    for c in (a, d, e, stalled):
        c.abort()


async def test_verify_client_refuses_unknown(plain_relay: Relay) -> None:
    known = generate_private_key()
    seen: list[tuple[bytes, str]] = []

    async def verify(key: bytes, ip: str) -> bool:
        seen.append((key, ip))
        return key == p.public_key_of(known)

    plain_relay.server.verify_client = verify
    with pytest.raises(DerpRejected):
        await connect(plain_relay)
    ok = await connect(plain_relay, key=known)
    assert ok.server_info is not None
    assert seen[-1] == (ok.public_key, "127.0.0.1")
    assert plain_relay.server.connection_count() == 1
    await ok.close()


async def test_frames_sent_while_being_verified_are_relayed_after(plain_relay: Relay) -> None:
    # A client may pipeline packets behind its ClientInfo; they wait for the verdict, in
    # order, whether they came with the request head or in reads during the check.
    gate = asyncio.Event()

    async def verify(key: bytes, ip: str) -> bool:
        await gate.wait()
        return True

    rx = await connect(plain_relay)  # admitted before the check is slowed down
    plain_relay.server.verify_client = verify
    priv = generate_private_key()
    early = [os.urandom(1300) for _ in range(20)]
    late = [os.urandom(1300) for _ in range(20)] + [os.urandom(40000) for _ in range(4)]
    reader, writer = await asyncio.open_connection("127.0.0.1", plain_relay.port)
    writer.write(b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\n"
                 b"Connection: Upgrade\r\n\r\n"
                 + p.client_info_frame(priv, plain_relay.server.public_key, p.ClientInfo())
                 + b"".join(p.send_packet_frame(rx.public_key, x) for x in early))
    await writer.drain()
    await asyncio.sleep(0.1)
    for x in late:
        writer.write(p.send_packet_frame(rx.public_key, x))
        await writer.drain()
        await asyncio.sleep(0.005)
    assert rx.pending_events() == 0  # nothing relayed before the verdict
    gate.set()
    got = [(await rx.recv_packet(5)).data for _ in early + late]
    assert got == early + late
    writer.close()
    await rx.close()


async def test_verify_url_contract() -> None:
    requests: list[tuple[str | None, dict[str, Any]]] = []
    allow: set[str] = set()

    async def handler(req: web.Request) -> web.Response:
        body = json.loads(await req.read())
        requests.append((req.headers.get("Content-Type"), body))
        if body["NodePublic"] == "nodekey:" + "ee" * 32:
            return web.Response(status=500)
        return web.json_response({"Allow": body["NodePublic"] in allow})

    app = web.Application()
    app.router.add_post("/verify", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        v = make_url_verifier(f"http://127.0.0.1:{port}/verify", fail_open=False)
        allow.add("nodekey:" + "11" * 32)
        assert await v(b"\x11" * 32, "127.0.0.1") is True
        assert await v(b"\x22" * 32, "::ffff:192.0.2.1") is False
        assert await v(b"\xee" * 32, "x") is False  # non-200 refuses
        assert requests[0] == (None, {"NodePublic": "nodekey:" + "11" * 32,
                                      "Source": "127.0.0.1"})
        assert requests[2][1]["Source"] == ""
    finally:
        await runner.cleanup()
    # unreachable: fail-open admits, fail-closed refuses
    assert await make_url_verifier(f"http://127.0.0.1:{port}/verify", fail_open=True)(
        b"\x33" * 32, "127.0.0.1") is True
    assert await make_url_verifier(f"http://127.0.0.1:{port}/verify", fail_open=False)(
        b"\x33" * 32, "127.0.0.1") is False


async def test_protocol_violations_close(plain_relay: Relay) -> None:
    for bad in (
        b"\x04\x00\x00\x00\x10" + bytes(16),                 # SendPacket < 32
        b"\x04\x00\x01\x00\x21",                             # packet > 64 KiB
        p.WATCH_CONNS_FRAME,                                  # mesh-only
        p.close_peer_frame(bytes(32)),                        # mesh-only
        p.forward_packet_frame(bytes(32), bytes(32), b"x"),   # mesh-only
        b"\x07\x00\x00\x00\x02\x01\x01",                     # NotePreferred != 1
        b"\x12\x00\x00\x00\x04abcd",                         # Ping < 8
    ):
        c = await connect(plain_relay)
        c.write_raw(bad)
        await expect_closed(c)
    c = await connect(plain_relay)
    # unknown types, a client Pong and a late ClientInfo are skipped, even large ones
    c.write_raw(b"\x0e\x00\x00\x00\x03abc" + p.pong_frame(b"zzzzzzzz") +
                b"\x02\x00\x00\x00\x01x" + b"\x0f\x00\x20\x00\x00" + bytes(2 << 20))
    await c.ping(b"still ok", timeout=5)
    await c.close()


async def test_handshake_rejections(plain_relay: Relay) -> None:
    loop = asyncio.get_running_loop()
    for first in (p.KEEP_ALIVE_FRAME, b"\x02\x00\x00\x00\x10" + bytes(16),
                  b"\x02" + (56 + 32).to_bytes(4, "big") + bytes(88)):
        r, w = await asyncio.open_connection("127.0.0.1", plain_relay.port)
        w.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n" + first)
        data = await asyncio.wait_for(r.read(), 2)  # server closes
        assert data.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert data.endswith(p.server_key_frame(plain_relay.server.public_key))
        w.close()
    del loop
    assert plain_relay.server.connection_count() == 0


async def http_get(port: int, raw: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(raw)
    data = await asyncio.wait_for(r.read(), 2)
    w.close()
    return data


async def test_http_endpoints(plain_relay: Relay) -> None:
    port = plain_relay.port
    d = await http_get(port, b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert d.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"Content-Type: text/plain; charset=utf-8\r\n" in d
    assert b"X-Content-Type-Options: nosniff\r\n" in d
    assert d.endswith(b"\r\n\r\nDERP requires connection upgrade\n")
    # two probes on one keep-alive connection, then a 405
    d = await http_get(port, b"GET /derp/latency-check HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"HEAD /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                             b"Connection: close\r\n\r\nabc")
    assert d.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert d.count(b"Access-Control-Allow-Origin: *\r\n") == 2
    assert b"HTTP/1.1 405 Method Not Allowed\r\n" in d and d.endswith(b"bogus probe method\n")
    d = await http_get(port, b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: "
                             b"ts_192.0.2.1\r\nConnection: close\r\n\r\n")
    assert d.startswith(b"HTTP/1.1 204 No Content\r\n")
    assert b"X-Tailscale-Response: response ts_192.0.2.1\r\n" in d
    assert b"Cache-Control: no-cache, no-store, must-revalidate, no-transform, max-age=0" in d
    d = await http_get(port, b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: "
                             b"bad challenge!\r\nConnection: close\r\n\r\n")
    assert b"X-Tailscale-Response" not in d
    d = await http_get(port, b"GET /bootstrap-dns?q=x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert d.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in d
    d = await http_get(port, b"garbage\r\n\r\n")
    assert d.startswith(b"HTTP/1.1 400")
    # HTTP/1.1 without Host is refused (RFC 9112 section 3.2), as Go's server does
    d = await http_get(port, b"GET /derp/probe HTTP/1.1\r\n\r\n")
    assert d.startswith(b"HTTP/1.1 400") and b"Host" in d


async def test_websocket_variant(plain_relay: Relay) -> None:
    b = await connect(plain_relay)
    r, w = await asyncio.open_connection("127.0.0.1", plain_relay.port)
    key = base64.b64encode(os.urandom(16))
    w.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Protocol: derp\r\n\r\n")
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 2)
    assert head.startswith(b"HTTP/1.1 101")
    # RFC 6455 section 1.3's GUID (an earlier hand-written handshake had its digits swapped)
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11")
                              .digest())
    assert b"Sec-WebSocket-Accept: " + accept in head
    assert b"Sec-WebSocket-Protocol: derp" in head

    def ws(data: bytes) -> bytes:
        mask = os.urandom(4)
        masked = bytes(x ^ mask[i % 4] for i, x in enumerate(data))
        n = len(data)
        hdr = bytes((0x82, 0x80 | n)) if n < 126 else bytes((0x82, 0xFE)) + n.to_bytes(2, "big")
        return hdr + mask + masked

    async def read_stream(n: int) -> bytes:
        out = b""
        while len(out) < n:
            h = await r.readexactly(2)
            ln = h[1] & 0x7F
            if ln == 126:
                ln = int.from_bytes(await r.readexactly(2), "big")
            out += await r.readexactly(ln)
        return out

    sk = await read_stream(45)
    assert sk == p.server_key_frame(plain_relay.server.public_key)
    priv = generate_private_key()
    frames = p.client_info_frame(priv, plain_relay.server.public_key, p.ClientInfo()) + \
        p.send_packet_frame(b.public_key, b"over websocket")
    # DERP frames are not aligned to messages: split the stream at odd places
    w.write(ws(frames[:7]) + ws(frames[7:100]) + ws(frames[100:]))
    si = await read_stream(58)
    assert si[0] == p.FrameType.SERVER_INFO
    ev = await b.recv_packet(2)
    assert ev.data == b"over websocket" and ev.src == p.public_key_of(priv)
    w.close()
    assert await b.recv(2) == p.PeerGone(p.public_key_of(priv), 0)
    await b.close()


async def test_watch_conns_and_close_peer(plain_relay: Relay) -> None:
    plain_relay.server.mesh_key = MESH_KEY
    a = await connect(plain_relay)
    m = await connect(plain_relay, mesh_key=MESH_KEY)
    m.watch_conns()
    seen = {}
    while len(seen) < 2:
        ev = await m.recv(2)
        assert isinstance(ev, p.PeerPresent)
        seen[ev.key] = ev
    assert seen[a.public_key].flags == p.PeerPresentFlags.IS_REGULAR
    assert seen[a.public_key].ip16 == bytes(10) + b"\xff\xff\x7f\x00\x00\x01"
    assert seen[m.public_key].flags == p.PeerPresentFlags.IS_MESH_PEER
    b = await connect(plain_relay, ideal_node="999a")
    ev = await m.recv(2)
    assert isinstance(ev, p.PeerPresent) and ev.key == b.public_key
    assert ev.flags == p.PeerPresentFlags.NOT_IDEAL
    m.close_peer(a.public_key)
    await expect_closed(a)
    assert await m.recv(2) == p.PeerGone(a.public_key, 0)
    # ForwardPacket is delivered with the original source key
    src = os.urandom(32)
    m.forward(src, b.public_key, b"fwd")
    ev = await b.recv_packet(2)
    assert (ev.src, ev.data) == (src, b"fwd")
    await b.close()
    await m.close()


async def test_mesh_two_relays_with_restart(tmp_path: Path) -> None:
    key_b = generate_private_key()
    ra = await start_relay(tmp_path, mesh_key=MESH_KEY)
    rb = await start_relay(tmp_path, mesh_key=MESH_KEY, private_key=key_b)
    cctx = client_ssl_context()
    la = ra.server.add_mesh_peer(rb.url, ssl=cctx, retry_interval=0.1)
    lb = rb.server.add_mesh_peer(ra.url, ssl=cctx, retry_interval=0.1)
    selflink = ra.server.add_mesh_peer(ra.url, ssl=cctx, retry_interval=0.1)
    ca = await connect(ra)
    kb = generate_private_key()
    cb = await connect(rb, key=kb)

    async def until(cond: Any) -> None:
        for _ in range(100):
            if cond():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("timed out")

    await until(lambda: cb.public_key in ra.server._forwarders and
                ca.public_key in rb.server._forwarders)
    assert selflink.is_self
    ca.send(cb.public_key, b"a to b")
    ev = await cb.recv_packet(2)
    assert (ev.src, ev.data) == (ca.public_key, b"a to b")
    cb.send(ca.public_key, b"b to a")
    assert (await ca.recv_packet(2)).data == b"b to a"

    # restart relay B on the same port with the same key; cb reconnects there
    port_b = rb.port
    await rb.stop()
    await expect_closed(cb)
    await until(lambda: cb.public_key not in ra.server._forwarders)
    # a's relay saw cb leave the region: PeerGone to ca, which had heard from cb
    assert any(e == p.PeerGone(cb.public_key, 0) for e in list(ca._events)) or \
        await ca.recv(2) == p.PeerGone(cb.public_key, 0)
    rb2 = await start_relay(tmp_path, port=port_b, mesh_key=MESH_KEY, private_key=key_b)
    lb2 = rb2.server.add_mesh_peer(ra.url, ssl=cctx, retry_interval=0.1)
    cb2 = await connect(rb2, key=kb)
    await until(lambda: cb2.public_key in ra.server._forwarders and
                ca.public_key in rb2.server._forwarders)
    ca.send(cb2.public_key, b"again")
    assert (await cb2.recv_packet(2)).data == b"again"
    cb2.send(ca.public_key, b"back")
    assert (await ca.recv_packet(2)).data == b"back"
    assert la.connected.is_set() and lb2.connected.is_set()
    del lb
    for c in (ca, cb2):
        await c.close()
    await rb2.stop()
    await ra.stop()


async def test_tls_sni_check(tmp_path: Path) -> None:
    cf, kf = ensure_self_signed(tmp_path, "derp.example.com")
    srv = DerpServer(generate_private_key())
    lst = await serve_derp(srv, "127.0.0.1", 0, server_ssl_context(cf, kf,
                                                                   hostname="derp.example.com"))
    port = lst.sockets[0].getsockname()[1]
    ctx = client_ssl_context(cf)
    c = await DerpClient.connect(f"https://127.0.0.1:{port}/derp", generate_private_key(),
                                 ssl=ctx, server_hostname="derp.example.com")
    await c.close()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await DerpClient.connect(f"https://127.0.0.1:{port}/derp", generate_private_key(),
                                 ssl=client_ssl_context(), server_hostname="other.example.com")
    lst.close()
    await srv.close()


async def test_keepalive_sent(plain_relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(p, "KEEPALIVE_INTERVAL", 0.05)
    monkeypatch.setattr(p, "KEEPALIVE_JITTER", 0.01)
    c = await connect(plain_relay)
    assert await c.recv(2) == p.KeepAlive()
    assert await c.recv(2) == p.KeepAlive()
    await c.close()


async def test_standalone_main(tmp_path: Path) -> None:
    import sys

    port = free_port()
    keyfile = tmp_path / "derper.key"
    keyfile.write_text('{"PrivateKey":"privkey:' + "42" * 32 + '"}')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "derp", "-a", f"127.0.0.1:{port}", "-certmode", "selfsigned",
        "-hostname", "127.0.0.1", "-certdir", str(tmp_path / "certs"), "-c", str(keyfile),
        "-stun=false", "-http-port", "-1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        cwd=REPO)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        node = json.loads(line.decode().split(":", 1)[1])
        assert node["CertName"] == cert_name(tmp_path / "certs" / "127.0.0.1.crt")
        assert node["DERPPort"] == port
        c = await DerpClient.connect(f"https://127.0.0.1:{port}/derp", generate_private_key())
        assert c.server_key == p.public_key_of(bytes.fromhex("42" * 32))
        await c.ping()
        await c.close()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
