"""HA subnet routers that both go away, three ways, judged by official clients and by the
server's own primary-route table (`/debug/routes` on the metrics listener):

* `tailscale down` (the control session closes cleanly: the server sees the node offline);
* a cable pull (`ip link set eth0 down` in the router's namespace: the long poll is left
  half-open, the server still counts the node online and only the HA prober notices);
* the router's namespace losing its default route (what a Docker network disconnect does to a
  container: the interface to the LAN stays, nothing leaves for the internet).

Topology: a NAT router `gw` owns the LAN 192.0.2.0/24 (it runs no tailscaled); the two
subnet routers are LAN hosts at .21 and .22 that forward, and the web server at .10 answers
with the address it sees, which is the subnet router that carried the request (tailscaled
source-NATs routed traffic onto the LAN). The client sits on the internet.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import pytest

from tests.integration import hsapi
from tests.integration.netns import Host
from tests.integration.server import http_get_from
from tests.integration.test_routes import Lab, fetch, primary_of
from tests.integration.versions import NEWEST, OLDEST
from tests.integration.world import peers_by_name, wait_for, world_fixture

pytestmark = pytest.mark.integration

LAN = "192.0.2.0/24"
METRICS = "http://127.0.0.1:9090"  # the harness's metrics listener, in the server's netns
# A fast prober: a router whose long poll is half-open is found out within a few seconds.
PROBER = {"node": {"routes": {"ha": {"probe_interval": "3s", "probe_timeout": "2s"}}}}
POLICY = {"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*", f"{LAN}:*"]}]}

lab = world_fixture(Lab)
_DEBUG_JSON = (
    "import sys, urllib.request\n"
    "req = urllib.request.Request(sys.argv[1], headers={'Accept': 'application/json'})\n"
    "print(urllib.request.urlopen(req, timeout=10).read().decode())\n")


class HA:
    """Two subnet routers for one LAN, approved by an admin, and a client using them."""

    def __init__(self, lab: Lab, versions: tuple[str, str, str] = (NEWEST, OLDEST, NEWEST),
                 ) -> None:
        topo = lab.topology
        self.lab = lab
        self.srv = lab.start_server(overrides=PROBER)
        gw = self.gw = topo.add_nat("gw", LAN)
        self.r1_host = topo.add_lan_host(gw, "r1", "192.0.2.21")
        self.r2_host = topo.add_lan_host(gw, "r2", "192.0.2.22")
        for h in (self.r1_host, self.r2_host):
            h._sysctl("net.ipv4.ip_forward", "1")
        self.web = topo.add_lan_host(gw, "web", "192.0.2.10")
        lab.web(self.web)
        assert wait_for("the web server", lambda: fetch(gw, self.web.ip), 10) == gw.lan.gateway
        client = topo.add_host("client")
        self.client = lab.join(client, "client", versions[2], args=("--accept-routes",))
        # router1 registers first: the lower node ID, so the first primary.
        self.r1 = lab.join(self.r1_host, "router1", versions[0],
                           args=(f"--advertise-routes={LAN}",))
        self.r2 = lab.join(self.r2_host, "router2", versions[1],
                           args=(f"--advertise-routes={LAN}",))
        for name in ("router1", "router2"):
            wait_for(f"{name}'s announcement",
                     lambda name=name: (hsapi.node_by_name(self.srv, name) or {})
                     .get("availableRoutes") == [LAN], 15)
            hsapi.approve_routes(self.srv, name, [LAN])
        self.id1 = int(hsapi.node_id(self.srv, "router1"))
        self.id2 = int(hsapi.node_id(self.srv, "router2"))
        assert self.id1 < self.id2

    def server_primaries(self) -> dict[str, int]:
        """The server's primary-route table: prefix -> node ID (`/debug/routes`, text form
        "prefix: id" per line)."""
        status, body = http_get_from(self.srv.host, METRICS + "/debug/routes", timeout=10)
        assert status == 200, body
        out: dict[str, int] = {}
        for line in body.decode().splitlines():
            prefix, _, nid = line.partition(": ")
            if nid:
                out[prefix] = int(nid)
        return out

    def unhealthy(self) -> list[int]:
        """The nodes the server's prober holds unhealthy (`/debug/routes`, JSON form)."""
        r = self.srv.host.run([sys.executable, "-c", _DEBUG_JSON, METRICS + "/debug/routes"],
                              timeout=20)
        assert r.returncode == 0, r.stderr
        return list(json.loads(r.stdout).get("unhealthy_nodes") or [])

    def answering(self, *ids: int) -> bool:
        """The routers `ids` are online at the server and none is held unhealthy (going
        offline clears the mark too, so the mark alone cannot tell a router that answers
        from one whose old session just closed)."""
        online = {int(n["id"]) for n in hsapi.nodes(self.srv) if n.get("online")}
        return set(ids) <= online and not set(ids) & set(self.unhealthy())

    def wait_primary(self, want: int | None, what: str, timeout: float = 30) -> None:
        expect = {LAN: want} if want is not None else {}
        wait_for(what, lambda: self.server_primaries() == expect, timeout)

    def reached_via(self) -> str | None:
        return fetch(self.client.host, self.web.ip, timeout=2)

    def wait_traffic_via(self, router: Host, what: str, timeout: float = 30) -> None:
        wait_for(what, lambda: self.reached_via() == router.ip, timeout)

    def client_sees_primary(self, name: str) -> bool:
        """The client shows `name` online and carrying the LAN as its primary route."""
        peer = peers_by_name(self.client.status_json()).get(name) or {}
        return bool(peer.get("Online")) and LAN in (peer.get("PrimaryRoutes") or [])

    def start(self) -> None:
        self.wait_primary(self.id1, "router1 (lower node ID) to be primary")
        wait_for("the client to be told router1 is primary",
                 lambda: primary_of(self.client, LAN) == "router1", 20)
        self.wait_traffic_via(self.r1_host, "traffic through router1")


