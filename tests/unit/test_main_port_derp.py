"""The embedded relay on pyheadscale's main TLS listener (server_url https, no
derp.server.listen_addr): its routes, fast start, the DERP map, and the control plane and
API on the same port.  In-process on loopback; official clients show the same in
tests/integration/test_derp.py."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from derp import protocol as p
from derp.client import DerpClient, _ClientProtocol
from derp.keys import generate_private_key as derp_key
from derp.tls import client_ssl_context, ensure_self_signed
from pyheadscale.app import Server
from tests.inproc import running_server, server_config


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    cert, key = ensure_self_signed(tmp_path / "tls", "127.0.0.1")
    cfg = server_config(tmp_path, scheme="https", overrides={
        "tls_cert_path": str(cert), "tls_key_path": str(key),
        "derp": {"server": {"verify_clients": False}},
    })
    async with running_server(cfg) as srv:
        yield srv


def _tls(server: Server) -> ssl.SSLContext:
    return client_ssl_context(Path(server.cfg.data_dir) / "tls" / "127.0.0.1.crt")


def _port(server: Server) -> int:
    return int(str(server.cfg.listen_addr).rpartition(":")[2])


async def _get(server: Server, raw: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", _port(server), ssl=_tls(server))
    w.write(raw)
    data = await asyncio.wait_for(r.read(), 5)
    w.close()
    return data


async def test_map_points_at_server_url(server: Server) -> None:
    assert server.derp is not None and server.derp.on_main_listener
    region = server.control.mapctx.derp_map["Regions"]["999"]
    node = region["Nodes"][0]
    assert node["HostName"] == "127.0.0.1" and node["DERPPort"] == _port(server)
    assert "CertName" not in node  # the server's own certificate, trusted as such


async def test_relay_and_control_share_the_port(server: Server) -> None:
    url = f"https://127.0.0.1:{_port(server)}/derp"
    a = await DerpClient.connect(url, derp_key(), ssl=_tls(server))
    b = await DerpClient.connect(url, derp_key(), ssl=_tls(server),
                                 fast_start_key=server.derp.server.public_key)
    a.send(b.public_key, b"hello over 443")
    assert (await b.recv_packet(2)).data == b"hello over 443"
    b.send(a.public_key, b"and back")
    assert (await a.recv_packet(2)).data == b"and back"
    # The same listener still serves the control plane and aiohttp's routes.
    async with aiohttp.ClientSession() as s:
        async with s.get(f"https://127.0.0.1:{_port(server)}/health", ssl=_tls(server)) as r:
            assert r.status == 200
    await a.close()
    await b.close()


async def test_fast_start_pipelined_bytes_on_main_port(server: Server) -> None:
    url = f"https://127.0.0.1:{_port(server)}/derp"
    b = await DerpClient.connect(url, derp_key(), ssl=_tls(server))
    a = DerpClient(derp_key())
    pub = server.derp.server.public_key
    loop = asyncio.get_running_loop()
    await loop.create_connection(lambda: _ClientProtocol(a), "127.0.0.1", _port(server),
                                 ssl=_tls(server))
    a._in_http = False
    a.server_key = pub
    a._expect_server_key = pub
    req = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n" \
          b"Derp-Fast-Start: 1\r\n\r\n"
    ci = p.client_info_frame(a.private_key, pub, p.ClientInfo())
    a._transport.write(req + ci + p.send_packet_frame(b.public_key, b"pipelined"))
    await asyncio.wait_for(a._handshake, 2)
    assert a.http_status is None
    ev = await b.recv_packet(2)
    assert ev.data == b"pipelined" and ev.src == a.public_key
    await a.close()
    await b.close()


async def test_probe_routes_and_bootstrap_dns(server: Server) -> None:
    d = await _get(server, b"HEAD /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert d.startswith(b"HTTP/1.1 200") and b"Access-Control-Allow-Origin: *" in d
    d = await _get(server, b"GET /derp/latency-check HTTP/1.1\r\nHost: x\r\n"
                           b"Connection: close\r\n\r\n")
    assert d.startswith(b"HTTP/1.1 200")
    d = await _get(server, b"GET /generate_204 HTTP/1.1\r\nHost: x\r\n"
                           b"X-Tailscale-Challenge: abc\r\nConnection: close\r\n\r\n")
    assert d.startswith(b"HTTP/1.1 204") and b"X-Tailscale-Response: response abc" in d
    d = await _get(server, b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert d.startswith(b"HTTP/1.1 426")
    # /bootstrap-dns answers for the DERP map's hosts (resolved in the background).
    for _ in range(50):
        d = await _get(server, b"GET /bootstrap-dns HTTP/1.1\r\nHost: x\r\n\r\n")
        body = json.loads(d.partition(b"\r\n\r\n")[2])
        if body:
            break
        await asyncio.sleep(0.05)
    assert body == {"127.0.0.1": ["127.0.0.1"]}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"https://127.0.0.1:{_port(server)}/key?v=113",
                         ssl=_tls(server)) as r:
            assert r.status == 200 and (await r.json())["publicKey"].startswith("mkey:")


async def test_tls_clients_closing_leave_no_warnings(server: Server,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    # TLS clients that close cleanly (close_notify) after a request: asyncio must not warn
    # about the front door's EOF handling (a true eof_received means nothing over TLS).
    caplog.set_level(logging.WARNING, logger="asyncio")
    for _ in range(3):
        r, w = await asyncio.open_connection("127.0.0.1", _port(server), ssl=_tls(server))
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        w.close()
        await w.wait_closed()
    await asyncio.sleep(0.2)
    assert not [r for r in caplog.records if "eof_received" in r.getMessage()]
