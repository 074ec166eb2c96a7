"""Straightforward (slow) definitions of a node's packet filter and peer set.

What policy/evaluate.py computes with indexes, computed here the direct way: the node's
unreduced rules (global rules plus its autogroup:self and via rules, merged) reduced to what
it serves, visibility by checking every node pair against every rule (PolicyManager's own
direct definitions, which it also uses for nodes outside its snapshot), and the routes a
peer offers a viewer by resolving every grant for that pair. Only the
equivalence tests use it (tests/unit/test_policy_perf_equivalence.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pyheadscale.policy import PolicyManager
from pyheadscale.policy.compile import Matcher, NodeInfo
from pyheadscale.policy.noderules import reduce_rules
from pyheadscale.state.model import IPNetwork, Node


def _info(pm: PolicyManager, node: Node) -> NodeInfo:
    return NodeInfo.of(node)


def unreduced_rules(pm: PolicyManager, info: NodeInfo) -> list[dict[str, Any]]:
    return pm._node_unreduced(info)


def packet_filter(pm: PolicyManager, node: Node) -> list[dict[str, Any]]:
    info = _info(pm, node)
    return reduce_rules(info, unreduced_rules(pm, info))


def _matchers(pm: PolicyManager, info: NodeInfo) -> list[Matcher]:
    return pm._node_matchers(info)


def visible(pm: PolicyManager, a: NodeInfo, b: NodeInfo) -> bool:
    return pm._visible(a, b, _matchers(pm, a))


def peers(pm: PolicyManager, node: Node, nodes: list[Node]) -> set[int]:
    a = _info(pm, node)
    return {o.id for o in nodes if o.id != node.id and visible(pm, a, _info(pm, o))}


def _serves(node: NodeInfo, m: Matcher) -> bool:
    """The node is a destination of the matcher: its address, a subnet route of it, or, for
    an exit node, the Internet."""
    return (m.dests.contains_any(node.ips)
            or any(m.dests.overlaps_prefix(r) for r in node.subnet_routes)
            or (node.is_exit and m.dests_internet))


def can_access_route(pm: PolicyManager, viewer: NodeInfo, route: IPNetwork) -> bool:
    """Headscale's CanAccessRoute over the viewer's own matchers, pair by pair."""
    for m in _matchers(pm, viewer):
        src = m.srcs.contains_any(viewer.ips) or any(
            m.srcs.overlaps_prefix(r) for r in viewer.subnet_routes)
        if src and m.dests.overlaps_prefix(route):
            return True
        if m.srcs.overlaps_prefix(route) and _serves(viewer, m):
            return True
    return False


def _ov(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version and a.overlaps(b)


def via_routes(pm: PolicyManager, viewer: NodeInfo, peer: NodeInfo
               ) -> tuple[list[IPNetwork], list[IPNetwork], list[IPNetwork]]:
    """Headscale's ViaRoutesForPeer, resolving every grant for this one pair:
    (include, exclude, use_primary)."""
    include: list[IPNetwork] = []
    exclude: list[IPNetwork] = []
    use_primary: list[IPNetwork] = []
    if pm.policy is None:
        return include, exclude, use_primary
    res = pm._res
    grants = pm.policy.all_grants()
    mine = [any((s := res.resolve(a)) is not None and s.contains_any(viewer.ips) for a in g.src)
            for g in grants]
    dsts = [[p for d in g.dst if d.text != "autogroup:internet"
             and (ips := res.resolve(d)) is not None for p in ips.prefixes()] for g in grants]
    for g, m, ds in zip(grants, mine, dsts, strict=True):
        if not g.via or not m:
            continue
        hits = [r for d in ds for r in peer.subnet_routes if _ov(d, r)]
        if any(d.text == "autogroup:internet" for d in g.dst) and peer.is_exit:
            hits += peer.exit_routes
        if hits:
            (include if any(t in peer.tags for t in g.via) else exclude).extend(hits)
    if not include and not exclude:
        return include, exclude, use_primary
    for g, m, ds in zip(grants, mine, dsts, strict=True):
        if not g.via or not m:
            continue
        for d in ds:
            for p in list(include):
                if not _ov(d, p):
                    continue
                ids = [n.id for n in res.nodes
                       if any(t in n.tags for t in g.via) and p in n.subnet_routes]
                if ids and min(ids) != peer.id:
                    include = [x for x in include if x != p]
                    if p not in exclude:
                        exclude.append(p)
    for g, m, ds in zip(grants, mine, dsts, strict=True):
        if g.via or not m:
            continue
        # Exit routes: only a grant to the Internet itself undoes via steering.
        if any(d.text == "autogroup:internet" or d.kind == "wildcard" for d in g.dst):
            exclude = [x for x in exclude if x.prefixlen != 0]
        for d in ds:
            use_primary += [p for p in include
                            if p.prefixlen != 0 and _ov(d, p) and p not in use_primary]
            exclude = [x for x in exclude if x.prefixlen == 0 or not _ov(d, x)]
    return include, exclude, use_primary


def routes_for_peer(pm: PolicyManager, viewer: Node, peer: Node,
                    primaries: Sequence[IPNetwork]) -> set[IPNetwork]:
    """Headscale's RoutesForPeer (with the hosted plane's exit-node serving rule)."""
    v, p = _info(pm, viewer), _info(pm, peer)
    if v.id == p.id:
        return set()
    include, exclude, use_primary = via_routes(pm, v, p)
    out = [r for r in [*primaries, *p.exit_routes]
           if r not in exclude and can_access_route(pm, v, r)]
    for r in include:
        if r not in out and (r in primaries or r not in use_primary):
            out.append(r)
    out += [r for r in primaries if r in v.subnet_routes]
    return set(out)