def test_ha_both_routers_down_then_one_returns(lab: Lab) -> None:
    """Headscale's TestHASubnetRouterFailoverBothOffline: r1 down -> r2 primary; r2 down ->
    no primary at all; r2 up -> r2 primary again on the server and at the client (online,
    PrimaryRoutes), and traffic flows through r2."""
    ha = HA(lab)
    ha.start()
    assert ha.r1.down().returncode == 0
    ha.wait_primary(ha.id2, "router2 to take over after router1 went down")
    ha.wait_traffic_via(ha.r2_host, "traffic through router2")

    assert ha.r2.down().returncode == 0
    ha.wait_primary(None, "no primary while both routers are down")
    wait_for("the client to be told no router serves the LAN",
             lambda: primary_of(ha.client, LAN) is None, 20)
    assert ha.reached_via() is None

    r = ha.r2.cli("up", f"--login-server={ha.srv.url}", f"--advertise-routes={LAN}",
                  "--hostname=router2", "--accept-dns=false")
    assert r.returncode == 0, r.stderr
    ha.wait_primary(ha.id2, "router2 to be primary again once it is back")
    wait_for("the client to see router2 online and primary",
             lambda: ha.client_sees_primary("router2"), 30)
    ha.wait_traffic_via(ha.r2_host, "traffic through router2 after its return")
    assert not ha.client_sees_primary("router1")


def _cut(host: Host, how: str) -> Callable[[], None]:
    """Take `host` off the network (`link`: its cable; `route`: its default route); returns
    what puts it back."""
    if how == "link":
        host._ip("link", "set", "eth0", "down")

        def back() -> None:
            host._ip("link", "set", "eth0", "up")
            host._ip("route", "replace", "default", "via", host.segment.gateway)
        return back
    host._ip("route", "del", "default")
    return lambda: host._ip("route", "replace", "default", "via", host.segment.gateway)


def test_ha_cable_pull_of_both_routers(lab: Lab) -> None:
    """Headscale's TestHASubnetRouterFailoverBothOfflineCablePull: the cable of r1, then of
    r2 is pulled (their long polls stay half-open, so only the prober can tell); r2's cable
    goes back in while r1's stays out: r2 is primary on the server, online and primary at the
    client, and carries the traffic."""
    ha = HA(lab)
    ha.start()
    _cut(ha.r1_host, "link")
    ha.wait_primary(ha.id2, "the prober to move the LAN to router2 after router1's cable pull")
    ha.wait_traffic_via(ha.r2_host, "traffic through router2")

    replug_r2 = _cut(ha.r2_host, "link")
    wait_for("the LAN to be out of reach with both cables out",
             lambda: ha.reached_via() is None, 20)
    replug_r2()
    ha.wait_primary(ha.id2, "router2 to be primary after its cable is back", 60)
    wait_for("the client to see router2 online and primary",
             lambda: ha.client_sees_primary("router2"), 60)
    ha.wait_traffic_via(ha.r2_host, "traffic through router2 after the replug", 60)


def _stays(ha: HA, want: int, window: float, what: str) -> None:
    end = time.monotonic() + window
    while time.monotonic() < end:
        got = ha.server_primaries()
        assert got == {LAN: want}, f"{what}: primaries {got}"
        time.sleep(1)


