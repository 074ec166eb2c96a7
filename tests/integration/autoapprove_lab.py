"""Headscale's TestAutoApproveMultiNetwork, case by case, with official clients.

Headscale's test is a table: an approver kind (a tag, a user, a group) x how the router logs
in (auth key, web login) x the policy mode (file, database) x whether the router announces
its network during `tailscale up` or with `tailscale set` afterwards. Each case:

1. the policy auto-approves the router's network (and a wider range, and exit nodes) for the
   kind's approver; a fresh router joins and announces the network: the server shows it
   announced, approved and served (1, 1, 1), the client is sent it (AllowedIPs and
   PrimaryRoutes of the router, nothing at any other peer), pings the router and reaches
   the network's web server through it (the web server sees the router's address: the
   first hop, where Headscale runs a traceroute);
2. the approver is taken out of the policy: what was approved stays approved and served;
3. an admin clears the approval: (1, 0, 0), no peer carries a route at the client;
4. the approver comes back: approved and served again, reached through the router;
5. another node of the approver announces a prefix inside the wider range: approved and sent;
6. it announces a prefix no approver covers instead: not approved, sent nowhere (the earlier
   approval stays on the node, unserved: (1, 1, 0));
7. a third node announces an exit node: both exit routes approved and sent.

The four test files (policy mode x login) each run the six cases of their mode and login on
one tailnet: the user's and the tag's other nodes are shared, every case brings its own
router, and puts the tailnet back as it found it.

Addresses: the router's network is the LAN 192.0.2.0/25 behind a NAT router (Headscale: the
Docker network of user1); the wider range and the prefix inside it are 203.0.113.0/24 and
203.0.113.128/25, the prefix no approver covers 192.0.2.128/25 (no segment here uses them).
"""

from __future__ import annotations

import itertools
import json
import signal
from typing import Any

from tests.integration import hsapi
from tests.integration.netns import Host, Router
from tests.integration.server import PyHeadscale
from tests.integration.tailscale import Tailscaled
from tests.integration.test_routes import PORT, fetch, routed_into_tailnet
from tests.integration.test_routes_more import _counts, _subnet_routes
from tests.integration.versions import MIDDLE, NEWEST, OLDEST
from tests.integration.world import World, interactive_up, peers_by_name, serve_echo, wait_for

LAN = "192.0.2.0/25"
WIDE = "203.0.113.0/24"  # Headscale's bigRoute, 10.42.0.0/16
INSIDE = "203.0.113.128/25"  # Headscale's subRoute, 10.42.7.0/24
UNCOVERED = "192.0.2.128/25"  # Headscale's notApprovedRoute, 192.168.0.0/24
EXITS = ["0.0.0.0/0", "::/0"]
TAG, GROUP, USER = "tag:approve", "group:approve", "user1@"
APPROVER = {"tag": TAG, "user": USER, "group": GROUP}
KINDS = list(APPROVER)
WAIT = 60  # Headscale's assertTimeout


def policy(kind: str, *, network: bool) -> dict[str, Any]:
    """Headscale's case policy: allow all; the kind's approver for the wide range and exit
    nodes, and for the router's network when `network`. The group and the tag are defined
    in every case (the tailnet keeps tagged nodes across cases)."""
    who = APPROVER[kind]
    routes = {WIDE: [who], **({LAN: [who]} if network else {})}
    return {"groups": {GROUP: [USER]}, "tagOwners": {TAG: [USER]},
            "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
            "autoApprovers": {"routes": routes, "exitNode": [who]}}


