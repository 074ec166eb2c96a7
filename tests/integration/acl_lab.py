"""A tailnet for policy scenarios, judged by official clients and shared by the tests of a file.

Every node serves HTTP on ports 80 and 22 on its tailnet IPv4 and IPv6 addresses; the answer
names the caller ("80 100.64.0.2"), so a probe proves who reached whom through WireGuard and
the receiver's packet filter.

Two helpers keep the checks honest without sleeping:

- **The witness.** A node of user `witness` that every policy set through `set_policy` lets
  reach everybody's ports 80 and 22. Before a probe is expected to fail, the witness reaches
  the same listener: the service is up and the receiver accepts allowed traffic, so the
  failure means the policy refused the caller. Peer lists (`peers`) leave the witness out.
- **The revision port.** The witness's rule also opens port 60000+N for the Nth policy set.
  `set_policy` returns once every node's packet filter (`tailscale debug netmap`) carries
  it: from then on every node enforces the new policy, and a refused probe is a refusal.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.integration import hsapi
from tests.integration.netns import Topology
from tests.integration.server import PyHeadscale, http_get_from
from tests.integration.tailscale import Tailscaled
from tests.integration.versions import NEWEST
from tests.integration.world import (
    Reach,
    World,
    peers_by_name,
    probe,
    serve_echo,
    wait_for,
)

WITNESS = "witness"
PORTS = (80, 22)
REV_PORT_BASE = 60000
ALLOW_ALL: dict[str, Any] = {"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}


def acl(src: list[str], dst: list[str], proto: str | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"action": "accept", "src": src, "dst": dst}
    if proto is not None:
        rule["proto"] = proto
    return rule


class AclLab(World):
    """Users with a reusable key each (key label = user name), the witness, and nodes."""

    def __init__(self, topology: Topology, workdir: Path,
                 tailscaled_factory: Callable[..., Tailscaled]) -> None:
        super().__init__(topology, workdir, tailscaled_factory)
        self.rev = 0
        self.policy: dict[str, Any] = {}

    # -- building -----------------------------------------------------------------------

    def boot(self, users: list[str], nodes: list[tuple[str, str, str]],
             keys: dict[str, dict[str, Any]] | None = None,
             policy: dict[str, Any] | None = None) -> PyHeadscale:
        """Start the server (database policy mode, `policy` or allow-all), then join `nodes`
        (name, key label, version) in order (so the first gets 100.64.0.1), then the witness."""
        all_keys = {u: {"user": u, "reusable": True} for u in [*users, WITNESS]}
        all_keys.update(keys or {})
        srv = self.start_server({"policy": {"mode": "database", "path": ""}},
                                keys=all_keys, users=[*users, WITNESS])
        self.set_policy(policy or ALLOW_ALL)
        for name, key, version in nodes:
            self.add_node(name, key, version)
        self.add_node(WITNESS, WITNESS, NEWEST)
        self.wait_rev()
        return srv

    def add_node(self, name: str, key: str, version: str) -> Tailscaled:
        ts = self.join(name, version, key)
        for ip in ts.ip():
            serve_echo(ts.host, ip, PORTS, "{port}")
        for ip in ts.ip():
            for port in PORTS:
                wait_for(f"{name}'s server on [{ip}]:{port}",
                         lambda ip=ip, port=port: _get(ts, ip, port, 1) is not None, 15)
        return ts

    def remove_node(self, name: str) -> None:
        """Delete the node on the server, then stop its daemon."""
        assert self.server is not None
        r = self.server.cli("nodes", "delete", "-i", self.node_id(name), "--force")
        assert r.returncode == 0, r.stdout + r.stderr
        self.nodes.pop(name).close()

    # -- the policy ---------------------------------------------------------------------

    def with_witness(self, policy: dict[str, Any], rev: int) -> dict[str, Any]:
        out = copy.deepcopy(policy)
        ports = ",".join(str(p) for p in (*PORTS, REV_PORT_BASE + rev))
        out.setdefault("acls", []).append(acl([f"{WITNESS}@"], [f"*:{ports}"]))
        return out

    def cli(self, *args: str) -> Any:
        assert self.server is not None
        return self.server.cli(*args)

    def policy_file(self, policy: dict[str, Any] | str) -> Path:
        path = self.workdir / f"policy-{self.rev + 1}.json"
        path.write_text(policy if isinstance(policy, str) else json.dumps(policy, indent=2))
        return path

    def set_policy(self, policy: dict[str, Any]) -> dict[str, Any]:
        """`headscale policy set` with the witness rule added; returns once every node
        enforces it. Returns the policy as sent."""
        sent = self.with_witness(policy, self.rev + 1)
        r = self.cli("policy", "set", "-f", str(self.policy_file(sent)))
        assert r.returncode == 0, f"policy set failed: {r.stdout}{r.stderr}"
        self.rev += 1
        self.policy = sent
        self.wait_rev()
        return sent

    def wait_rev(self, timeout: float = 60) -> None:
        port = REV_PORT_BASE + self.rev
        for name in self.nodes:
            wait_for(f"{name} to enforce policy revision {self.rev}",
                     lambda name=name: port in self.filter_ports(name), timeout)

    def packet_filter(self, name: str) -> list[dict[str, Any]]:
        r = self.nodes[name].cli("debug", "netmap", timeout=30)
        if r.returncode != 0:
            return []
        return list(json.loads(r.stdout).get("PacketFilter") or [])

    def filter_ports(self, name: str) -> set[int]:
        return {d["Ports"]["First"] for m in self.packet_filter(name)
                for d in m.get("Dsts") or [] if d["Ports"]["First"] == d["Ports"]["Last"]}

    def filter_allows(self, dst: str, src: str, port: int, family: str = "4") -> bool:
        """Whether `dst`'s own packet filter accepts TCP from `src` to `port`."""
        s = ipaddress.ip_address(self.addr(src, family))
        d = ipaddress.ip_address(self.addr(dst, family))
        for m in self.packet_filter(dst):
            if 6 not in (m.get("IPProto") or [6]):
                continue
            if not any(s in ipaddress.ip_network(p) for p in m.get("Srcs") or []):
                continue
            for t in m.get("Dsts") or []:
                if d in ipaddress.ip_network(t["Net"]) and \
                        t["Ports"]["First"] <= port <= t["Ports"]["Last"]:
                    return True
        return False

    # -- probes -------------------------------------------------------------------------

    def addr(self, name: str, family: str = "4") -> str:
        return self.nodes[name].ip(family)[0]

    def node_id(self, name: str) -> str:
        assert self.server is not None
        return hsapi.node_id(self.server, name)

    def reach(self, src: str, dst: str, port: int = 80, family: str = "4",
              timeout: float = 2) -> str | None:
        return _get(self.nodes[src], self.addr(dst, family), port, timeout)

    def expect_reach(self, src: str, dst: str, port: int = 80, family: str = "4",
                     timeout: float = 30) -> None:
        want = f"{port} {self.addr(src, family)}"
        got = wait_for(f"{src} to reach {dst}:{port} over IPv{family}",
                       lambda: self.reach(src, dst, port, family), timeout)
        assert got == want, f"{src} -> {dst}:{port}: answer {got!r}, expected {want!r}"

    def expect_denied(self, src: str, dst: str, port: int = 80, family: str = "4") -> None:
        """The witness reaches dst:port (the listener answers an allowed client), `src`
        does not."""
        self.expect_reach(WITNESS, dst, port, family)
        got = probe(self.nodes[src].host, self.addr(dst, family), port)
        # A policy refusal is silent: the receiver's filter drops the packet (or the sender
        # has no peer to send it to), never a reset from a listener that is up.
        assert got.reach in (Reach.DROPPED, Reach.UNREACHABLE), \
            f"{src} -> {dst}:{port} over IPv{family}: {got}"

    def peers(self, name: str) -> set[str]:
        return set(peers_by_name(self.nodes[name].status_json())) - {WITNESS}

    def wait_peers(self, name: str, want: set[str], timeout: float = 30) -> None:
        wait_for(f"{name} to list exactly {sorted(want)} as peers",
                 lambda: self.peers(name) == want, timeout)

    def wait_peer_count(self, name: str, count: int, timeout: float = 30) -> None:
        wait_for(f"{name} to list {count} peers",
                 lambda: len(self.peers(name)) == count, timeout)


def _get(ts: Tailscaled, ip: str, port: int, timeout: float) -> str | None:
    host = f"[{ip}]" if ":" in ip else ip
    status, body = http_get_from(ts.host, f"http://{host}:{port}/", timeout=timeout)
    return body.decode() if status == 200 else None
