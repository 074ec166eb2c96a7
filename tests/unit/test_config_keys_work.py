"""Keys that used to be accepted and ignored, now working: auto_update.enabled in the map,
derp.urls re-fetched every derp.update_frequency (a local HTTP server serves a DERP map that
changes while a client holds its map stream)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from pyheadscale.app import Server
from pyheadscale.noise.keys import generate_private_key, public_key
from pyheadscale.testclient import connect
from tests.inproc import running_server, server_config
from tests.netutil import free_port


def region(rid: int, host: str) -> dict[str, Any]:
    return {"RegionID": rid, "RegionCode": f"r{rid}", "RegionName": f"Region {rid}",
            "Nodes": [{"Name": f"{rid}a", "RegionID": rid, "HostName": host,
                       "DERPPort": 443}]}


class MapServer:
    """A DERP map URL on loopback whose answer the test changes."""

    def __init__(self) -> None:
        self.body: bytes = b""
        self.status = 200
        self.hits = 0
        self.port = free_port()

    def serve(self, regions: list[dict[str, Any]]) -> None:
        self.body = json.dumps({"Regions": {str(r["RegionID"]): r for r in regions}}).encode()

    async def handler(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(body=self.body, status=self.status,
                            content_type="application/json")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/derpmap.json"


@pytest.fixture
async def derp_map_url() -> AsyncIterator[MapServer]:
    ms = MapServer()
    app = web.Application()
    app.router.add_get("/derpmap.json", ms.handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", ms.port).start()
    try:
        yield ms
    finally:
        await runner.cleanup()


async def open_map(srv: Server, capver: int = 113) -> tuple[Any, AsyncIterator[dict[str, Any]]]:
    user = srv.tailnet.user_by_name("uu") or await srv.tailnet.create_user("uu")
    _, key = await srv.tailnet.create_preauth_key(user.id, reusable=True)
    machine, node = generate_private_key(), generate_private_key()
    conn = await connect(str(srv.cfg.server_url), machine, capver=capver)
    body = {"Version": capver, "NodeKey": "nodekey:" + public_key(node).hex(),
            "Auth": {"AuthKey": key}, "Hostinfo": {"Hostname": "n"}}
    status, _, resp = await conn.request("POST", "/machine/register", orjson.dumps(body))
    assert status == 200 and orjson.loads(resp)["MachineAuthorized"], resp
    req = {"Version": capver, "NodeKey": "nodekey:" + public_key(node).hex(), "Stream": True,
           "Compress": "zstd", "KeepAlive": True,
           "DiscoKey": "discokey:" + public_key(generate_private_key()).hex()}
    return conn, conn.stream_map(orjson.dumps(req)).__aiter__()


@pytest.mark.parametrize("enabled", [True, False])
async def test_auto_update_reaches_the_cap_map(enabled: bool, tmp_path: Path) -> None:
    cfg = server_config(tmp_path, overrides={"auto_update": {"enabled": enabled}})
    async with running_server(cfg) as srv:
        # 145: reads the cap; 113 (v1.80): reads only the top-level field, so it gets both.
        for capver, top_level in ((145, False), (113, True)):
            conn, frames = await open_map(srv, capver)
            try:
                first = await asyncio.wait_for(frames.__anext__(), 10)
            finally:
                await conn.close()
            assert first["Node"]["CapMap"]["default-auto-update"] == [enabled]
            assert ("DefaultAutoUpdate" in first) is top_level
            if top_level:
                assert first["DefaultAutoUpdate"] is enabled


async def next_derp_map(frames: AsyncIterator[dict[str, Any]], within: float
                        ) -> dict[str, Any]:
    async def find() -> dict[str, Any]:
        async for frame in frames:
            if "DERPMap" in frame:
                return dict(frame["DERPMap"])
        raise AssertionError("map stream ended")
    return await asyncio.wait_for(find(), within)


async def test_derp_urls_refetched_every_update_frequency(derp_map_url: MapServer,
                                                          tmp_path: Path) -> None:
    derp_map_url.serve([region(900, "derp-a.example.net")])
    overrides = {"derp": {"urls": [derp_map_url.url], "auto_update_enabled": True,
                          "update_frequency": "1s"}}
    async with running_server(server_config(tmp_path, overrides=overrides)) as srv:
        conn, frames = await open_map(srv)
        try:
            first = await next_derp_map(frames, 10)
            assert {"900", "999"} <= set(first["Regions"])  # the URL's and the embedded one
            assert first["Regions"]["900"]["Nodes"][0]["HostName"] == "derp-a.example.net"

            # The map at the URL changes: the client's stream carries the new map.
            derp_map_url.serve([region(900, "derp-b.example.net"),
                                region(901, "derp-c.example.net")])
            second = await next_derp_map(frames, 15)
            assert second["Regions"]["900"]["Nodes"][0]["HostName"] == "derp-b.example.net"
            assert {"900", "901", "999"} <= set(second["Regions"])

            # The URL fails: the last good map stays; it comes back: no needless update.
            derp_map_url.status = 503
            hits = derp_map_url.hits
            await asyncio.sleep(2.5)
            assert derp_map_url.hits > hits  # retried
            assert set(srv.control.mapctx.derp_map["Regions"]) >= {"900", "901"}
            derp_map_url.status = 200
            refreshes = srv.control.derp_urls.refreshes
            while srv.control.derp_urls.refreshes == refreshes:  # noqa: ASYNC110 (polls state)
                await asyncio.sleep(0.2)
            with pytest.raises(TimeoutError):
                await next_derp_map(frames, 2.5)  # unchanged map: nothing sent
        finally:
            await conn.close()


async def test_without_auto_update_the_url_is_fetched_once(derp_map_url: MapServer,
                                                           tmp_path: Path) -> None:
    derp_map_url.serve([region(900, "derp-a.example.net")])
    overrides = {"derp": {"urls": [derp_map_url.url], "auto_update_enabled": False,
                          "update_frequency": "1s"}}
    async with running_server(server_config(tmp_path, overrides=overrides)):
        await asyncio.sleep(2.5)
    assert derp_map_url.hits == 1


async def test_oversized_derp_map_is_refused(derp_map_url: MapServer, tmp_path: Path) -> None:
    derp_map_url.body = b"{" + b" " * (5 << 20) + b"}"
    cfg = server_config(tmp_path, overrides={"derp": {"urls": [derp_map_url.url]}})
    async with running_server(cfg) as srv:
        assert set(srv.control.mapctx.derp_map["Regions"]) == {"999"}


# --- keys with no equivalent: defaults accepted, anything else refused, gRPC warned -----------

def write_minimal(tmp_path: Path, extra: dict[str, Any]) -> Path:
    import yaml

    raw = {"server_url": "https://hs.example.net", "listen_addr": "0.0.0.0:8080",
           "noise": {"private_key_path": "noise.key"}, "prefixes": {"v4": "100.64.0.0/10"},
           "database": {"type": "sqlite", "sqlite": {"path": "db.sqlite"}},
           "derp": {"urls": ["https://derp.example.net/map.json"]},
           "dns": {"magic_dns": False, "override_local_dns": False}, **extra}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(("key", "default", "other"), [
    ("notifier_send_timeout", "800ms", "2s"),
    ("node_mapsession_buffered_chan_size", 30, 64),
    ("batcher_workers", 0, 4),
    ("node_store_batch_size", 100, 10),
    ("node_store_batch_timeout", "500ms", "1s"),
])
def test_tuning_without_equivalent(key: str, default: object, other: object,
                                   tmp_path: Path) -> None:
    from pyheadscale.config import ConfigError, load_config

    load_config(write_minimal(tmp_path, {"tuning": {key: default}}), env={})
    with pytest.raises(ConfigError, match=rf"^config: tuning\.{key}: not supported by "
                                          r"pyheadscale \(.*\); remove the key"):
        load_config(write_minimal(tmp_path, {"tuning": {key: other}}), env={})


def test_grpc_keys_warn_and_load(tmp_path: Path) -> None:
    from pyheadscale.config import load_config

    assert load_config(write_minimal(tmp_path, {}), env={}).warnings == []
    cfg = load_config(write_minimal(tmp_path, {"grpc_listen_addr": "0.0.0.0:50443"}), env={})
    assert any(w.startswith("grpc_listen_addr: not supported") for w in cfg.warnings)


async def test_derp_paths_read_again_every_update_frequency_without_urls(
        tmp_path: Path) -> None:
    """Headscale's scheduled update rebuilds the whole map, URLs or not: a derp.paths file
    edited while a client holds its stream reaches it at the next tick."""
    path = tmp_path / "derp.json"
    path.write_text(json.dumps({"Regions": {"900": region(900, "derp-a.example.net")}}))
    overrides = {"derp": {"urls": [], "paths": [str(path)], "auto_update_enabled": True,
                          "update_frequency": "1s"}}
    async with running_server(server_config(tmp_path, overrides=overrides)) as srv:
        conn, frames = await open_map(srv)
        try:
            first = await next_derp_map(frames, 10)
            assert first["Regions"]["900"]["Nodes"][0]["HostName"] == "derp-a.example.net"
            path.write_text(json.dumps({"Regions": {"900": region(900, "derp-b.example.net"),
                                                    "901": region(901, "derp-c.example.net")}}))
            second = await next_derp_map(frames, 10)
            assert second["Regions"]["900"]["Nodes"][0]["HostName"] == "derp-b.example.net"
            assert {"900", "901"} <= set(second["Regions"])
            with pytest.raises(TimeoutError):
                await next_derp_map(frames, 2.5)  # unchanged file: nothing more sent
        finally:
            await conn.close()
