"""Subnet routes, HA failover, exit nodes, per-viewer routes and via steering, judged by
official clients.

Routers run tailscaled in a NAT router's namespace: its eth0 is on the internet, its br LAN
carries a plain host with a tiny HTTP server that answers with the address it sees, so a test
can tell which router (source NAT) or exit node carried a request.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest

from tests.integration import hsapi
from tests.integration.netns import Namespace
from tests.integration.server import PyHeadscale
from tests.integration.tailscale import Tailscaled
from tests.integration.versions import NEWEST, OLDEST
from tests.integration.world import (
    Reach,
    World,
    metric,
    peers_by_name,
    probe,
    serve_echo,
    wait_for,
    world_fixture,
)

pytestmark = pytest.mark.integration

PORT = 8000
PROBES = "pyheadscale_ha_probes_answered_total"


class Lab(World):
    """Users alice and bob with a reusable key each; routers join from their own namespace."""

    def start_server(self, policy: dict[str, Any] | None = None,  # type: ignore[override]
                     overrides: dict[str, Any] | None = None,
                     tagged: tuple[str, ...] = ()) -> PyHeadscale:
        """`tagged`: tags that each get a reusable key of alice's (labelled by the tag)."""
        return super().start_server(overrides, {
            "alice": {"user": "alice", "reusable": True},
            "bob": {"user": "bob", "reusable": True},
            **{t: {"user": "alice", "reusable": True, "tags": [t]} for t in tagged},
        }, ["alice", "bob"], policy)

    def web(self, ns: Namespace) -> None:
        serve_echo(ns, "0.0.0.0", [PORT])

    def join(self, ns: Namespace, name: str, version: str = NEWEST,  # type: ignore[override]
             key: str = "alice", args: tuple[str, ...] = ()) -> Tailscaled:
        return super().join(name, version, key, args, host=ns)


lab = world_fixture(Lab)


def fetch(ns: Namespace, ip: str, timeout: float = 3) -> str | None:
    """The address the web server saw, or None when no answer came back (see `probe` for
    why; negative checks look at that)."""
    return probe(ns, ip, PORT, timeout).answer


def routed_into_tailnet(ts: Tailscaled, ip: str) -> bool:
    """Whether the client's kernel sends `ip` into its tailnet interface (a subnet or exit
    route the client installed from its map)."""
    out = ts.host.run(["ip", "-4", "route", "get", ip]).stdout
    return f" dev {ts.tun} " in f"{out} "


def no_route(ts: Tailscaled, ip: str) -> bool:
    """The client was given no route to `ip`: its kernel sends it out to the internet
    (which has no 192.0.2.0/24) and nothing answers. Judged by the route, not by the ICMP
    error, which the internet's router rate-limits."""
    return not routed_into_tailnet(ts, ip) and probe(ts.host, ip, PORT).answer is None


def announced_in_netmap(ts: Tailscaled, peer: str, prefix: str) -> dict[str, Any] | None:
    """The client's netmap entry of `peer` once it carries the announcement of `prefix`
    (the map update that followed the announcement reached the client), else None."""
    for p in ts.netmap().get("Peers") or ():
        hi = p.get("Hostinfo") or {}
        if hi.get("Hostname") == peer and prefix in (hi.get("RoutableIPs") or ()):
            return dict(p)
    return None


def primary_routes(ts: Tailscaled) -> dict[str, list[str]]:
    """Each peer's PrimaryRoutes as `ts` was told them."""
    peers = peers_by_name(ts.status_json())
    return {n: sorted(p.get("PrimaryRoutes") or []) for n, p in peers.items()}


def primary_of(ts: Tailscaled, prefix: str = "192.0.2.0/24") -> str | None:
    """The peer `ts` was told is the primary router of `prefix`, if any."""
    return next((n for n, routes in primary_routes(ts).items() if prefix in routes), None)


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

    # The web server answers on its LAN: the negative checks below are about the route.
    assert wait_for("h1's web server", lambda: fetch(r1, h1.ip), 10) == r1.lan.gateway
    node = wait_for("the server to see router1's announcement",
                    lambda: (n := hsapi.node_by_name(srv, "router1"))
                    and n["availableRoutes"] == ["192.0.2.0/25"] and n, 10)
    assert node["approvedRoutes"] == [] and node["subnetRoutes"] == []
    # The client holds the map update that followed the announcement: the route is not in it.
    entry = wait_for("the client to get router1's announcement",
                     lambda: announced_in_netmap(c, "router1", "192.0.2.0/25"), 15)
    assert "192.0.2.0/25" not in (entry.get("AllowedIPs") or []), entry
    assert "192.0.2.0/25" not in (entry.get("PrimaryRoutes") or []), entry
    peer = peers_by_name(c.status_json())["router1"]
    assert "192.0.2.0/25" not in (peer.get("PrimaryRoutes") or [])
    assert no_route(c, h1.ip), probe(client, h1.ip, PORT)

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
    assert no_route(c, h2.ip)  # before router2 exists
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
    wait_for("the first LAN to have no route again", lambda: no_route(c, h1.ip), 15)
    assert fetch(r1, h1.ip) == r1.lan.gateway  # its web server still answers on the LAN


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

    wait_for("router1 (first to register) to be primary", lambda: primary_of(c) == "router1", 15)
    assert wait_for("traffic through router1", lambda: fetch(client, web.ip), 20) == r1.lan.gateway

    ts1.stop()
    stopped = time.monotonic()
    wait_for("traffic to move to router2",
             lambda: fetch(client, web.ip, timeout=2) == r2.ip, 20)
    assert time.monotonic() - stopped < 20
    assert primary_of(c) == "router2"

    ts1.start()
    wait_for("router1 to be back online",
             lambda: peers_by_name(c.status_json()).get("router1", {}).get("Online") is True, 30)
    end = time.monotonic() + 8
    while time.monotonic() < end:  # router1 is back but router2 keeps the prefix
        assert primary_of(c) == "router2"
        assert fetch(client, web.ip) == r2.ip
        time.sleep(1)


