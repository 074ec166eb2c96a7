"""End to end over 127.0.0.1: aiohttp + add_routes on one side, the test client on the other."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from pyheadscale.control.types import ControlRequest, ResponseStream
from pyheadscale.control.upgrade import add_routes, get_server
from pyheadscale.listener import MainListener
from pyheadscale.noise import (
    Initiator,
    ServerRefusedError,
    generate_private_key,
    public_key,
)
from pyheadscale.testclient import (
    ControlConnection,
    StreamResetError,
    UpgradeError,
    connect,
    encode_map_frame,
    fetch_key,
)

STREAM_FRAMES = 40
FRAME_PAYLOAD = 3000  # random hex: incompressible enough that 40 frames exceed 64 KiB


@dataclass
class Server:
    url: str
    key: bytes
    app: web.Application
    listener: MainListener
    requests: list[ControlRequest] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    stream_bytes: int = 0


async def _dispatch(srv: Server, req: ControlRequest, resp: ResponseStream) -> None:
    srv.requests.append(req)
    if req.path == "/echo":
        await resp.start(200, [("content-type", "application/octet-stream")])
        await resp.end(req.body)
    elif req.path == "/slow":
        await asyncio.sleep(0.2)
        await resp.end(b"slow")
    elif req.path == "/lite":
        await resp.end(json.dumps({"len": len(req.body)}).encode())
    elif req.path == "/stream":
        await resp.start(200)
        for i in range(STREAM_FRAMES):
            frame = encode_map_frame({"i": i, "pad": os.urandom(FRAME_PAYLOAD).hex()})
            srv.stream_bytes += len(frame)
            await resp.write(frame)
        await resp.end()
    elif req.path == "/ticker":
        await resp.start(200)
        try:
            i = 0
            while True:
                await resp.write(encode_map_frame({"KeepAlive": True, "i": i}))
                i += 1
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            srv.cancelled.set()
            raise
    else:
        await resp.start(404)
        await resp.end(b"not found")


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    key = generate_private_key()
    app = web.Application()
    listener = MainListener(app)
    srv = Server("", key, app, listener)

    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        await _dispatch(srv, req, resp)

    add_routes(app, key, dispatch, min_capver=113)
    await listener.start("127.0.0.1", 0, None)
    srv.url = f"http://127.0.0.1:{listener.port}"
    yield srv
    await asyncio.wait_for(listener.stop(), 10)


# -- /key ---------------------------------------------------------------------------------


async def test_key_endpoint(server: Server) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(server.url + "/key?v=145") as r:
            assert r.status == 200 and r.content_type == "application/json"
            body = await r.json()
        assert body == {
            "legacyPublicKey": "mkey:" + "0" * 64,
            "publicKey": "mkey:" + public_key(server.key).hex(),
        }
        for q, status in [
            ("", 400),
            ("?v=", 400),
            ("?v=abc", 400),
            ("?v=38", 400),
            ("?v=39", 200),
            ("?v=100", 200),
        ]:
            async with s.get(server.url + "/key" + q) as r:
                assert r.status == status, q
                if status == 400:
                    assert (await r.text()).strip()
    assert await fetch_key(server.url) == public_key(server.key)


# -- the happy path -----------------------------------------------------------------------


async def test_concurrent_streaming_and_lite_requests(server: Server) -> None:
    machine = generate_private_key()
    async with await connect(server.url, machine, capver=130) as conn:
        assert await conn.get_server_key() == public_key(server.key)
        assert conn.early_payload is None
        bodies = [os.urandom(n) for n in (0, 1, 4077, 4078, 20_000)]
        results = await asyncio.gather(
            conn.request("GET", "/slow"),
            *(conn.request("POST", "/echo", b) for b in bodies),
            conn.request("GET", "/nope"),
        )
        assert results[0][0] == 200 and results[0][2] == b"slow"
        for b, (status, hdrs, data) in zip(bodies, results[1:-1], strict=True):
            assert status == 200 and data == b
            assert ("content-type", "application/octet-stream") in hdrs
        assert results[-1][0] == 404

        frames = [f async for f in conn.stream_map(b"{}", path="/stream")]
        assert [f["i"] for f in frames] == list(range(STREAM_FRAMES))
        assert server.stream_bytes > 65535  # needed WINDOW_UPDATEs from the client

        # > 65 535 bytes of request bodies: only works if the server acknowledges DATA.
        total = 0
        for _ in range(10):
            status, _, data = await conn.request("POST", "/lite", b"L" * 8000)
            assert status == 200 and json.loads(data) == {"len": 8000}
            total += 8000
        assert total > 65535
    req = server.requests[0]
    assert req.machine_key == public_key(machine) and req.capver == 130
    assert len({r.conn_id for r in server.requests}) == 1


async def test_websocket_variant(server: Server) -> None:
    async with await connect(server.url, generate_private_key(), websocket=True) as conn:
        status, _, data = await conn.request("POST", "/echo", b"x" * 10_000)
        assert status == 200 and data == b"x" * 10_000
        frames = [f async for f in conn.stream_map(b"{}", path="/stream")]
        assert len(frames) == STREAM_FRAMES


async def test_client_reset_cancels_handler(server: Server) -> None:
    async with await connect(server.url, generate_private_key()) as conn:
        gen = conn.stream_map(b"{}", path="/ticker")
        first = await gen.__anext__()
        assert first["KeepAlive"] is True
        await gen.aclose()  # resets the stream
        await asyncio.wait_for(server.cancelled.wait(), 5)
        assert (await conn.request("POST", "/echo", b"still"))[2] == b"still"


@pytest.mark.parametrize("content_length", [True, False])
async def test_2mib_body_is_413_while_other_stream_works(
    server: Server, content_length: bool
) -> None:
    async with await connect(server.url, generate_private_key()) as conn:
        gen = conn.stream_map(b"{}", path="/ticker")
        await gen.__anext__()
        status, _, body = await conn.request(
            "POST", "/echo", os.urandom(2 << 20), content_length=content_length
        )
        assert status == 413 and b"too large" in body
        for _ in range(3):  # the long-lived stream keeps flowing
            assert "KeepAlive" in await gen.__anext__()
        assert (await conn.request("POST", "/echo", b"after"))[2] == b"after"
        await gen.aclose()


# -- refusals -----------------------------------------------------------------------------


async def _raw_upgrade(url: str, headers: str) -> tuple[bytes, bytes]:
    """Send a raw /ts2021 request; return (response head, everything after it until EOF)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /ts2021 HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n{headers}\r\n".encode()
    )
    data = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


