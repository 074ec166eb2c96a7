"""Official clients relayed by the embedded DERP server over WebSocket and over plain TLS
(Headscale's TestDERPServerWebsocketScenario and TestDERPServerScenario).

tailscaled dials DERP over WebSocket (GET /derp, Upgrade: websocket, subprotocol "derp")
only when built with Tailscale's `ts_debug_websockets` tag and run with the
TS_DEBUG_DERP_WS_CLIENT envknob; `make clients` builds that tailscaled for every pinned
version (build_clients --ws-derp). Three such clients (one per version) and one plain client
share a tailnet; UDP between all of them is dropped, so every ping is relayed. Like
Headscale's test, the WebSocket clients must log "websocket: connected to" (the plain one must
not), every ordered pair pings through the relay, no client reports a relay it cannot reach,
and the same holds after the server's DERP-map updater has run twice.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from tests.integration import build_clients
from tests.integration.derp_helpers import REGION_CODE, ping_paths
from tests.integration.tailscale import Tailscaled
from tests.integration.versions import PINNED
from tests.integration.world import World, wait_for, world_fixture

pytestmark = pytest.mark.integration

WS_LINE = "websocket: connected to "
DERP_PATH = f"DERP({REGION_CODE})"
UPDATER_LINE = "fetching DERPMap updates"

lab = world_fixture(World)


@pytest.fixture(scope="module")
def ws_tailscaled() -> dict[str, Path]:
    try:
        return {v: build_clients.ensure(v, ["tailscaled"], tags=build_clients.WS_DERP_TAGS)
                / "tailscaled" for v in PINNED}
    except build_clients.BuildError as exc:
        pytest.fail(f"tailscaled with DERP over WebSocket unavailable: {exc}", pytrace=False)


def _health_ok(ts: Tailscaled) -> bool:
    """No health warning about an unreachable relay (Headscale's check on status.Health)."""
    health = ts.status_json().get("Health") or []
    return not any("could not connect to" in h and "relay" in h for h in health)


def _ping_all_via_derp(nodes: dict[str, Tailscaled]) -> None:
    addrs = {n: ts.ip("4")[0] for n, ts in nodes.items()}
    for a, b in itertools.permutations(nodes, 2):
        paths, out = ping_paths(nodes[a], addrs[b], count=2)  # retries until pongs come
        assert all(p == DERP_PATH for p in paths), f"{a} -> {b}: {out}"


@pytest.mark.parametrize("websocket", [True, False], ids=["websocket", "tcp"])
def test_derp_server_scenario(lab: World, ws_tailscaled: dict[str, Path],
                              websocket: bool) -> None:
    """websocket: TestDERPServerWebsocketScenario (one client per version over WebSocket,
    plus a plain one); tcp: TestDERPServerScenario (one plain client per version, none may
    use WebSocket)."""
    srv = lab.start_server({"derp": {"auto_update_enabled": True,
                                     "update_frequency": "10s"}})
    nodes: dict[str, Tailscaled] = {}
    for i, version in enumerate(PINNED):
        name = f"ws{i}" if websocket else f"plain{i}"
        ts = lab.add_client(name, version)
        if websocket:
            # The harness started the plain daemon; restart it as the WebSocket build.
            ts.stop()
            ts.tailscaled = ws_tailscaled[version]
            ts.env["TS_DEBUG_DERP_WS_CLIENT"] = "true"
            ts.start()
        nodes[name] = ts
    if websocket:
        nodes["plain"] = lab.add_client("plain", PINNED[-1])
    hosts = [ts.host for ts in nodes.values()]
    for a, b in itertools.combinations(hosts, 2):
        lab.topology.block_udp(a, b)
    for name, ts in nodes.items():
        assert srv is not None
        r = ts.up(srv.url, authkey=lab.keys["reusable"], hostname=name, timeout=60)
        assert r.returncode == 0, f"{name}: {r.stdout}{r.stderr}"

    for name, ts in nodes.items():
        wait_for(f"{name} to have no relay health warning", lambda ts=ts: _health_ok(ts), 60)
    _ping_all_via_derp(nodes)
    for name, ts in nodes.items():
        used_ws = WS_LINE in ts.log_text()
        assert used_ws == name.startswith("ws"), f"{name}: WebSocket DERP used: {used_ws}"
        assert _health_ok(ts), ts.status_json().get("Health")

    # The DERP-map updater runs twice more; the relay keeps carrying every pair.
    runs = len(re.findall(UPDATER_LINE, srv.log_text()))
    wait_for("the DERP-map updater to run twice more",
             lambda: len(re.findall(UPDATER_LINE, srv.log_text())) >= runs + 2, 40)
    _ping_all_via_derp(nodes)
    for name, ts in nodes.items():
        assert _health_ok(ts), (name, ts.status_json().get("Health"))
