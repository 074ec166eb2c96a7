"""Listener bounds (limits: in the config): request-head and keep-alive timeouts on the main,
relay and metrics listeners, and the per-source connection limit across socket takeovers."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pyheadscale.noise.keys import generate_private_key
from pyheadscale.testclient import connect
from tests.inproc import running_server, server_config
from tests.netutil import free_port

LIMITS = {"request_head_timeout": "400ms", "keepalive_timeout": "400ms"}


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        while await asyncio.wait_for(reader.read(4096), seconds):
            pass
    except TimeoutError:
        return False
    return True


async def test_silent_and_dribbling_connections_are_closed(tmp_path: Path) -> None:
    metrics, relay = free_port(), free_port()
    async with running_server(server_config(tmp_path, overrides={
            "limits": LIMITS, "metrics_listen_addr": f"127.0.0.1:{metrics}",
            "derp": {"server": {"listen_addr": f"127.0.0.1:{relay}"}}})) as srv:
        port = int(str(srv.cfg.server_url).rsplit(":", 1)[1])
        for p in (port, metrics):
            r, w = await asyncio.open_connection("127.0.0.1", p)  # says nothing
            r2, w2 = await asyncio.open_connection("127.0.0.1", p)
            w2.write(b"GET /health HTTP/1.1\r\n")  # starts a head, never ends it
            assert await closed_within(r, 2) and await closed_within(r2, 2)
            # A kept-alive connection is closed after its idle time, not before an answer.
            r3, w3 = await asyncio.open_connection("127.0.0.1", p)
            path = b"/health" if p == port else b"/metrics"
            w3.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(r3.readuntil(b"\r\n\r\n"), 2)).startswith(
                b"HTTP/1.1 200")
            assert await closed_within(r3, 2)
            for wr in (w, w2, w3):
                wr.close()
        # The relay's own TLS listener: a TCP connection that never starts TLS.
        r, w = await asyncio.open_connection("127.0.0.1", relay)
        assert await closed_within(r, 2)
        w.close()


async def test_connections_per_source_are_limited_also_after_takeover(tmp_path: Path) -> None:
    async with running_server(server_config(
            tmp_path, overrides={"limits": {"max_connections_per_source": 3}})) as srv:
        url = str(srv.cfg.server_url)
        port = int(url.rsplit(":", 1)[1])
        noise = [await connect(url, generate_private_key(), 113) for _ in range(2)]
        idle = (await asyncio.open_connection("127.0.0.1", port))[1]
        # Two Noise connections (taken over) and one idle one: a fourth is refused at once.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await closed_within(r, 2)
        w.close()
        # From another address (127.0.0.2 is loopback too) it is fine.
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(r.readline(), 2)).startswith(b"HTTP/1.1 200")
        w.close()
        # When the Noise connections end, their slots are free again.
        for c in noise:
            await c.close()
        idle.close()
        await asyncio.sleep(0.2)
        again = await connect(url, generate_private_key(), 113)
        status, _, _ = await again.request("POST", "/machine/map", b"{}")
        assert status == 400
        await again.close()
