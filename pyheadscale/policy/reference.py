"""Straightforward (slow) definitions of a node's packet filter and peer set.

What policy/evaluate.py computes with indexes, computed here the direct way: the node's
unreduced rules (global rules plus its autogroup:self and via rules, merged) reduced to what
it serves, and visibility by checking every node pair against every rule. Only the
equivalence tests use it (tests/unit/test_policy_perf_equivalence.py).
"""

from __future__ import annotations

from typing import Any

from pyheadscale.policy import PolicyManager
from pyheadscale.policy.compile import (
    Matcher,
    NodeInfo,
    can_access,
    node_rules,
    reduce_rules,
)
from pyheadscale.state.model import Node


def _info(pm: PolicyManager, node: Node) -> NodeInfo:
    return NodeInfo.of(node)


def unreduced_rules(pm: PolicyManager, info: NodeInfo) -> list[dict[str, Any]]:
    if pm.policy is None or not pm._per_node:
        return pm._global
    return node_rules(pm._grants, info, pm._res)


def packet_filter(pm: PolicyManager, node: Node) -> list[dict[str, Any]]:
    info = _info(pm, node)
    return reduce_rules(info, unreduced_rules(pm, info))


def _matchers(pm: PolicyManager, info: NodeInfo) -> list[Matcher]:
    return [Matcher.of(r) for r in unreduced_rules(pm, info)]


def visible(pm: PolicyManager, a: NodeInfo, b: NodeInfo) -> bool:
    ma = _matchers(pm, a)
    if can_access(a, b, ma) or can_access(b, a, ma):
        return True
    for srcs, routers in pm._via_app:
        if (b.id in routers and srcs.contains_any(a.ips)) or (
            a.id in routers and srcs.contains_any(b.ips)
        ):
            return True
    mb = _matchers(pm, b)
    return can_access(a, b, mb) or can_access(b, a, mb)


def peers(pm: PolicyManager, node: Node, nodes: list[Node]) -> set[int]:
    a = _info(pm, node)
    return {o.id for o in nodes if o.id != node.id and visible(pm, a, _info(pm, o))}