async def test_bad_upgrade_requests_answer_400(server: Server) -> None:
    async with await connect(server.url, generate_private_key()) as other:
        init = Initiator(generate_private_key(), public_key(server.key), 130).initiation()
        good = base64.b64encode(init).decode()
        cases = [
            "",  # no Upgrade header at all
            "Connection: upgrade\r\nUpgrade: h2c\r\n",
            "Connection: upgrade\r\nUpgrade: tailscale-control-protocol\r\n",
            "Connection: upgrade\r\nUpgrade: tailscale-control-protocol\r\n"
            "X-Tailscale-Handshake: !!!not-base64!!!\r\n",
            "Connection: upgrade\r\nUpgrade: tailscale-control-protocol\r\n"
            f"X-Tailscale-Handshake: {good[:-2]}\r\n",  # bad padding
            "Connection: upgrade\r\nUpgrade: tailscale-control-protocol\r\n"
            f"X-Tailscale-Handshake: {good.replace('+', '-').replace('/', '_')}x\r\n",
        ]
        for headers in cases:
            async with aiohttp.ClientSession() as s:
                hdrs = dict(line.split(": ", 1) for line in headers.split("\r\n") if line)
                async with s.post(server.url + "/ts2021", headers=hdrs) as r:
                    assert r.status == 400, headers
                    assert (await r.text()).strip()
        assert (await other.request("POST", "/echo", b"ok"))[2] == b"ok"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m[:-1], "wrong handshake initiation size"),
        (lambda m: m[:2] + b"\x07" + m[3:], "unexpected handshake message type"),
        (lambda m: m[:3] + b"\x00\x61" + m[5:], "wrong handshake initiation length"),
        (lambda m: m[:50] + bytes([m[50] ^ 1]) + m[51:], "decrypting handshake initiation failed"),
    ],
)
async def test_wrong_noise_message_gets_error_frame(server: Server, mutate, message: str) -> None:
    async with await connect(server.url, generate_private_key()) as other:
        init = Initiator(generate_private_key(), public_key(server.key), 130).initiation()
        hs = base64.b64encode(mutate(init)).decode()
        head, rest = await _raw_upgrade(
            server.url,
            "Connection: upgrade\r\nUpgrade: tailscale-control-protocol\r\n"
            f"X-Tailscale-Handshake: {hs}\r\n",
        )
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"\r\nUpgrade: tailscale-control-protocol" in head
        assert b"\r\nConnection: upgrade" in head
        # Error frame, then the server closed the connection (reader hit EOF).
        assert rest[0] == 3 and int.from_bytes(rest[1:3], "big") == len(rest) - 3
        assert rest[3:].decode() == message
        assert (await other.request("POST", "/echo", b"ok"))[2] == b"ok"


