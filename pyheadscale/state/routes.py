"""Primary-route election for subnet routes (Headscale 0.29's NodeStore primaries).

A node serves a prefix when it announces it (Hostinfo.RoutableIPs), an admin or autoApprovers
approved it, and the node is online. When several nodes serve one prefix, exactly one is the
primary and only it carries the prefix in its AllowedIPs/PrimaryRoutes. Rules:

* the current primary keeps the prefix while it still serves it and is healthy (no flapping
  back when an older primary returns);
* otherwise the lowest node ID among healthy servers takes over;
* when every server is unhealthy, the current primary is kept if it still serves the prefix
  (no flap onto another router the prober has found unreachable too), else the prefix has
  no primary until a probe finds one that answers;
* a prefix the caller asks to `keep` stays with its current primary while that still serves
  it, healthy or not (the prober's cycle could not judge every router of the prefix);
* exit routes (0.0.0.0/0, ::/0) are never elected: every approved exit node offers them.

Pure: no clock, no I/O. The caller feeds node snapshots and health verdicts.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping

from pyheadscale.state.model import IPNetwork, Node

EXIT_ROUTES = frozenset({ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")})


def prefix_key(p: IPNetwork) -> tuple[int, int, int]:
    return (p.version, int(p.network_address), p.prefixlen)


def is_exit_route(p: IPNetwork) -> bool:
    return p in EXIT_ROUTES


def served_subnet_routes(node: Node) -> list[IPNetwork]:
    """Announced and approved non-exit prefixes of the node (online or not)."""
    approved = set(node.approved_routes)
    out: list[IPNetwork] = []
    for r in node.announced_routes:
        if r in approved and not is_exit_route(r) and r not in out:
            out.append(r)
    return out


def is_route_candidate(node: Node) -> bool:
    """Whether the node announces a route that is approved (exit routes count too): only
    such a node, online, is an HA candidate with a health to keep (Headscale's
    AllApprovedRoutes)."""
    approved = set(node.approved_routes)
    return any(r in approved for r in node.announced_routes)


class PrimaryRoutes:
    def __init__(self) -> None:
        self.primaries: dict[IPNetwork, int] = {}
        self.unhealthy: set[int] = set()
        # prefix -> online node IDs serving it (ascending), from the last election.
        self.candidates: dict[IPNetwork, list[int]] = {}
        # Online nodes serving at least one subnet route, with those routes: what an
        # election reads, kept up to date node by node (update) so that a change of one node
        # costs what the route-serving nodes cost, not what the whole tailnet costs.
        self._serving: dict[int, list[IPNetwork]] = {}

    def _note(self, node_id: int, node: Node | None) -> None:
        routes = served_subnet_routes(node) if node is not None and node.online else []
        if routes:
            self._serving[node_id] = routes
        else:
            self._serving.pop(node_id, None)

    def compute(self, nodes: Iterable[Node], keep: Collection[IPNetwork] = ()) -> set[int]:
        """Re-elect from a whole snapshot; returns the IDs of nodes whose primary set
        changed. A prefix in `keep` stays with its primary if that still serves it."""
        self._serving = {}
        for n in nodes:
            self._note(n.id, n)
        return self._elect(keep)

    def update(self, nodes: Mapping[int, Node], touched: Iterable[int],
               keep: Collection[IPNetwork] = ()) -> set[int]:
        """Re-elect after the nodes in `touched` changed (or were deleted); the others are
        taken as they were. Returns what compute() returns."""
        for nid in touched:
            self._note(nid, nodes.get(nid))
        return self._elect(keep)

    def _elect(self, keep: Collection[IPNetwork] = ()) -> set[int]:
        before = self.by_node()
        cands: dict[IPNetwork, list[int]] = {}
        for nid in sorted(self._serving):
            for r in self._serving[nid]:
                cands.setdefault(r, []).append(nid)
        new: dict[IPNetwork, int] = {}
        for prefix, ids in cands.items():
            prev = self.primaries.get(prefix)
            healthy = [i for i in ids if i not in self.unhealthy]
            if prev in ids and (prev not in self.unhealthy or prefix in keep):
                new[prefix] = prev
            elif healthy:
                new[prefix] = healthy[0]
            elif prev in ids:
                new[prefix] = prev  # all unhealthy: keep what peers already use
        self.primaries = new
        self.candidates = cands
        after = self.by_node()
        return {i for i in set(before) | set(after) if before.get(i) != after.get(i)}

    def adopt(self, primaries: Mapping[IPNetwork, int]) -> set[int]:
        """Take another instance's election as ours; returns the nodes whose primaries moved."""
        before = self.by_node()
        self.primaries = dict(primaries)
        after = self.by_node()
        return {i for i in set(before) | set(after) if before.get(i) != after.get(i)}

    def by_node(self) -> dict[int, tuple[IPNetwork, ...]]:
        out: dict[int, list[IPNetwork]] = {}
        for prefix, nid in self.primaries.items():
            out.setdefault(nid, []).append(prefix)
        return {nid: tuple(sorted(ps, key=prefix_key)) for nid, ps in out.items()}

    def routes_of(self, node_id: int) -> tuple[IPNetwork, ...]:
        return self.by_node().get(node_id, ())

    def primary_for(self, prefix: IPNetwork) -> int | None:
        return self.primaries.get(prefix)

    def ha_nodes(self) -> dict[IPNetwork, list[int]]:
        """Prefixes served by at least two online nodes, with those nodes (for probing)."""
        return {p: list(ids) for p, ids in self.candidates.items() if len(ids) >= 2}

    def set_unhealthy(self, node_id: int, unhealthy: bool) -> bool:
        """Record a health verdict; returns whether it changed (then call compute())."""
        return self.set_health({node_id: not unhealthy})

    def set_health(self, healthy: Mapping[int, bool]) -> bool:
        """Record several verdicts (node ID -> healthy) at once, so that the one election
        that follows sees them all: returns whether any changed."""
        changed = False
        for node_id, ok in healthy.items():
            if ok == (node_id not in self.unhealthy):
                continue
            changed = True
            if ok:
                self.unhealthy.discard(node_id)
            else:
                self.unhealthy.add(node_id)
        return changed

    def forget(self, node_id: int) -> None:
        self.unhealthy.discard(node_id)

    def snapshot(self) -> Mapping[int, tuple[IPNetwork, ...]]:
        return self.by_node()
