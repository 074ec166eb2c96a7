"""A router of one user serving its LAN, then also the internet, to another user on another
network, judged by official clients (Headscale's TestSubnetRouterMultiNetwork and
TestSubnetRouterMultiNetworkExitNode, one after the other on one tailnet).

alice's router runs in a NAT router's namespace: its WAN is on the internet, its LAN carries
a web server that answers with the address it sees. bob's client is a plain internet host. No
policy: everyone may reach everything.
"""

from __future__ import annotations

import pytest

from tests.integration import hsapi
from tests.integration.test_routes import Lab, fetch, routed_into_tailnet
from tests.integration.test_routes_more import _counts, _subnet_routes
from tests.integration.versions import NEWEST, OLDEST
from tests.integration.world import peers_by_name, wait_for, world_fixture

pytestmark = pytest.mark.integration

LAN = "192.0.2.0/24"
EXITS = ["0.0.0.0/0", "::/0"]

lab = world_fixture(Lab)


def test_subnet_router_then_exit_node_for_another_user(lab: Lab) -> None:
    topo = lab.topology
    srv = lab.start_server()
    r1 = topo.add_nat("r1", LAN)
    web = topo.add_lan_host(r1, "web", "192.0.2.10")
    lab.web(web)
    www = topo.add_host("www", topo.public_segment())
    lab.web(www)
    router = lab.join(r1, "router", NEWEST)
    client = lab.join(topo.add_host("client"), "client", OLDEST, "bob", ("--accept-routes",))
    assert lab.nodes["router"] is router

    # TestSubnetRouterMultiNetwork: announced with `tailscale set`, served once approved.
    assert router.cli("set", f"--advertise-routes={LAN}").returncode == 0
    wait_for("the announcement", lambda: _counts(
        hsapi.node_by_name(srv, "router") or {}) == (1, 0, 0), 20)
    for ts in (router, client):
        for p in peers_by_name(ts.status_json()).values():
            assert not p.get("PrimaryRoutes") and _subnet_routes(p) == [], p
    assert not routed_into_tailnet(client, web.ip)
    hsapi.approve_routes(srv, "router", [LAN])
    wait_for("the route served", lambda: _counts(
        hsapi.node_by_name(srv, "router") or {}) == (1, 1, 1), 20)
    wait_for("bob's client to be sent the LAN at the router", lambda: _subnet_routes(
        peers_by_name(client.status_json())["router"]) == [LAN], 20)
    # The web server sees the router's LAN address: the request went through it.
    assert wait_for("bob's client -> the LAN web server", lambda: fetch(client.host, web.ip),
                    20) == r1.lan.gateway

    # TestSubnetRouterMultiNetworkExitNode: the same node also offers the internet.
    assert router.cli("set", "--advertise-exit-node",
                      f"--advertise-routes={LAN}").returncode == 0
    wait_for("three announcements, the LAN still approved", lambda: _counts(
        hsapi.node_by_name(srv, "router") or {}) == (3, 1, 1), 20)
    assert not peers_by_name(client.status_json())["router"].get("ExitNodeOption")
    hsapi.approve_routes(srv, "router", [*EXITS, LAN])
    wait_for("all three served", lambda: _counts(
        hsapi.node_by_name(srv, "router") or {}) == (3, 3, 3), 20)
    wait_for("bob's client to be offered the exit node", lambda: peers_by_name(
        client.status_json())["router"].get("ExitNodeOption") is True, 20)
    assert fetch(client.host, www.ip) == client.host.ip  # the direct path, before
    assert client.cli("set", "--exit-node=router").returncode == 0
    wait_for("the exit node to be in use", lambda: client.status_json().get("ExitNodeStatus"),
             30)
    assert wait_for("bob's client -> an internet host through the exit node",
                    lambda: fetch(client.host, www.ip), 20) == r1.wan_ip
    assert fetch(client.host, web.ip) == r1.lan.gateway
