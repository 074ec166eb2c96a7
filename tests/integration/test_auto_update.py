"""Keys that used to be ignored, judged by official clients: `auto_update.enabled` reaches
their own node's capability map (`default-auto-update`; clients that predate the cap also
get the MapResponse's top-level DefaultAutoUpdate, which only unit tests can see), and
`derp.auto_update_enabled` brings them a changed DERP map."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.tailscale import Tailscaled
from tests.integration.versions import PINNED
from tests.integration.world import World, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("enabled", [True, False])
def test_auto_update_default_in_the_clients_cap_map(world: World, enabled: bool) -> None:
    world.start_server({"auto_update": {"enabled": enabled}})
    clients = [world.join(f"au{i}", version) for i, version in enumerate((PINNED[0],
                                                                           PINNED[-1]))]
    for ts in clients:
        caps = wait_for(f"{ts.host.name}'s CapMap",
                        lambda ts=ts: ts.status_json()["Self"].get("CapMap"), timeout=30)
        assert caps.get("default-auto-update") == [enabled], caps


def derp_map(regions: dict[int, str]) -> str:
    return json.dumps({"Regions": {str(rid): {
        "RegionID": rid, "RegionCode": f"r{rid}", "RegionName": f"Region {rid}",
        "Nodes": [{"Name": f"{rid}a", "RegionID": rid, "HostName": host, "DERPPort": 443}]}
        for rid, host in regions.items()}})


def test_derp_map_url_refetched_and_pushed_to_clients(world: World) -> None:
    """derp.auto_update_enabled: a DERP map URL (an HTTP server on the server host's
    loopback) changes, and official clients get the new map without reconnecting."""
    site = world.workdir / "derpmap"
    site.mkdir()
    (site / "map.json").write_text(derp_map({900: "203.0.113.90"}))
    port = 8089
    world.server_host.popen([sys.executable, "-m", "http.server", str(port), "--bind",
                             "127.0.0.1", "--directory", str(site)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for("the map server", lambda: world.server_host.run(
        [sys.executable, "-c", f"import urllib.request; urllib.request.urlopen("
                               f"'http://127.0.0.1:{port}/map.json', timeout=1)"]
    ).returncode == 0, timeout=10)
    world.start_server({"derp": {"urls": [f"http://127.0.0.1:{port}/map.json"],
                                 "auto_update_enabled": True, "update_frequency": "2s"}})
    clients = [world.join(f"dm{i}", v) for i, v in enumerate((PINNED[0], PINNED[-1]))]

    def regions(ts: Tailscaled) -> dict[str, str]:
        r = ts.cli("debug", "derp-map")
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)["Regions"]
        return {rid: reg["Nodes"][0]["HostName"] for rid, reg in got.items()}

    for ts in clients:
        assert regions(ts)["900"] == "203.0.113.90"
    pids = [ts.proc.pid for ts in clients if ts.proc is not None]
    (site / "map.json").write_text(derp_map({900: "203.0.113.91", 901: "203.0.113.92"}))
    for ts in clients:
        got = wait_for(f"{ts.host.name} to get the new DERP map",
                       lambda ts=ts: (r := regions(ts)).get("901") and r, timeout=30)
        assert got["900"] == "203.0.113.91" and got["901"] == "203.0.113.92"
    assert [ts.proc.pid for ts in clients if ts.proc is not None] == pids
