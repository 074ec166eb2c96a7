"""Route approval and exit nodes under an autogroup:internet-only policy, judged by official
clients.

Headscale's TestExitRoutesWithAutogroupInternetACL (its issue 3212): the only rule is
`user2@ -> autogroup:internet:*`. Two nodes of user2 advertise exit routes; once an admin
approves them, each must see the other as a peer offering an exit node (both default routes
in AllowedIPs), although no rule lets them reach each other's own addresses. Here the exit
node then also carries traffic to an internet host, which Headscale's test does not check.
"""

from __future__ import annotations

import pytest

from tests.integration import hsapi
from tests.integration.tailscale import Tailscaled
from tests.integration.test_routes import (
    PORT,
    Lab,
    announced_in_netmap,
    fetch,
    routed_into_tailnet,
)
from tests.integration.versions import NEWEST, OLDEST, PINNED
from tests.integration.world import Reach, peers_by_name, probe, wait_for, world_fixture

pytestmark = pytest.mark.integration

POLICY = {"acls": [{"action": "accept", "src": ["bob@"], "dst": ["autogroup:internet:*"]}]}
EXITS = ("0.0.0.0/0", "::/0")

lab = world_fixture(Lab)


def _counts(n: dict[str, object]) -> tuple[int, int, int]:
    """(announced, approved, serving) route counts of a node as `headscale nodes list`."""
    return tuple(len(n.get(k) or []) for k in  # type: ignore[return-value, arg-type]
                 ("availableRoutes", "approvedRoutes", "subnetRoutes"))


def test_exit_routes_with_autogroup_internet_acl(lab: Lab) -> None:
    topo = lab.topology
    srv = lab.start_server(POLICY)
    www = topo.add_host("www", topo.public_segment())
    lab.web(www)
    hosts = {name: topo.add_host(name) for name in ("exit1", "exit2")}
    for h in hosts.values():
        h._sysctl("net.ipv4.ip_forward", "1")
    nodes = {name: lab.join(h, name, version, "bob", ("--advertise-exit-node",))
             for (name, h), version in zip(hosts.items(), (NEWEST, OLDEST), strict=True)}

    wait_for("both exit announcements, nothing approved", lambda: all(
        _counts(hsapi.node_by_name(srv, n) or {}) == (2, 0, 0) for n in nodes), 20)
    # Nothing approved: the only rule names the internet, so neither node sees the other.
    for name, ts in nodes.items():
        assert peers_by_name(ts.status_json()) == {}, name

    for name in nodes:
        approved = hsapi.approve_routes(srv, name, list(EXITS))
        assert sorted(approved["approvedRoutes"]) == sorted(EXITS)
    wait_for("both nodes to serve their exit routes", lambda: all(
        _counts(hsapi.node_by_name(srv, n) or {}) == (2, 2, 2) for n in nodes), 20)

    for name, ts in nodes.items():
        other = next(n for n in nodes if n != name)

        def offers_exit(ts=ts, other=other) -> bool:
            peers = peers_by_name(ts.status_json())
            p = peers.get(other) or {}
            allowed = p.get("AllowedIPs") or []
            # Its two addresses and both default routes (Headscale's TestEnablingExitRoutes).
            return set(peers) == {other} and set(EXITS) <= set(allowed) \
                and len(allowed) == 4 and bool(p.get("ExitNodeOption"))
        wait_for(f"{name} to see {other} as its one peer, offering an exit node", offers_exit, 20)

    # The grant is real: exit1 sends the internet through exit2, www sees exit2's address.
    assert fetch(hosts["exit1"], www.ip) == hosts["exit1"].ip  # direct, before
    # A client cannot offer and use an exit node at once: exit1 stops offering first.
    r = nodes["exit1"].cli("set", "--advertise-exit-node=false",
                           f"--exit-node={nodes['exit2'].ip('4')[0]}")
    assert r.returncode == 0, r.stderr
    assert wait_for("exit1's web request to leave through exit2",
                    lambda: fetch(hosts["exit1"], www.ip), 20) == hosts["exit2"].ip
    # ... and still nothing between their own addresses: no rule names them. exit2's web
    # server answers on its tailnet address (asked from its own host), exit1 gets nothing.
    lab.web(hosts["exit2"])
    ip2 = nodes["exit2"].ip("4")[0]
    assert wait_for("exit2's own web server", lambda: fetch(hosts["exit2"], ip2), 10) == ip2
    got = probe(hosts["exit1"], ip2, PORT)
    assert got.reach in (Reach.DROPPED, Reach.UNREACHABLE), got


ROUTES = {"r1": "192.0.2.0/26", "r2": "192.0.2.64/26", "r3": "192.0.2.128/26"}


