"""A long-lived PolicyManager kept current by update() against one built from scratch, for
the changes that move the evaluation index's reused parts (the matcher memo, the node masks,
the exit-node entries): route approvals granted and withdrawn, exit nodes appearing and
going, nodes added and removed. After every step every node's peers and packet filter must
be a fresh compile's."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import replace

import pytest

from pyheadscale.policy import PolicyError, PolicyManager
from pyheadscale.state.model import Node, User
from tests.unit.test_policy_perf_equivalence import (
    EXIT,
    ROUTES,
    make_policy,
    make_users,
    random_node,
)


def _nets(routes: list[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(r) for r in routes)


def _announced(n: Node) -> list[str]:
    return list((n.hostinfo or {}).get("RoutableIPs") or [])


def _change(rng: random.Random, nodes: list[Node], users: list[User],
            next_id: int) -> list[Node]:
    out = list(nodes)
    k = rng.randrange(5)
    if k == 0 or len(out) < 2:  # a node joins
        out.append(random_node(rng, next_id, users))
        return out
    i = rng.randrange(len(out))
    n = out[i]
    if k == 1:  # a node goes
        del out[i]
    elif k == 2:  # an approval granted or withdrawn among the routes it announces
        announced = _announced(n) or rng.sample(ROUTES, 2)
        approved = [r for r in announced if rng.random() < 0.5]
        out[i] = replace(n, hostinfo={**(n.hostinfo or {}), "RoutableIPs": announced},
                         approved_routes=_nets(approved))
    elif k == 3:  # it becomes an exit node, or stops being one
        plain = [r for r in _announced(n) if r not in EXIT]
        approved = [str(r) for r in n.approved_routes if str(r) not in EXIT]
        if not any(str(r) in EXIT for r in n.approved_routes):
            plain, approved = plain + EXIT, approved + EXIT
        out[i] = replace(n, hostinfo={**(n.hostinfo or {}), "RoutableIPs": plain},
                         approved_routes=_nets(approved))
    else:  # announced, not (yet) approved: an exit node waiting for its approval
        out[i] = replace(n, hostinfo={**(n.hostinfo or {}), "RoutableIPs": EXIT},
                         approved_routes=())
    return out


@pytest.mark.parametrize("block", range(4))
def test_route_exit_and_membership_changes_equal_a_fresh_compile(block: int) -> None:
    checked = 0
    for seed in range(block * 25, block * 25 + 25):
        rng = random.Random(7000 + seed)
        users = make_users(rng)
        nodes = [random_node(rng, i, users) for i in range(1, rng.randint(3, 10) + 1)]
        text = make_policy(rng, users)
        try:
            pm = PolicyManager(text, users, nodes, run_tests=False)
        except PolicyError:
            continue
        for n in nodes:
            pm.packet_filter(n)  # warm the caches the updates must keep right or drop
        next_id = len(nodes) + 1
        for step in range(8):
            nodes = _change(rng, nodes, users, next_id)
            next_id += 1
            pm.update(nodes=nodes)
            try:
                fresh = PolicyManager(text, users, nodes, run_tests=False)
            except PolicyError:
                break
            for v in nodes:
                label = f"seed {seed} step {step} node {v.id}"
                assert pm.peers(v) == fresh.peers(v), label
                assert pm.packet_filter(v) == fresh.packet_filter(v), label
            checked += 1
    assert checked >= 100, "the generator made too few valid policies"