async def test_old_capver_refused_with_error_frame(server: Server) -> None:
    with pytest.raises(ServerRefusedError, match="unsupported client version 100"):
        await connect(server.url, generate_private_key(), capver=100)
    with pytest.raises(ServerRefusedError, match="unsupported client version 112"):
        await connect(server.url, generate_private_key(), capver=112, websocket=True)
    async with await connect(server.url, generate_private_key(), capver=113) as conn:
        assert (await conn.request("POST", "/echo", b"ok"))[0] == 200


async def test_client_reports_non_101(server: Server) -> None:
    # A server without the control routes: the test client must surface the HTTP status.
    runner = web.AppRunner(web.Application())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        with pytest.raises(UpgradeError) as ei:
            await connect(
                f"http://{host}:{port}",
                generate_private_key(),
                server_public_key=public_key(server.key),
            )
        assert ei.value.status == 404
    finally:
        await runner.cleanup()


def _garbage(kind: str, conn: ControlConnection) -> None:
    if kind == "oversized":
        conn.send_raw(b"\x04" + (4094).to_bytes(2, "big") + bytes(4094))
    elif kind == "bad-type":
        conn.send_raw(b"\x05\x00\x10" + bytes(16))
    elif kind == "bad-auth":
        conn.send_raw(b"\x04\x00\x20" + os.urandom(32))
    elif kind == "garbage-h2":
        conn.send_plaintext(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00X")  # DATA on stream 0
    elif kind == "truncated":
        conn.send_raw(b"\x04\x00\x40" + bytes(10))
        conn._pipe.writer.write_eof()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kind", "websocket"),
    [
        ("oversized", False),
        ("bad-type", False),
        ("bad-auth", False),
        ("garbage-h2", False),
        ("truncated", False),
        ("bad-auth", True),
        ("garbage-h2", True),
    ],
)
async def test_bad_input_closes_only_that_connection(
    server: Server, kind: str, websocket: bool
) -> None:
    async with (
        await connect(server.url, generate_private_key(), websocket=websocket) as victim,
        await connect(server.url, generate_private_key()) as other,
    ):
        gen = other.stream_map(b"{}", path="/ticker")
        await gen.__anext__()
        assert (await victim.request("POST", "/echo", b"before"))[2] == b"before"
        assert len(get_server(server.app).connections) == 2
        _garbage(kind, victim)
        await asyncio.wait_for(victim.wait_closed(), 5)
        assert victim.closed
        for _ in range(3):
            assert "KeepAlive" in await gen.__anext__()
        assert (await other.request("POST", "/echo", b"after"))[2] == b"after"
        await gen.aclose()
        for _ in range(100):
            if len(get_server(server.app).connections) == 1:
                break
            await asyncio.sleep(0.01)
        assert len(get_server(server.app).connections) == 1
    async with await connect(server.url, generate_private_key()) as fresh:
        assert (await fresh.request("POST", "/echo", b"fresh"))[2] == b"fresh"


async def test_reset_stream_error_surface(server: Server) -> None:
    async with await connect(server.url, generate_private_key()) as conn:
        st = await conn.open_stream("POST", "/ticker")
        await st.response()
        st.reset()
        with pytest.raises(StreamResetError):
            await st.read()


async def test_shutdown_closes_live_connections(server: Server) -> None:
    conn = await connect(server.url, generate_private_key())
    gen = conn.stream_map(b"{}", path="/ticker")
    await gen.__anext__()
    await asyncio.wait_for(server.listener.stop(), 8)
    await asyncio.wait_for(conn.wait_closed(), 5)
    assert conn.closed
    await conn.close()


async def test_websocket_without_the_control_subprotocol_is_refused(server: Server) -> None:
    init = Initiator(generate_private_key(), public_key(server.key), 130).initiation()
    hs = base64.b64encode(init).decode()
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as ei:
            await s.ws_connect(server.url + "/ts2021", params={"X-Tailscale-Handshake": hs})
        assert ei.value.status == 400
        # and a WebSocket to the right subprotocol but no handshake parameter
        with pytest.raises(aiohttp.WSServerHandshakeError) as ei:
            await s.ws_connect(server.url + "/ts2021", protocols=("tailscale-control-protocol",))
        assert ei.value.status == 400
