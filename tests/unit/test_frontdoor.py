"""The main listener's front door (derp.frontdoor) with a real aiohttp app behind it.

A toy takeover route (/echo-upgrade: 101, then echo every byte) stands in for /ts2021 and
/derp; aiohttp serves everything else.  Raw sockets let the tests control exactly which
bytes arrive in which packet.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from derp.frontdoor import DoorLimits, RequestHead, Route, Upgrade, origin_form
from pyheadscale.listener import MainListener, add_takeover_route


class _Echo(asyncio.Protocol):
    def __init__(self, transport: asyncio.Transport) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.t.write(data)


def _echo_route(head: RequestHead) -> Route:
    if head.path != "/echo-upgrade":
        return None

    def attach(t: asyncio.Transport, prefix: bytes, surplus: bytes) -> asyncio.BaseProtocol:
        t.write(prefix + b"surplus=" + surplus + b";")
        return _Echo(t)

    fast = head.header("fast-start") == "1"
    return Upgrade(attach, None if fast else (("Upgrade", "echo"), ("Connection", "Upgrade")))


async def _body(request: web.Request) -> web.Response:
    data = await request.read()
    return web.Response(text=f"{request.method} {len(data)} {data[:20]!r}")


async def _stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()  # no Content-Length: chunked
    await resp.prepare(request)
    for i in range(3):
        await resp.write(b"part%d." % i)
    await resp.write_eof()
    return resp


@pytest.fixture
async def listener() -> AsyncIterator[MainListener]:
    app = web.Application(client_max_size=4096)
    app.router.add_route("*", "/body", _body)
    app.router.add_get("/stream", _stream)
    add_takeover_route(app, _echo_route)
    lst = MainListener(app)
    await lst.start("127.0.0.1", 0, None)
    yield lst
    await asyncio.wait_for(lst.stop(), 10)


async def _open(lst: MainListener) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", lst.port)


async def _response(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One Content-Length response: (head, body)."""
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await asyncio.wait_for(r.readexactly(length), 5)


UPGRADE = b"GET /echo-upgrade HTTP/1.1\r\nHost: x\r\nUpgrade: echo\r\nConnection: Upgrade\r\n"


async def test_pipelined_bytes_reach_the_takeover(listener: MainListener) -> None:
    for split in (None, 10, len(UPGRADE) + 1):  # one packet, split head, split after head
        r, w = await _open(listener)
        data = UPGRADE + b"\r\nEARLY"
        if split is None:
            w.write(data)
        else:
            w.write(data[:split])
            await w.drain()
            await asyncio.sleep(0.05)
            w.write(data[split:])
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        got = await asyncio.wait_for(r.readuntil(b";"), 5)
        rest = b""
        if got != b"surplus=EARLY;":  # EARLY came in a later packet: echoed instead
            rest = await asyncio.wait_for(r.readexactly(len(b"EARLY") - len(got) + 9), 5)
        assert (got + rest).replace(b"surplus=", b"").replace(b";", b"") == b"EARLY"
        w.write(b"ping")
        assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
        w.close()


async def test_fast_start_takeover_sends_no_response(listener: MainListener) -> None:
    r, w = await _open(listener)
    w.write(UPGRADE + b"Fast-Start: 1\r\n\r\nCLIENTINFO")
    assert await asyncio.wait_for(r.readuntil(b";"), 5) == b"surplus=CLIENTINFO;"
    w.close()


async def test_absolute_form_targets_are_routed_by_their_path(listener: MainListener) -> None:
    # RFC 9112 section 3.2.2: a server must accept the absolute form; hyper's HTTP/1.1 client
    # (tailscale-rs) sends `POST http://host:port/ts2021` and `GET http://host:port/key`.
    r, w = await _open(listener)
    w.write(b"POST http://127.0.0.1:%d/body HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: 2\r\n\r\nhi" % listener.port)
    head, body = await _response(r)
    assert head.startswith(b"HTTP/1.1 200") and body == b"POST 2 b'hi'"
    w.write(UPGRADE.replace(b"/echo-upgrade", b"http://127.0.0.1/echo-upgrade?x=1") + b"\r\nA")
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    assert await asyncio.wait_for(r.readuntil(b";"), 5) in (b"surplus=A;", b"surplus=;")
    w.close()