class AutoApproveLab(World):
    """One tailnet for the cases of one policy mode and one login method."""

    MODE = "file"  # or "database"
    WEB = False  # True: every node joins through a web login an admin registers

    def setup(self) -> None:
        topo = self.topology
        keys = {"user1": {"user": "user1", "reusable": True},
                "user2": {"user": "user2", "reusable": True},
                TAG: {"user": "user1", "reusable": True, "tags": [TAG]}}
        first = policy("user", network=True)
        if self.MODE == "file":
            self.start_server(None, keys, ["user1", "user2"], first)
            self._policy = json.dumps(first)
        else:
            self.start_server({"policy": {"mode": "database"}}, keys, ["user1", "user2"])
            self._policy = ""
            self.set_policy(first)
        self.gw: Router = topo.add_nat("gw", LAN)
        self.web = topo.add_lan_host(self.gw, "web", "192.0.2.10")
        serve_echo(self.web, "0.0.0.0", [PORT])
        assert wait_for("the web server", lambda: fetch(self.gw, self.web.ip), 10) \
            == self.gw.lan.gateway
        # Headscale's client is user2's first node; the others are the approver's second
        # (a prefix inside the wide range) and third node (an exit node), as a user's and
        # as tagged nodes.
        self.client = self.join("client", OLDEST, user="user2", args=("--accept-routes",))
        self.others = {"user": (self.join("sub-u", NEWEST), self.join("exit-u", MIDDLE)),
                       "tag": (self.join("sub-t", MIDDLE, tagged=True),
                               self.join("exit-t", NEWEST, tagged=True))}
        self._routers = itertools.count(1)

    # -- the server ----------------------------------------------------------------------

    def set_policy(self, pol: dict[str, Any]) -> None:
        """Headscale's SetPolicy: the file rewritten and SIGHUP (file mode), or `headscale
        policy set` (database mode); returns once the server runs it."""
        text = json.dumps(pol)
        if text == self._policy:
            return
        srv = self.srv
        if self.MODE == "file":
            before = srv.log_text().count("policy reloaded")
            (self.workdir / "policy.json").write_text(text)
            assert srv.proc is not None
            srv.proc.send_signal(signal.SIGHUP)
            wait_for("the server to reload the policy file",
                     lambda: srv.log_text().count("policy reloaded") > before, 20)
        else:
            path = self.workdir / "policy-db.json"
            path.write_text(text)
            r = srv.cli("policy", "set", "-f", str(path))
            assert r.returncode == 0, r.stdout + r.stderr
        self._policy = text

    @property
    def srv(self) -> PyHeadscale:
        assert self.server is not None
        return self.server

    def wait_counts(self, want: dict[str, tuple[int, int, int]], what: str) -> None:
        """Headscale's requireNodeRouteCount: (announced, approved, served) per node."""
        def got() -> dict[str, tuple[int, int, int]]:
            return {name: _counts(hsapi.node_by_name(self.srv, name) or {}) for name in want}
        wait_for(f"{what}: route counts {want}", lambda: got() == want, WAIT, 0.5)

    # -- the clients ---------------------------------------------------------------------

    def join(self, name: str, version: str, *, tagged: bool = False, user: str = "user1",
             args: tuple[str, ...] = (), host: Host | None = None) -> Tailscaled:
        """A node for `user` (tagged: for the tag, owned by user1), through an auth key or a
        web login the admin registers (Headscale's runHeadscaleRegister)."""
        ts = self.add_client(name, version, host)
        tags = (f"--advertise-tags={TAG}",) if tagged else ()
        if not self.WEB:
            r = ts.up(self.srv.url, authkey=self.keys[TAG if tagged else user],
                      hostname=name, extra_args=args, timeout=60)
            assert r.returncode == 0, f"{name} did not join: {r.stdout}{r.stderr}"
            return ts
        up, auth_id = interactive_up(ts, self.srv, *tags, *args)
        try:
            r = self.srv.cli("auth", "register", "--auth-id", auth_id, "--user", user)
            assert r.returncode == 0, r.stdout + r.stderr
            assert up.wait(timeout=60) == 0
        finally:
            if up.poll() is None:
                up.kill()
            up.wait()
        ts.wait_tun_address()
        return ts

    def client_routes(self) -> dict[str, tuple[list[str], list[str]]]:
        """Per peer of the client: (subnet routes in its AllowedIPs, its PrimaryRoutes)."""
        peers = peers_by_name(self.client.status_json())
        return {n: (_subnet_routes(p), sorted(p.get("PrimaryRoutes") or []))
                for n, p in peers.items()}

    def wait_client(self, want: dict[str, list[str]], what: str) -> None:
        """Headscale's requirePeerSubnetRoutes over every peer of the client: the peers in
        `want` carry exactly those routes (their subnet routes also as PrimaryRoutes), every
        other peer none."""
        def ok() -> bool:
            view = self.client_routes()
            if not set(want) <= set(view):
                return False
            for name, (routes, primary) in view.items():
                expect = sorted(want.get(name, []))
                subnets = [r for r in expect if r not in EXITS]
                if routes != expect or not set(subnets) <= set(primary):
                    return False
            return True
        wait_for(f"{what}: the client to be sent {want}", ok, WAIT, 0.5)

    def wait_through(self, host: Host, what: str) -> None:
        """The client reaches the web server on the router's network through `host` (the
        web server sees the router's address: tailscaled source-NATs what it routes)."""
        assert wait_for(what, lambda: fetch(self.client.host, self.web.ip), WAIT) == host.ip

    # -- one case ------------------------------------------------------------------------

    def case(self, kind: str, announce_during_up: bool) -> None:
        n = next(self._routers)
        name = f"rt{n}"
        self.set_policy(policy(kind, network=True))
        host = self.topology.add_lan_host(self.gw, name, f"192.0.2.{20 + n}")
        host._sysctl("net.ipv4.ip_forward", "1")
        version = (NEWEST, MIDDLE, OLDEST)[n % 3]
        args = (f"--advertise-routes={LAN}",) if announce_during_up else ()
        router = self.join(name, version, tagged=kind == "tag", args=args, host=host)
        try:
            self._steps(kind, name, router, host, announce_during_up)
        finally:
            self._reset(kind, name, router)

    def _steps(self, kind: str, name: str, router: Tailscaled, host: Host,
               announced: bool) -> None:
        srv = self.srv
        if not announced:
            r = router.cli("set", f"--advertise-routes={LAN}")
            assert r.returncode == 0, r.stderr
        self.wait_counts({name: (1, 1, 1)}, "the network auto-approved")
        self.wait_client({name: [LAN]}, "auto-approved")
        ip = router.ip("4")[0]
        wait_for("the client to ping the router", lambda: self.client.ping(
            ip, count=1, until_direct=False).returncode == 0, WAIT)
        self.wait_through(host, "the web server through the auto-approved router")

        self.set_policy(policy(kind, network=False))
        self.wait_counts({name: (1, 1, 1)}, "approval kept without the approver")
        self.wait_client({name: [LAN]}, "approval kept")
        self.wait_through(host, "the web server after the approver left the policy")

        hsapi.approve_routes(srv, name, [])
        self.wait_counts({name: (1, 0, 0)}, "the admin cleared the approval")
        self.wait_client({}, "approval cleared")
        wait_for("the client to drop its route to the network",
                 lambda: not routed_into_tailnet(self.client, self.web.ip), WAIT)

        self.set_policy(policy(kind, network=True))
        self.wait_counts({name: (1, 1, 1)}, "approved again by the policy")
        self.wait_client({name: [LAN]}, "approved again")
        self.wait_through(host, "the web server after the approver came back")

        sub, exit_node = self.others["tag" if kind == "tag" else "user"]
        sub_name, exit_name = sub.host.name, exit_node.host.name
        assert sub.cli("set", f"--advertise-routes={INSIDE}").returncode == 0
        self.wait_counts({name: (1, 1, 1), sub_name: (1, 1, 1)}, "a prefix in the wide range")
        self.wait_client({name: [LAN], sub_name: [INSIDE]}, "a prefix in the wide range")

        assert sub.cli("set", f"--advertise-routes={UNCOVERED}").returncode == 0
        self.wait_counts({name: (1, 1, 1), sub_name: (1, 1, 0), exit_name: (0, 0, 0)},
                         "a prefix no approver covers")
        self.wait_client({name: [LAN]}, "a prefix no approver covers")

        assert exit_node.cli("set", "--advertise-exit-node").returncode == 0
        self.wait_counts({name: (1, 1, 1), sub_name: (1, 1, 0), exit_name: (2, 2, 2)},
                         "an exit node")
        self.wait_client({name: [LAN], exit_name: EXITS}, "an exit node")

    def _reset(self, kind: str, name: str, router: Tailscaled) -> None:
        """Back to the tailnet the next case expects: the router gone, the shared nodes
        announcing and approved nothing."""
        srv = self.srv
        router.stop()
        r = srv.cli("nodes", "delete", "-i", hsapi.node_id(srv, name), "--force")
        assert r.returncode == 0, r.stdout + r.stderr
        sub, exit_node = self.others["tag" if kind == "tag" else "user"]
        assert sub.cli("set", "--advertise-routes=").returncode == 0
        assert exit_node.cli("set", "--advertise-exit-node=false").returncode == 0
        for ts in (sub, exit_node):
            hsapi.approve_routes(srv, ts.host.name, [])
        self.wait_counts({sub.host.name: (0, 0, 0), exit_node.host.name: (0, 0, 0)},
                         "the shared nodes reset")
        wait_for("the client to forget the router",
                 lambda: name not in self.client_routes(), WAIT)
        self.wait_client({}, "reset")

