"""Bad input against the whole server: each bad connection or request is
answered or closed on its own, other clients keep working, and nothing half-written is stored.

Runs the real server in-process on loopback with the Python protocol client (never the proof of
compatibility with official clients; test_control.py is)."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from sqlmodel import Session, func, select

from pyheadscale.app import Server
from pyheadscale.db import models
from pyheadscale.noise.keys import generate_private_key, public_key
from pyheadscale.testclient import connect
from tests.inproc import Machine


def url(srv: Server) -> str:
    return str(srv.cfg.server_url)


def rows(srv: Server, table: Any) -> int:
    with Session(srv.engine) as s:
        return int(s.exec(select(func.count()).select_from(table)).one())


async def healthy_client_works(srv: Server, key: str) -> None:
    async with Machine(url(srv), "newcomer") as m:
        resp = await m.register(auth_key=key)
        assert resp.get("MachineAuthorized") is True, resp
        async for frame in m.stream_map():
            assert frame["Node"]["MachineAuthorized"] is True
            assert frame["DERPMap"]["Regions"]
            break


async def test_bad_input_is_contained(server: Server) -> None:
    user = await server.tailnet.create_user("alice")
    _, key = await server.tailnet.create_preauth_key(user.id, reusable=True)
    nodes_before = rows(server, models.Node)

    # A client that stays connected through all of it.
    bystander = await Machine(url(server), "bystander").open()
    resp = await bystander.register(auth_key=key)
    assert resp["MachineAuthorized"] is True

    async with aiohttp.ClientSession() as http:
        # Bad base64 handshake header.
        async with http.post(url(server) + "/ts2021", headers={
                "Upgrade": "tailscale-control-protocol", "Connection": "upgrade",
                "X-Tailscale-Handshake": "not base64!"}) as r:
            assert r.status == 400
        # A well-formed header carrying a wrong Noise message: refused with an error frame.
        junk = b"\x00\x71\x01\x00\x60" + os.urandom(96)
        port = int(url(server).rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\n"
                     b"Connection: upgrade\r\nX-Tailscale-Handshake: "
                     + base64.b64encode(junk) + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)  # read to EOF: the server closes
        assert b" 101 " in data.split(b"\r\n", 1)[0]
        frame = data.split(b"\r\n\r\n", 1)[1]
        assert frame[0] == 3 and b"decrypt" in frame[3:], frame
        writer.close()

    # Oversized record, truncated-then-garbage record, garbage HTTP/2 inside Noise.
    for attack in (
        lambda c: c.send_raw(b"\x04\xff\xff" + b"\x00" * 64),
        lambda c: c.send_raw(b"\x04\x00\x20" + os.urandom(32)),
        # A SETTINGS frame whose length is not a multiple of 6: an HTTP/2 connection error.
        lambda c: c.send_plaintext(b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + b"\x01" * 5),
    ):
        conn = await connect(url(server), generate_private_key(), capver=113)
        attack(conn)
        await asyncio.wait_for(conn.wait_closed(), 10)
        assert conn.closed

    # Bad requests on a good connection: answered per stream, the connection survives.
    conn = await connect(url(server), generate_private_key(), capver=113)
    status, _, body = await conn.request("POST", "/machine/register", b"{not json")
    assert status == 400 and b"not JSON" in body
    unknown = {"Version": 113, "NodeKey": "nodekey:" + public_key(generate_private_key()).hex(),
               "Stream": True}
    status, _, body = await conn.request("POST", "/machine/map", orjson.dumps(unknown))
    assert status == 404
    status, _, body = await conn.request("POST", "/machine/register", orjson.dumps(
        {"Version": 113, "NodeKey": "", "Auth": {"AuthKey": key}}))
    assert status == 400
    status, _, _ = await conn.request("POST", "/machine/register", orjson.dumps(
        {"Version": 42, "NodeKey": "nodekey:" + "1" * 64}))
    assert status == 400
    await conn.close()

    # Nothing was written by any of it; the bystander and a newcomer still work.
    assert rows(server, models.Node) == nodes_before + 1
    assert not bystander.conn.closed
    await healthy_client_works(server, key)
    await bystander.close()


async def test_health_says_pass_or_fail_only(server: Server, caplog: Any) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(url(server) + "/health") as r:
            assert (r.status, await r.json(content_type=None)) == (200, {"status": "pass"})
            assert r.content_type == "application/health+json"

        async def broken() -> None:
            raise OSError("connection to server at 10.9.8.7 (db-secret-host) refused")

        server.tailnet.ping_db = broken  # type: ignore[method-assign]
        async with http.get(url(server) + "/health") as r:
            body = await r.read()
            assert r.status == 500 and orjson.loads(body) == {"status": "fail"}
    assert b"db-secret-host" not in body and "db-secret-host" in caplog.text


async def test_data_dir_and_database_are_private(server: Server) -> None:
    data = Path(server.cfg.data_dir)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    db_path = Path(server.cfg.database.sqlite.path)
    for f in db_path.parent.glob(db_path.name + "*"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