@pytest.mark.parametrize(("target", "origin"), [
    ("/ts2021", "/ts2021"),
    ("/key?v=130", "/key?v=130"),
    ("http://198.51.100.1:8080/ts2021", "/ts2021"),
    ("HTTPS://[2001:db8::1]:8443/derp?x=/y", "/derp?x=/y"),
    ("http://host?q=1", "/?q=1"),
    ("http://host", "/"),
    ("*", "*"),
    ("ftp://host/x", "ftp://host/x"),  # not an HTTP URI: left alone, so no route matches
])
def test_origin_form(target: str, origin: str) -> None:
    assert origin_form(target) == origin
    head = RequestHead("GET", target, "1.1", (), ("192.0.2.1", 1), False)
    assert (head.path, head.query) == tuple(origin.partition("?")[::2])


async def test_takeover_after_keepalive_requests_to_aiohttp(listener: MainListener) -> None:
    # A reverse proxy reuses its upstream connection: ordinary requests, then the upgrade.
    r, w = await _open(listener)
    w.write(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    head, body = await _response(r)
    assert head.startswith(b"HTTP/1.1 200") and body == b"POST 5 b'hello'"
    w.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    assert b"Transfer-Encoding: chunked" in head
    assert (await asyncio.wait_for(r.readuntil(b"0\r\n\r\n"), 5)).count(b"part") == 3
    w.write(UPGRADE + b"\r\nX")
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    assert await asyncio.wait_for(r.readuntil(b";"), 5) in (b"surplus=X;", b"surplus=;")
    w.close()


async def test_pipelined_requests_answered_in_order(listener: MainListener) -> None:
    r, w = await _open(listener)
    w.write(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na"
            b"HEAD /body HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, body = await _response(r)
    assert body == b"POST 1 b'a'"
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)  # HEAD: no body follows
    assert head.startswith(b"HTTP/1.1 200")
    head, body = await _response(r)
    assert body == b"POST 5 b'abcde'"
    head, _ = await _response(r)
    assert head.startswith(b"HTTP/1.1 404")
    assert await asyncio.wait_for(r.read(), 5) == b""  # closed as asked
    w.close()


async def test_both_framings_refused(listener: MainListener) -> None:
    # The request-smuggling pattern: refused, never forwarded with one framing or the other.
    r, w = await _open(listener)
    w.write(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    data = await asyncio.wait_for(r.read(), 5)
    assert data.startswith(b"HTTP/1.1 400") and b"POST" not in data
    w.close()


async def test_too_large_body_and_upgrade_on_other_connections(listener: MainListener) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{listener.port}/body", data=b"x" * 10000) as resp:
            assert resp.status == 413
        async with s.post(f"http://127.0.0.1:{listener.port}/body", data=b"ok") as resp:
            assert await resp.text() == "POST 2 b'ok'"


@pytest.mark.parametrize(("raw", "status"), [
    (b"garbage\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 without Host
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (20 << 10) + b"\r\n\r\n", b"431"),
    (b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
    (UPGRADE + b"Content-Length: 3\r\n\r\nabc", b"400"),  # an upgrade with a body
])
async def test_bad_requests_refused(listener: MainListener, raw: bytes, status: bytes) -> None:
    r, w = await _open(listener)
    w.write(raw)
    data = await asyncio.wait_for(r.read(), 5)
    assert data.startswith(b"HTTP/1.1 " + status), data[:80]
    w.close()


async def test_silent_connection_times_out(listener: MainListener) -> None:
    listener.limits = DoorLimits(head_timeout=0.2)  # (read when each connection is made)
    r, w = await _open(listener)
    w.write(b"GET / HTTP/1.1\r\n")  # never finished
    assert await asyncio.wait_for(r.read(), 5) == b""
    w.close()


async def test_expect_100_continue_through_the_door(listener: MainListener) -> None:
    r, w = await _open(listener)
    w.write(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    interim = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    w.write(b"abcd")
    head, body = await _response(r)
    assert head.startswith(b"HTTP/1.1 200") and body == b"POST 4 b'abcd'"
    # HTTP/1.0: one exchange, then the connection closes
    w.close()
    r, w = await _open(listener)
    w.write(b"GET /stream HTTP/1.0\r\n\r\n")
    data = await asyncio.wait_for(r.read(), 5)
    assert data.startswith(b"HTTP/1.0 200") and data.count(b"part") == 3  # body until close
    w.close()
