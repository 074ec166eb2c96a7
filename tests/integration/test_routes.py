"""Subnet routes, HA failover and exit nodes judged by official clients.

Routers run tailscaled in a NAT router's namespace: its eth0 is on the internet, its br LAN
carries a plain host with a tiny HTTP server that answers with the address it sees, so a test
can tell which router (source NAT) or exit node carried a request.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.integration import hsapi
from tests.integration.netns import Namespace
from tests.integration.server import PyHeadscale, http_get_from
from tests.integration.tailscale import Tailscaled
from tests.integration.versions import PINNED
from tests.integration.world import World, peers_by_name, serve_echo, wait_for, world_fixture

pytestmark = pytest.mark.integration

NEWEST, OLDEST = PINNED[-1], PINNED[0]
PORT = 8000
class Lab(World):
    """Users alice and bob with a reusable key each; routers join from their own namespace."""

    def start_server(self, policy: dict[str, Any] | None = None,  # type: ignore[override]
                     overrides: dict[str, Any] | None = None) -> PyHeadscale:
        return super().start_server(overrides, {
            "alice": {"user": "alice", "reusable": True},
            "bob": {"user": "bob", "reusable": True},
        }, ["alice", "bob"], policy)

    def web(self, ns: Namespace) -> None:
        serve_echo(ns, "0.0.0.0", [PORT])

    def join(self, ns: Namespace, name: str, version: str = NEWEST,  # type: ignore[override]
             key: str = "alice", args: tuple[str, ...] = ()) -> Tailscaled:
        return super().join(name, version, key, args, host=ns)


lab = world_fixture(Lab)


def fetch(ns: Namespace, ip: str, timeout: float = 3) -> str | None:
    """The address the web server saw, or None when the request found no way there."""
    status, body = http_get_from(ns, f"http://{ip}:{PORT}/", timeout=timeout)  # type: ignore[arg-type]
    return body.decode() if status == 200 else None


POLICY = {
    "acls": [{"action": "accept", "src": ["*"],
              "dst": ["*:*", "192.0.2.0/24:*", "autogroup:internet:*"]}],
    # Only the upper half of the LAN range is approved by policy; the lower needs an admin.
    "autoApprovers": {"routes": {"192.0.2.128/25": ["alice@"]}},
}


def test_subnet_route_served_only_after_admin_or_policy_approval(lab: Lab) -> None:
    topo = lab.topology
    srv = lab.start_server(POLICY)
    r1 = topo.add_nat("r1", "192.0.2.0/25")
    h1 = topo.add_lan_host(r1, "h1")
    lab.web(h1)
    client = topo.add_host("client")
    c = lab.join(client, "client", OLDEST, args=("--accept-routes",))
    lab.join(r1, "router1", args=("--advertise-routes=192.0.2.0/25",))

    node = wait_for("the server to see router1's announcement",
                    lambda: (n := hsapi.node_by_name(srv, "router1"))
                    and n["availableRoutes"] == ["192.0.2.0/25"] and n, 10)
    assert node["approvedRoutes"] == [] and node["subnetRoutes"] == []
    time.sleep(2)  # give a wrongly served route time to show up
    peer = peers_by_name(c.status_json())["router1"]
    assert "192.0.2.0/25" not in (peer.get("PrimaryRoutes") or [])
    assert fetch(client, h1.ip) is None, "the LAN answered before the route was approved"

    approved = hsapi.approve_routes(srv, "router1", ["192.0.2.0/25"])
    assert approved["approvedRoutes"] == ["192.0.2.0/25"]
    wait_for("the client to learn router1's primary route",
             lambda: "192.0.2.0/25" in (peers_by_name(c.status_json())["router1"]
                                       .get("PrimaryRoutes") or []), 10)
    seen = wait_for("an HTTP answer from the LAN host", lambda: fetch(client, h1.ip), 20)
    assert seen == r1.lan.gateway  # source-NATed by the router onto its LAN
    assert hsapi.node_by_name(srv, "router1")["subnetRoutes"] == ["192.0.2.0/25"]  # type: ignore[index]

    # A fresh router whose prefix autoApprovers covers: served with no admin action.
    r2 = topo.add_nat("r2", "192.0.2.128/25")
    h2 = topo.add_lan_host(r2, "h2")
    lab.web(h2)
    lab.join(r2, "router2", args=("--advertise-routes=192.0.2.128/25",))
    wait_for("router2's route to be auto-approved",
             lambda: hsapi.node_by_name(srv, "router2")["approvedRoutes"]  # type: ignore[index]
             == ["192.0.2.128/25"], 10)
    assert wait_for("an HTTP answer from the second LAN", lambda: fetch(client, h2.ip), 20) \
        == r2.lan.gateway

    # Taking the approval back withdraws the route again.
    hsapi.approve_routes(srv, "router1", [])
    wait_for("the client to lose router1's route",
             lambda: "192.0.2.0/25" not in (peers_by_name(c.status_json())["router1"]
                                           .get("PrimaryRoutes") or []), 10)
    wait_for("the first LAN to be unreachable again", lambda: fetch(client, h1.ip) is None, 15)


def test_ha_failover_within_20s_and_no_flap_back(lab: Lab) -> None:
    topo = lab.topology
    lab.start_server({"acls": POLICY["acls"],
                      "autoApprovers": {"routes": {"192.0.2.0/24": ["alice@"]}}})
    # Two routers on one LAN: r1 is the NAT router itself, r2 a LAN host that also routes.
    r1 = topo.add_nat("r1", "192.0.2.0/24")
    r2 = topo.add_lan_host(r1, "r2", "192.0.2.20")
    r2._sysctl("net.ipv4.ip_forward", "1")
    web = topo.add_lan_host(r1, "web", "192.0.2.10")
    lab.web(web)
    client = topo.add_host("client")
    c = lab.join(client, "client", args=("--accept-routes",))
    ts1 = lab.join(r1, "router1", args=("--advertise-routes=192.0.2.0/24",))
    lab.join(r2, "router2", OLDEST, args=("--advertise-routes=192.0.2.0/24",))

    def primary_of() -> str | None:
        for name, p in peers_by_name(c.status_json()).items():
            if "192.0.2.0/24" in (p.get("PrimaryRoutes") or []):
                return name
        return None

    wait_for("router1 (first to register) to be primary", lambda: primary_of() == "router1", 15)
    assert wait_for("traffic through router1", lambda: fetch(client, web.ip), 20) == r1.lan.gateway

    ts1.stop()
    stopped = time.monotonic()
    wait_for("traffic to move to router2",
             lambda: fetch(client, web.ip, timeout=2) == r2.ip, 20)
    assert time.monotonic() - stopped < 20
    assert primary_of() == "router2"

    ts1.start()
    wait_for("router1 to be back online",
             lambda: peers_by_name(c.status_json()).get("router1", {}).get("Online") is True, 30)
    end = time.monotonic() + 8
    while time.monotonic() < end:  # router1 is back but router2 keeps the prefix
        assert primary_of() == "router2"
        assert fetch(client, web.ip) == r2.ip
        time.sleep(1)


def test_ha_probe_fails_over_from_a_router_that_stops_answering(lab: Lab) -> None:
    """The primary keeps its control session but cannot answer PingRequests (new TCP
    connections to the server dropped): the prober marks it unhealthy and fails over."""
    topo = lab.topology
    lab.start_server({"acls": POLICY["acls"],
                      "autoApprovers": {"routes": {"192.0.2.0/24": ["alice@"]}}},
                     {"node": {"routes": {"ha": {"probe_interval": "3s", "probe_timeout": "2s"}}}})
    r1 = topo.add_nat("r1", "192.0.2.0/24")
    r2 = topo.add_lan_host(r1, "r2", "192.0.2.20")
    r2._sysctl("net.ipv4.ip_forward", "1")
    client = topo.add_host("client")
    c = lab.join(client, "client", args=("--accept-routes",))
    # The oldest client must answer PingRequests too, or it would lose the prefix below.
    lab.join(r1, "router1", OLDEST, args=("--advertise-routes=192.0.2.0/24",))
    lab.join(r2, "router2", args=("--advertise-routes=192.0.2.0/24",))

    def primary_of() -> str | None:
        for name, p in peers_by_name(c.status_json()).items():
            if "192.0.2.0/24" in (p.get("PrimaryRoutes") or []):
                return name
        return None

    wait_for("router1 to be primary", lambda: primary_of() == "router1", 15)
    time.sleep(10)  # three probe cycles: answered pings keep router1 primary
    assert primary_of() == "router1"
    # router1's existing control connection stays up; every new connection is dropped.
    r1.iptables("-I", "OUTPUT", "-o", "eth0", "-p", "tcp", "--syn", "-d", lab.server_host.ip,
                "-j", "DROP")
    wait_for("the prober to move the prefix to router2", lambda: primary_of() == "router2", 20)
    assert peers_by_name(c.status_json())["router1"]["Online"] is True


def test_exit_node_carries_internet_traffic(lab: Lab) -> None:
    topo = lab.topology
    srv = lab.start_server(POLICY)
    exit_host = topo.add_host("exit")
    exit_host._sysctl("net.ipv4.ip_forward", "1")
    www = topo.add_host("www", topo.public_segment())
    lab.web(www)
    client = topo.add_host("client")
    c = lab.join(client, "client", OLDEST)
    e = lab.join(exit_host, "exitnode", args=("--advertise-exit-node",))
    assert fetch(client, www.ip) == client.ip  # the direct path, before any exit node

    node = wait_for("the exit routes to be announced",
                    lambda: (n := hsapi.node_by_name(srv, "exitnode"))
                    and sorted(n["availableRoutes"]) == ["0.0.0.0/0", "::/0"] and n, 10)
    assert node["approvedRoutes"] == []
    approved = hsapi.approve_routes(srv, "exitnode", ["0.0.0.0/0"])
    assert sorted(approved["approvedRoutes"]) == ["0.0.0.0/0", "::/0"]  # approved together

    wait_for("the client to see an exit node offered",
             lambda: peers_by_name(c.status_json())["exitnode"].get("ExitNodeOption"), 10)
    allowed = peers_by_name(c.status_json())["exitnode"].get("AllowedIPs") or []
    assert "0.0.0.0/0" in allowed and "::/0" in allowed
    exit_ip = e.ip("4")[0]
    r = c.cli("set", f"--exit-node={exit_ip}")
    assert r.returncode == 0, r.stderr
    assert wait_for("traffic to leave through the exit node",
                    lambda: fetch(client, www.ip), 20) == exit_host.ip

    # Only through it: with the exit node gone the internet is out of reach.
    e.stop()
    wait_for("the internet to be unreachable without the exit node",
             lambda: fetch(client, www.ip) is None, 20)
