"""trusted_proxies: which address a request comes from, in the front door, aiohttp's
request.remote, the DERP relay and the access log.  A real reverse proxy in front is in
tests/integration/test_proxy.py."""

from __future__ import annotations

import asyncio
import ipaddress
import logging

import pytest
from aiohttp import web

from pyheadscale.listener import MainListener
from pyheadscale.logs import TextFormatter
from pyheadscale.realip import RealIP

PROXY = "198.51.100.7"
REAL = RealIP((ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("2001:db8::/32")))


@pytest.mark.parametrize(("peer", "headers", "want"), [
    # untrusted peer: headers ignored
    ("203.0.113.9", [("x-real-ip", "192.0.2.1")], "203.0.113.9"),
    ("203.0.113.9", [("x-forwarded-for", "192.0.2.1")], "203.0.113.9"),
    # trusted: True-Client-IP, then X-Real-IP, then X-Forwarded-For
    (PROXY, [("x-real-ip", "192.0.2.1"), ("true-client-ip", "192.0.2.2")], "192.0.2.2"),
    (PROXY, [("x-forwarded-for", "192.0.2.3"), ("x-real-ip", "192.0.2.1")], "192.0.2.1"),
    (PROXY, [("x-forwarded-for", "192.0.2.3")], "192.0.2.3"),
    # X-Forwarded-For from the right, past trusted hops; a prepended value cannot win
    (PROXY, [("x-forwarded-for", "192.0.2.66, 192.0.2.3, 198.51.100.8")], "192.0.2.3"),
    (PROXY, [("x-forwarded-for", "192.0.2.66"), ("x-forwarded-for", "192.0.2.4")], "192.0.2.4"),
    (PROXY, [("x-forwarded-for", "198.51.100.8, 198.51.100.9")], PROXY),
    (PROXY, [("x-forwarded-for", "192.0.2.5, garbage")], PROXY),
    # single-value headers: twice, a list, or garbage fall through to the next
    (PROXY, [("x-real-ip", "192.0.2.1"), ("x-real-ip", "192.0.2.2")], PROXY),
    (PROXY, [("x-real-ip", "192.0.2.1, 192.0.2.2"), ("x-forwarded-for", "192.0.2.6")],
     "192.0.2.6"),
    (PROXY, [("x-real-ip", "not an ip")], PROXY),
    # ports, IPv6, v4-mapped
    (PROXY, [("x-real-ip", "192.0.2.1:4321")], "192.0.2.1"),
    (PROXY, [("x-real-ip", "[2001:db9::1]:443")], "2001:db9::1"),
    ("2001:db8::5", [("x-forwarded-for", "2001:db9::2")], "2001:db9::2"),
    ("::ffff:198.51.100.7", [("x-real-ip", "192.0.2.1")], "192.0.2.1"),
    (PROXY, [], PROXY),
])
def test_client(peer: str, headers: list[tuple[str, str]], want: str) -> None:
    assert REAL.client(peer, headers) == want


def test_no_trusted_proxies_trusts_nobody() -> None:
    none = RealIP(())
    assert none.client("127.0.0.1", [("x-real-ip", "192.0.2.1")]) == "127.0.0.1"
    assert none.strip("127.0.0.1", [("x-real-ip", "192.0.2.1"), ("host", "x")]) == (
        ("host", "x"),)
    assert REAL.strip(PROXY, [("x-real-ip", "192.0.2.1")]) is None  # trusted: kept
    assert REAL.strip("203.0.113.1", [("host", "x")]) is None  # nothing to strip


async def _listener(trusted: str) -> MainListener:
    app = web.Application()

    async def who(request: web.Request) -> web.Response:
        return web.Response(text=f"{request.remote} {request.headers.get('X-Real-IP')}")

    app.router.add_get("/who", who)
    lst = MainListener(app, RealIP((ipaddress.ip_network(trusted),)))
    await lst.start("127.0.0.1", 0, None)
    return lst


async def _who(port: int) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /who?secret=1 HTTP/1.1\r\nHost: x\r\nX-Real-IP: 192.0.2.1\r\n"
            b"Connection: close\r\n\r\n")
    data = await asyncio.wait_for(r.read(), 5)
    w.close()
    return data.partition(b"\r\n\r\n")[2]


async def test_listener_trusted_and_untrusted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pyheadscale.access")
    trusted = await _listener("127.0.0.0/8")
    try:
        assert await _who(trusted.port) == b"192.0.2.1 192.0.2.1"
    finally:
        await trusted.stop()
    untrusted = await _listener("192.0.2.0/24")
    try:
        # Not trusted: the client address stays the peer's and the header never arrives.
        assert await _who(untrusted.port) == b"127.0.0.1 None"
    finally:
        await untrusted.stop()
    # The text format's rendering of each record: what an admin reads in the log.
    text = TextFormatter()
    lines = [text.format(r).partition(": ")[2] for r in caplog.records
             if r.name == "pyheadscale.access"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("http request method=GET path=/who proto=HTTP/1.1 "
                               "remote=192.0.2.1 status=200 bytes=19 elapsed="), lines
    assert lines[1].startswith("http request method=GET path=/who proto=HTTP/1.1 "
                               "remote=127.0.0.1 status=200 bytes=14 elapsed="), lines
    assert not any("secret" in line for line in lines)
