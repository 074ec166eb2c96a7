"""Who can reach whom under the running policy, computed from what clients enforce.

Each node's packet filter (what the mapper sends it) lists the sources it accepts, so
"a can reach b" holds when a rule of b's filter has one of a's addresses among its sources
and one of b's addresses among its destinations. Machines can be grouped by owner (a user,
or each tag of a tagged machine); the layout is a circle drawn as SVG on the server, so the
picture needs no script.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pyheadscale.mapper.context import Policy
from pyheadscale.policy.compile import Matcher
from pyheadscale.state.model import Node, User

MAX_NODES = 150  # beyond this the picture is unreadable; filters narrow it down


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    ports: str  # "all", or the destination ports as the filter has them


@dataclass(frozen=True)
class Vertex:
    key: str
    label: str
    kind: str  # "machine", "user" or "tag"
    x: float
    y: float


def _ports(rules: Iterable[Mapping[str, Any]]) -> str:
    ranges: set[tuple[int, int]] = set()
    for r in rules:
        for dp in r.get("DstPorts") or ():
            p = dp.get("Ports") or {}
            ranges.add((int(p.get("First", 0)), int(p.get("Last", 65535))))
    if not ranges or (0, 65535) in ranges:
        return "all"
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in sorted(ranges)[:8])


def machine_edges(policy: Policy, nodes: Sequence[Node]) -> list[tuple[Node, Node, str]]:
    out = []
    for b in nodes:
        rules = policy.packet_filter(b)
        matchers = [(Matcher.of(r), r) for r in rules]
        for a in nodes:
            if a.id == b.id:
                continue
            hits = [r for m, r in matchers
                    if m.srcs.contains_any(a.addresses) and m.dests.contains_any(b.addresses)]
            if hits:
                out.append((a, b, _ports(hits)))
    return out


def owners(n: Node, users: dict[int, User]) -> list[tuple[str, str, str]]:
    """(key, label, kind) of the groups a machine belongs to."""
    if n.is_tagged:
        return [(f"tag:{t}", t, "tag") for t in n.tags]
    u = users.get(n.user_id) if n.user_id is not None else None
    name = u.name if u is not None else f"user {n.user_id}"
    return [(f"user:{name}", name, "user")]


def circle(items: Sequence[tuple[str, str, str]], size: float) -> list[Vertex]:
    r = size / 2 - 90
    c = size / 2
    n = max(len(items), 1)
    return [Vertex(k, label, kind, round(c + r * math.cos(2 * math.pi * i / n - math.pi / 2), 1),
                   round(c + r * math.sin(2 * math.pi * i / n - math.pi / 2), 1))
            for i, (k, label, kind) in enumerate(items)]


VERTEX_R = 14  # the circle's radius in the SVG


@dataclass(frozen=True)
class Picture:
    vertices: list[Vertex]
    edges: list[Edge]
    size: int
    truncated: bool

    def segment(self, e: Edge) -> tuple[float, float, float, float]:
        """The edge's line, cut short at both circles so its arrowhead stays visible."""
        pos = {v.key: v for v in self.vertices}
        a, b = pos[e.src], pos[e.dst]
        dx, dy = b.x - a.x, b.y - a.y
        length = math.hypot(dx, dy) or 1.0
        cut = (VERTEX_R + 3) / length
        return (round(a.x + dx * cut, 1), round(a.y + dy * cut, 1),
                round(b.x - dx * cut, 1), round(b.y - dy * cut, 1))


def picture(policy: Policy, nodes: Sequence[Node], users: dict[int, User], *,
            group: bool) -> Picture:
    truncated = len(nodes) > MAX_NODES
    nodes = list(nodes)[:MAX_NODES]
    pairs = machine_edges(policy, nodes)
    if not group:
        items = [(f"node:{n.id}", n.given_name, "machine") for n in nodes]
        edges = {(f"node:{a.id}", f"node:{b.id}"): ports for a, b, ports in pairs}
    else:
        seen: dict[str, tuple[str, str, str]] = {}
        for n in nodes:
            for o in owners(n, users):
                seen.setdefault(o[0], o)
        items = sorted(seen.values())
        edges = {}
        for a, b, ports in pairs:
            for ka, _, _ in owners(a, users):
                for kb, _, _ in owners(b, users):
                    old = edges.get((ka, kb))
                    edges[(ka, kb)] = ports if old in (None, ports) else (
                        "all" if "all" in (old, ports) else "several")
    size = max(480, min(1200, 120 + 60 * len(items)))
    return Picture(circle(items, size), [Edge(s, d, p) for (s, d), p in sorted(edges.items())],
                   size, truncated)
