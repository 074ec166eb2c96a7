"""The embedded relay in a region of several instances: the other instances' relays join the
DERP map's region after this one's node, and this relay meshes with each (two real relays on
loopback); a lone instance's region is the single-node one."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pyheadscale.embedded_derp import EmbeddedDerp
from tests.netutil import free_port
from tests.unit._statefix import make_cfg, new_engine, open_tailnet

MESH_KEY = "ab" * 32


async def _relay(tmp: Path, name: str) -> EmbeddedDerp:
    data = tmp / name
    data.mkdir()
    cfg = make_cfg(data_dir=str(data), derp={"server": {
        "enabled": True, "listen_addr": f"127.0.0.1:{free_port()}", "hostname": "127.0.0.1",
        "ipv4": "127.0.0.1", "stun_listen_addr": f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
        "region_id": 901}})
    tn = await open_tailnet(new_engine(data), cfg)
    relay = EmbeddedDerp(cfg, tn, mesh_key=MESH_KEY, node_name=name)
    await relay.start()
    return relay


@pytest.fixture
async def relays(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedDerp, EmbeddedDerp]]:
    a = await _relay(tmp_path, "a")
    b = await _relay(tmp_path, "b")
    try:
        yield a, b
    finally:
        for r in (a, b):
            await r.stop()
            await r.tailnet.close()


async def test_peers_join_the_region_after_this_relay_and_are_meshed(
        relays: tuple[EmbeddedDerp, EmbeddedDerp]) -> None:
    a, b = relays
    alone = a.region()
    assert [n["Name"] for n in alone["Nodes"]] == ["901"]  # as without other instances
    assert await a.set_peers({}) is False and a.region() == alone

    info = b.cluster_info()
    assert info["mesh_url"] == f"https://127.0.0.1:{b.port}/derp"
    assert info["node"]["Name"] == "901-b" and info["node"]["DERPPort"] == b.port
    assert await a.set_peers({"b": info}) is True
    region = a.region()
    assert region["RegionID"] == 901
    assert [n["Name"] for n in region["Nodes"]] == ["901-a", "901-b"]
    assert region["Nodes"][0]["DERPPort"] == a.port and region["Nodes"][1]["DERPPort"] == b.port
    assert all(n["RegionID"] == 901 for n in region["Nodes"])
    # A real mesh link to b, authenticated by the shared key.
    _, link = a._peer_links["b"]
    await asyncio.wait_for(link.connected.wait(), 10)
    # The same peers again change nothing and keep the link.
    assert await a.set_peers({"b": b.cluster_info()}) is False
    assert a._peer_links["b"][1] is link

    # b left: its node and its link go, the region is the lone one again.
    assert await a.set_peers({}) is True
    assert a.region() == alone and not a._peer_links
    assert link not in a.server._mesh_links