def test_ha_probe_fails_over_from_a_router_that_stops_answering(lab: Lab) -> None:
    """The primary keeps its control session but cannot answer PingRequests (new TCP
    connections to the server dropped): the prober marks it unhealthy and fails over."""
    topo = lab.topology
    srv = lab.start_server({"acls": POLICY["acls"],
                            "autoApprovers": {"routes": {"192.0.2.0/24": ["alice@"]}}},
                           {"node": {"routes": {"ha": {"probe_interval": "3s",
                                                       "probe_timeout": "2s"}}}})
    r1 = topo.add_nat("r1", "192.0.2.0/24")
    r2 = topo.add_lan_host(r1, "r2", "192.0.2.20")
    r2._sysctl("net.ipv4.ip_forward", "1")
    client = topo.add_host("client")
    c = lab.join(client, "client", args=("--accept-routes",))
    # The oldest client must answer PingRequests too, or it would lose the prefix below.
    lab.join(r1, "router1", OLDEST, args=("--advertise-routes=192.0.2.0/24",))
    lab.join(r2, "router2", args=("--advertise-routes=192.0.2.0/24",))

    wait_for("router1 to be primary", lambda: primary_of(c) == "router1", 15)
    # Three probe cycles of both routers answered: the answers keep router1 primary.
    answered = metric(srv, PROBES)
    wait_for("six more answered probes", lambda: metric(srv, PROBES) >= answered + 6, 20)
    assert primary_of(c) == "router1"
    # router1's existing control connection stays up; every new connection is dropped.
    r1.iptables("-I", "OUTPUT", "-o", "eth0", "-p", "tcp", "--syn", "-d", lab.server_host.ip,
                "-j", "DROP")
    wait_for("the prober to move the prefix to router2", lambda: primary_of(c) == "router2", 20)
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

    # Only through it: with the exit node gone the internet is out of reach (the route into
    # the tunnel stays, so requests vanish there), while www still answers others.
    e.stop()
    wait_for("requests to vanish without the exit node",
             lambda: probe(client, www.ip, PORT, timeout=2).reach is Reach.DROPPED, 20)
    assert fetch(exit_host, www.ip) == exit_host.ip


LOWER, UPPER = "192.0.2.0/25", "192.0.2.128/25"
SPLIT = {
    "acls": [{"action": "accept", "src": ["alice@"], "dst": [f"{LOWER}:*"]},
             {"action": "accept", "src": ["bob@"], "dst": [f"{UPPER}:*"]}],
    "autoApprovers": {"routes": {"192.0.2.0/24": ["alice@"]}},
}