def test_ha_routers_lose_their_route_in_phases(lab: Lab) -> None:
    """Headscale's TestHASubnetRouterFailoverDockerDisconnect, with a namespace losing its
    default route standing for a Docker network disconnect (the long poll is left half-open
    at the server): r1 alone out and back, r2 alone out and back, then both one after the
    other and both at once. The primary must never flap to an unreachable r1 while r2 is
    the primary and out too. Phase 5b in Headscale's order: r1 back first takes the
    prefix, r2's return does not take it back. Then both routers silent with their sessions
    up, and back within one probe cycle: r2, the primary going in, keeps the prefix."""
    ha = HA(lab)
    ha.start()  # phase 1: router1 primary, traffic flows

    back1 = _cut(ha.r1_host, "route")  # phase 2: r1 alone
    ha.wait_primary(ha.id2, "phase 2a: router2 promoted")
    ha.wait_traffic_via(ha.r2_host, "phase 2a: traffic through router2")
    back1()
    wait_for("phase 2b: traffic still flows", lambda: ha.reached_via() is not None, 30)
    wait_for("phase 2b: router1 answers again", lambda: ha.answering(ha.id1, ha.id2), 60)

    back2 = _cut(ha.r2_host, "route")  # phase 3: r2 alone
    ha.wait_primary(ha.id1, "phase 3a: router1 promoted")
    ha.wait_traffic_via(ha.r1_host, "phase 3a: traffic through router1")
    back2()
    wait_for("phase 3b: traffic still flows", lambda: ha.reached_via() is not None, 30)
    wait_for("phase 3b: router2 answers again", lambda: ha.answering(ha.id1, ha.id2), 60)

    # Phase 4: both, one after the other; r1 first so r2 is primary when it goes too.
    back1 = _cut(ha.r1_host, "route")
    ha.wait_primary(ha.id2, "phase 4a: router2 promoted")
    back2 = _cut(ha.r2_host, "route")
    _stays(ha, ha.id2, 15, "phase 4b: no flap to the unreachable router1")
    back2()
    ha.wait_primary(ha.id2, "phase 4c: router2 primary after its return")
    ha.wait_traffic_via(ha.r2_host, "phase 4c: traffic through router2", 60)
    # Healthy again before router1 returns: otherwise router1 back first would take the
    # prefix from a still-unhealthy router2 (as phase 5b shows), and 4d asks for no flap.
    wait_for("phase 4c: router2 answers again", lambda: ha.answering(ha.id2), 60)
    ha.wait_primary(ha.id2, "phase 4c: router2 primary once it answers")
    back1()
    wait_for("phase 4d: traffic still flows", lambda: ha.reached_via() is not None, 30)
    wait_for("phase 4d: router1 answers again", lambda: ha.answering(ha.id1, ha.id2), 60)
    ha.wait_primary(ha.id2, "phase 4d: router2 stays primary once router1 is back")

    # Phase 5: both at once, r2 primary going in.
    back1, back2 = _cut(ha.r1_host, "route"), _cut(ha.r2_host, "route")
    _stays(ha, ha.id2, 15, "phase 5a: no flap to the unreachable router1")
    assert sorted(ha.unhealthy()) == [ha.id1, ha.id2]  # both silent, r2 kept all along
    # Both come back, router1 first, as in Headscale's test; router2 stays out until router1
    # answers again. Headscale's rules decide: router1, back (a new control session clears
    # Unhealthy, as Headscale's Connect does; or it answers a probe) while router2, the
    # primary, is still unhealthy, takes the prefix; router2's return does not take it back.
    # (Headscale's test reconnects both at once and asserts router2: by the same rules
    # that holds when both answer within one probe cycle on the sessions they had, whose
    # verdicts are elected together; phase 6 shows that case.)
    back1()
    wait_for("phase 5b: router1 answers again", lambda: ha.answering(ha.id1), 60)
    ha.wait_primary(ha.id1, "phase 5b: router1, back first, takes the prefix")
    back2()
    wait_for("phase 5b: both routers answer again", lambda: ha.answering(ha.id1, ha.id2), 60)
    _stays(ha, ha.id1, 9, "phase 5b: router1 keeps the prefix once router2 is back")
    wait_for("phase 5b: the client told router1 is primary",
             lambda: primary_of(ha.client, LAN) == "router1", 30)
    ha.wait_traffic_via(ha.r1_host, "phase 5b: traffic through router1", 60)

    # Phase 6 (both back within one probe cycle, their sessions kept): the routers
    # keep their control sessions but cannot answer the prober (new connections to the
    # server dropped at the LAN's gateway): r1 silent -> r2 primary; r2 silent too -> r2
    # kept; both answer again at the same moment -> their verdicts are elected together
    # and r2, primary going in, keeps the prefix.
    silence = _answers_blocked(ha, ha.r1_host.ip)
    ha.wait_primary(ha.id2, "phase 6: router2 primary once router1 is silent")
    both = _answers_blocked(ha, "192.0.2.20/30")  # r1 .21 and r2 .22: lifted as one
    silence()
    wait_for("phase 6: both routers silent",
             lambda: sorted(ha.unhealthy()) == [ha.id1, ha.id2], 30)
    _stays(ha, ha.id2, 6, "phase 6: no flap to the silent router1")
    both()
    wait_for("phase 6: both routers answer again", lambda: ha.unhealthy() == [], 30)
    _stays(ha, ha.id2, 9, "phase 6: router2 keeps the prefix after both are back")
    ha.wait_traffic_via(ha.r2_host, "phase 6: traffic through router2", 30)


def _answers_blocked(ha: HA, source: str) -> Callable[[], None]:
    """Drop new TCP connections from `source` (LAN addresses) to the server at the LAN's
    gateway: control sessions stay up, PingRequests arrive, the answers (a new HTTPS
    connection each) do not. Returns what lifts it."""
    rule = ("FORWARD", "-p", "tcp", "--syn", "-s", source, "-d", ha.srv.host.ip, "-j", "DROP")
    ha.gw.iptables("-I", *rule)
    return lambda: ha.gw.iptables("-D", *rule)