def _subnet_routes(peer: dict[str, object]) -> list[str]:
    """The subnet routes a peer carries as a client sees it: its AllowedIPs beyond its own
    addresses (Headscale's requirePeerSubnetRoutes)."""
    own = set(peer.get("TailscaleIPs") or [])  # type: ignore[arg-type]
    return sorted(p for p in peer.get("AllowedIPs") or []  # type: ignore[attr-defined]
                  if p.split("/")[0] not in own)


def test_enabling_routes(lab: Lab) -> None:
    """Headscale's TestEnablingRoutes: three nodes each announce a prefix with `tailscale
    set`; nothing reaches the clients until an admin approves; approved, every client sees
    each peer's prefix (AllowedIPs = two addresses + the prefix); approving a prefix a node
    does not announce serves nothing, and clearing an approval withdraws the route."""
    srv = lab.start_server({"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]})
    nodes = {n: lab.join(lab.topology.add_host(n), n, v, args=("--accept-routes",))
             for n, v in zip(ROUTES, PINNED, strict=True)}
    for n, ts in nodes.items():
        r = ts.cli("set", f"--advertise-routes={ROUTES[n]}")
        assert r.returncode == 0, r.stderr
    wait_for("every announcement at the server, nothing approved", lambda: all(
        (hsapi.node_by_name(srv, n) or {}).get("availableRoutes") == [ROUTES[n]]
        and _counts(hsapi.node_by_name(srv, n) or {}) == (1, 0, 0) for n in nodes), 20)
    for n, ts in nodes.items():  # the announcements reached the peers, the routes did not
        for other in set(nodes) - {n}:
            wait_for(f"{n} to get {other}'s announcement", lambda ts=ts, other=other:
                     announced_in_netmap(ts, other, ROUTES[other]), 20)
        for p in peers_by_name(ts.status_json()).values():
            assert not p.get("PrimaryRoutes") and _subnet_routes(p) == [], (n, p)

    for n in nodes:
        hsapi.approve_routes(srv, n, [ROUTES[n]])
    wait_for("every route served", lambda: all(
        _counts(hsapi.node_by_name(srv, n) or {}) == (1, 1, 1) for n in nodes), 20)

    def clients_see(want: dict[str, list[str]]) -> bool:
        for ts in nodes.values():
            for other, p in peers_by_name(ts.status_json()).items():
                if _subnet_routes(p) != want[other] or \
                        sorted(p.get("PrimaryRoutes") or []) != want[other]:
                    return False
                if len(p.get("AllowedIPs") or []) != 2 + len(want[other]):
                    return False
        return True

    wait_for("every client to see each peer's prefix",
             lambda: clients_see({n: [r] for n, r in ROUTES.items()}), 20)

    # r1 approved for a prefix it does not announce (r2's); r2's approval cleared.
    hsapi.approve_routes(srv, "r1", [ROUTES["r2"]])
    hsapi.approve_routes(srv, "r2", [])
    wait_for("the server to serve r3's prefix only", lambda: [
        _counts(hsapi.node_by_name(srv, n) or {}) for n in nodes] == [
        (1, 1, 0), (1, 0, 0), (1, 1, 1)], 20)
    wait_for("every client to see r3's prefix only",
             lambda: clients_see({"r1": [], "r2": [], "r3": [ROUTES["r3"]]}), 20)


ALL_PORTS = {"First": 0, "Last": 65535}
PROTOS = [6, 17, 1, 58]  # tcp, udp, icmp, ipv6-icmp: what a rule without "proto" allows


def _host_prefixes(ts: Tailscaled) -> list[str]:
    return [f"{ip}/{128 if ':' in ip else 32}" for ip in ts.ip()]


def _filter(ts: Tailscaled) -> list[dict[str, object]]:
    """The client's packet filter (`tailscale debug netmap`), lists sorted for comparison."""
    out = []
    for m in ts.netmap().get("PacketFilter") or []:
        out.append({"IPProto": sorted(m.get("IPProto") or []),
                    "Srcs": sorted(m.get("Srcs") or []),
                    "Dsts": sorted((d["Net"], d["Ports"]["First"], d["Ports"]["Last"])
                                   for d in m.get("Dsts") or []),
                    "Caps": m.get("Caps") or []})
    return out


def _match(srcs: list[str], dsts: list[str]) -> dict[str, object]:
    return {"IPProto": sorted(PROTOS), "Srcs": sorted(srcs),
            "Dsts": sorted((d, ALL_PORTS["First"], ALL_PORTS["Last"]) for d in dsts),
            "Caps": []}


def test_subnet_route_acl(lab: Lab) -> None:
    """Headscale's TestSubnetRouteACL: group:admins may reach group:admins and the LAN. The
    router's announcement is not served until approved; then the client sees the prefix on
    the router, its own packet filter lets both nodes reach it, and the router's single
    merged rule covers both nodes' addresses and the LAN. The client then reaches the LAN
    host through the router (not in Headscale's test)."""
    topo = lab.topology
    srv = lab.start_server({
        "groups": {"group:admins": ["alice@"]},
        "acls": [{"action": "accept", "src": ["group:admins"], "dst": ["group:admins:*"]},
                 {"action": "accept", "src": ["group:admins"], "dst": ["192.0.2.0/24:*"]}]})
    r1 = topo.add_nat("r1", "192.0.2.0/24")
    web = topo.add_lan_host(r1, "web", "192.0.2.10")
    lab.web(web)
    router = lab.join(r1, "router1", NEWEST, args=("--accept-routes",))
    client = lab.join(topo.add_host("client"), "client", OLDEST, args=("--accept-routes",))
    r = router.cli("set", "--advertise-routes=192.0.2.0/24")
    assert r.returncode == 0, r.stderr
    wait_for("the announcement, not approved", lambda: _counts(
        hsapi.node_by_name(srv, "router1") or {}) == (1, 0, 0), 20)
    assert _counts(hsapi.node_by_name(srv, "client") or {}) == (0, 0, 0)
    wait_for("the client to hold the announcement",
             lambda: announced_in_netmap(client, "router1", "192.0.2.0/24"), 20)
    peer = peers_by_name(client.status_json())["router1"]
    assert not peer.get("PrimaryRoutes") and _subnet_routes(peer) == []

    hsapi.approve_routes(srv, "router1", ["192.0.2.0/24"])
    wait_for("the route served", lambda: _counts(
        hsapi.node_by_name(srv, "router1") or {}) == (1, 1, 1), 20)
    wait_for("the client to see the prefix on the router", lambda: _subnet_routes(
        peers_by_name(client.status_json())["router1"]) == ["192.0.2.0/24"], 20)
    both = _host_prefixes(router) + _host_prefixes(client)
    wait_for("the client's packet filter", lambda: _filter(client) == [
        _match(both, _host_prefixes(client))], 20)
    wait_for("the router's packet filter (the two rules merged)", lambda: _filter(router) == [
        _match(both, [*_host_prefixes(router), "192.0.2.0/24"])], 20)
    assert wait_for("the client to reach the LAN host", lambda: fetch(client.host, web.ip),
                    20) == r1.lan.gateway


def test_subnet_route_acl_filtering(lab: Lab) -> None:
    """Headscale's TestSubnetRouteACLFiltering: the router announces three prefixes, all
    approved; the policy lets `node` (a host alias of its /32) use only the first, so the
    client is sent that one prefix at the router and reaches the web server through it;
    the other two are not routed into its tailnet at all."""
    topo = lab.topology
    lan, others = "192.0.2.0/26", ["192.0.2.64/26", "192.0.2.128/26"]
    # Sequential allocation: the router joins first (100.64.0.1), the client second.
    srv = lab.start_server({
        "hosts": {"router": "100.64.0.1/32", "node": "100.64.0.2/32"},
        "acls": [{"action": "accept", "src": ["*"], "dst": ["router:8000"]},
                 {"action": "accept", "src": ["node"], "dst": [f"{lan}:*"]}]})
    r1 = topo.add_nat("r1", "192.0.2.0/24")
    web = topo.add_lan_host(r1, "web", "192.0.2.10")
    lab.web(web)
    router = lab.join(r1, "router", NEWEST, args=("--accept-routes",))
    client = lab.join(topo.add_host("client"), "node", OLDEST, "bob", ("--accept-routes",))
    assert router.ip("4") == ["100.64.0.1"] and client.ip("4") == ["100.64.0.2"]
    r = router.cli("set", f"--advertise-routes={','.join([lan, *others])}")
    assert r.returncode == 0, r.stderr
    wait_for("three announcements", lambda: _counts(
        hsapi.node_by_name(srv, "router") or {}) == (3, 0, 0), 20)
    assert _counts(hsapi.node_by_name(srv, "node") or {}) == (0, 0, 0)
    hsapi.approve_routes(srv, "router", [lan, *others])
    wait_for("all three served", lambda: _counts(
        hsapi.node_by_name(srv, "router") or {}) == (3, 3, 3), 20)
    wait_for("the client to be sent the allowed prefix only", lambda: _subnet_routes(
        peers_by_name(client.status_json()).get("router") or {}) == [lan], 20)
    assert wait_for("the client to reach the web server through the router",
                    lambda: fetch(client.host, web.ip), 20) == r1.lan.gateway
    for inside in ("192.0.2.70", "192.0.2.140"):  # one address in each refused prefix
        assert not routed_into_tailnet(client, inside), inside