def test_each_viewer_is_sent_only_the_routes_it_may_use(lab: Lab) -> None:
    """One router serves two halves of its LAN; alice may use the lower, bob the upper. Each
    client is sent only its half, reaches it, and has no route at all to the other; a
    policy reload that widens bob's rights sends him the other half on his open stream."""
    topo = lab.topology
    srv = lab.start_server(SPLIT)
    r1 = topo.add_nat("r1", "192.0.2.0/24")
    low, high = topo.add_lan_host(r1, "low", "192.0.2.10"), topo.add_lan_host(r1, "high",
                                                                              "192.0.2.200")
    for h in (low, high):
        lab.web(h)
        assert wait_for(f"{h.name}'s web server", lambda h=h: fetch(r1, h.ip), 10) \
            == r1.lan.gateway
    alice = lab.join(topo.add_host("alice"), "alice", OLDEST, args=("--accept-routes",))
    bob = lab.join(topo.add_host("bob"), "bob", NEWEST, "bob", ("--accept-routes",))
    lab.join(r1, "router1", args=(f"--advertise-routes={LOWER},{UPPER}",))

    wait_for("alice to be sent the lower half only",
             lambda: primary_routes(alice).get("router1") == [LOWER], 20)
    wait_for("bob to be sent the upper half only",
             lambda: primary_routes(bob).get("router1") == [UPPER], 20)
    assert UPPER not in peers_by_name(alice.status_json())["router1"]["AllowedIPs"]
    assert LOWER not in peers_by_name(bob.status_json())["router1"]["AllowedIPs"]
    assert wait_for("alice -> low", lambda: fetch(alice.host, low.ip), 20) == r1.lan.gateway
    assert wait_for("bob -> high", lambda: fetch(bob.host, high.ip), 20) == r1.lan.gateway
    # The same listeners that just answered: no route from the client not allowed to use it.
    assert routed_into_tailnet(alice, low.ip) and routed_into_tailnet(bob, high.ip)
    assert no_route(alice, high.ip), probe(alice.host, high.ip, PORT)
    assert no_route(bob, low.ip), probe(bob.host, low.ip, PORT)

    # Widen bob's rights; the running streams get the router again with both halves.
    wider = {**SPLIT, "acls": [*SPLIT["acls"],
                               {"action": "accept", "src": ["bob@"], "dst": [f"{LOWER}:*"]}]}
    (lab.workdir / "policy.json").write_text(json.dumps(wider))
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGHUP)
    wait_for("bob to be sent both halves",
             lambda: primary_routes(bob).get("router1") == [LOWER, UPPER], 20)
    assert wait_for("bob -> low", lambda: fetch(bob.host, low.ip), 20) == r1.lan.gateway
    assert primary_routes(alice).get("router1") == [LOWER]
    assert no_route(alice, high.ip)


TAGS = ("tag:router-a", "tag:router-b", "tag:group-a", "tag:group-b")
VIA = {
    "tagOwners": {t: ["alice@"] for t in TAGS},
    "grants": [
        # Tags reach each other (peers), but no regular grant names the LAN: only the via
        # grants decide who is sent its route, and through which router.
        {"src": list(TAGS), "dst": list(TAGS), "ip": ["*"]},
        {"src": ["tag:group-a"], "dst": ["192.0.2.0/24"], "ip": ["*"], "via": ["tag:router-a"]},
        {"src": ["tag:group-b"], "dst": ["192.0.2.0/24"], "ip": ["*"], "via": ["tag:router-b"]},
    ],
    "autoApprovers": {"routes": {"192.0.2.0/24": ["tag:router-a", "tag:router-b"]}},
}


def test_via_grants_steer_each_group_through_its_router(lab: Lab) -> None:
    """Headscale's GrantViaSubnetSteering: two routers serve one LAN; group A is steered
    through router A, group B through router B (not the global primary), each client is
    sent the LAN route only at its router, and the web server sees which router carried
    the request."""
    topo = lab.topology
    srv = lab.start_server(VIA, tagged=TAGS)
    r1 = topo.add_nat("r1", "192.0.2.0/24")
    r2 = topo.add_lan_host(r1, "r2", "192.0.2.20")
    r2._sysctl("net.ipv4.ip_forward", "1")
    web = topo.add_lan_host(r1, "web", "192.0.2.10")
    lab.web(web)
    assert wait_for("the web server", lambda: fetch(r1, web.ip), 10) == r1.lan.gateway
    lan = "--advertise-routes=192.0.2.0/24"
    lab.join(r1, "router-a", key="tag:router-a", args=(lan,))
    lab.join(r2, "router-b", OLDEST, "tag:router-b", (lan,))
    ca = lab.join(topo.add_host("ca"), "client-a", OLDEST, "tag:group-a", ("--accept-routes",))
    cb = lab.join(topo.add_host("cb"), "client-b", key="tag:group-b", args=("--accept-routes",))
    wait_for("both routes to be auto-approved",
             lambda: all((hsapi.node_by_name(srv, r) or {}).get("approvedRoutes")
                         == ["192.0.2.0/24"] for r in ("router-a", "router-b")), 15)

    want_a = {"router-a": ["192.0.2.0/24"], "router-b": [], "client-b": []}
    want_b = {"router-a": [], "router-b": ["192.0.2.0/24"], "client-a": []}
    wait_for("client A to be steered to router A", lambda: primary_routes(ca) == want_a, 20)
    wait_for("client B to be steered to router B", lambda: primary_routes(cb) == want_b, 20)
    # Router A (registered first) is the global primary; B reaches the LAN through B anyway.
    assert wait_for("client A -> web", lambda: fetch(ca.host, web.ip), 20) == r1.lan.gateway
    assert wait_for("client B -> web", lambda: fetch(cb.host, web.ip), 20) == r2.ip
    for _ in range(3):  # every request, not just one: each client keeps its router
        assert fetch(ca.host, web.ip) == r1.lan.gateway and fetch(cb.host, web.ip) == r2.ip
