"""Primary-route election (state/routes.py) against Headscale 0.29's documented rules."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from datetime import UTC, datetime

from pyheadscale.state.model import Node
from pyheadscale.state.routes import PrimaryRoutes, served_subnet_routes

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LAN = ipaddress.ip_network("10.0.0.0/24")
OTHER = ipaddress.ip_network("10.9.0.0/16")
EXIT4, EXIT6 = ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")


def router(i: int, *routes: ipaddress.IPv4Network | ipaddress.IPv6Network,
           approved: tuple[object, ...] | None = None, online: bool = True) -> Node:
    return Node(
        id=i, machine_key=bytes([i]) * 32, node_key=bytes([i + 50]) * 32, disco_key=None,
        hostname=f"r{i}", given_name=f"r{i}", user_id=1,
        ipv4=ipaddress.IPv4Address(f"100.64.0.{i}"), ipv6=None, register_method="authkey",
        created_at=T0, updated_at=T0, online=online,
        hostinfo={"RoutableIPs": [str(r) for r in routes]},
        approved_routes=tuple(routes) if approved is None else approved,  # type: ignore[arg-type]
    )


def test_served_needs_announced_and_approved_and_skips_exit_routes() -> None:
    n = router(1, LAN, OTHER, EXIT4, EXIT6, approved=(LAN, EXIT4, EXIT6))
    assert served_subnet_routes(n) == [LAN]
    assert served_subnet_routes(router(2, approved=(LAN,))) == []


def test_lowest_id_wins_then_failover_without_flapping_back() -> None:
    pr = PrimaryRoutes()
    r1, r2 = router(1, LAN), router(2, LAN)
    assert pr.compute([r2, r1]) == {1}
    assert pr.primary_for(LAN) == 1 and pr.routes_of(2) == ()
    assert pr.ha_nodes() == {LAN: [1, 2]}
    assert pr.compute([replace(r1, online=False), r2]) == {1, 2}
    assert pr.primary_for(LAN) == 2
    assert pr.compute([r1, r2]) == set()  # the old primary is back: no flap
    assert pr.primary_for(LAN) == 2


def test_offline_last_server_drops_prefix_and_returning_one_takes_it() -> None:
    pr = PrimaryRoutes()
    r1 = router(1, LAN)
    pr.compute([r1])
    assert pr.compute([replace(r1, online=False)]) == {1}
    assert pr.primary_for(LAN) is None and pr.by_node() == {}
    pr.compute([r1])
    assert pr.primary_for(LAN) == 1


def test_unhealthy_fails_over_and_recovery_keeps_new_primary() -> None:
    pr = PrimaryRoutes()
    nodes = [router(1, LAN), router(2, LAN)]
    pr.compute(nodes)
    assert pr.set_unhealthy(1, True)
    assert not pr.set_unhealthy(1, True)
    pr.compute(nodes)
    assert pr.primary_for(LAN) == 2
    pr.set_unhealthy(1, False)
    pr.compute(nodes)
    assert pr.primary_for(LAN) == 2


def test_all_unhealthy_keeps_current_primary() -> None:
    pr = PrimaryRoutes()
    nodes = [router(1, LAN), router(2, LAN)]
    pr.compute(nodes)
    pr.set_unhealthy(1, True)
    pr.compute(nodes)
    pr.set_unhealthy(2, True)
    pr.compute(nodes)
    assert pr.primary_for(LAN) == 2


def test_revoking_approval_drops_primary_and_exit_routes_are_never_elected() -> None:
    pr = PrimaryRoutes()
    pr.compute([router(1, LAN, EXIT4, EXIT6)])
    assert pr.by_node() == {1: (LAN,)}
    assert pr.compute([router(1, LAN, EXIT4, EXIT6, approved=(EXIT4, EXIT6))]) == {1}
    assert pr.by_node() == {}
    assert pr.primary_for(EXIT4) is None


def test_distinct_prefixes_have_their_own_primaries() -> None:
    pr = PrimaryRoutes()
    pr.compute([router(1, LAN), router(2, OTHER, LAN)])
    assert pr.by_node() == {1: (LAN,), 2: (OTHER,)}
    assert pr.ha_nodes() == {LAN: [1, 2]}


def test_node_by_node_update_elects_what_a_whole_recompute_elects() -> None:
    """update() re-examines only the nodes a change names; over random sequences of node
    changes it must keep electing exactly what compute() over the whole snapshot elects."""
    import random

    rng = random.Random(11)
    for _ in range(30):
        nodes: dict[int, Node] = {}
        inc, full = PrimaryRoutes(), PrimaryRoutes()
        for _ in range(40):
            nid = rng.randint(1, 8)
            if rng.random() < 0.15:
                nodes.pop(nid, None)
            else:
                routes = rng.sample([LAN, OTHER, EXIT4], rng.randint(0, 2))
                nodes[nid] = router(nid, *routes, online=rng.random() < 0.7)
            got = inc.update(nodes, [nid])
            assert got == full.compute(nodes.values())
            assert inc.primaries == full.primaries and inc.candidates == full.candidates
            if rng.random() < 0.2:  # a health verdict, then re-elect without node changes
                verdict = rng.random() < 0.5
                inc.set_unhealthy(nid, verdict)
                full.set_unhealthy(nid, verdict)
                assert inc.update(nodes, ()) == full.compute(nodes.values())


def test_all_unhealthy_without_the_current_primary_leaves_the_prefix_unserved() -> None:
    """The primary goes offline while every other server is marked unhealthy: no primary
    (peers are not pointed at a router the prober found unreachable) until one answers."""
    pr = PrimaryRoutes()
    r1, r2, r3 = router(1, LAN), router(2, LAN), router(3, LAN)
    pr.compute([r1, r2, r3])
    pr.set_health({2: False, 3: False})
    assert pr.compute([replace(r1, online=False), r2, r3]) == {1}
    assert pr.primary_for(LAN) is None
    pr.set_health({3: True})
    pr.compute([replace(r1, online=False), r2, r3])
    assert pr.primary_for(LAN) == 3


def test_verdicts_applied_together_keep_the_primary_when_all_recover() -> None:
    """Both routers unhealthy, r2 (primary) kept; both answer in one probe cycle: r2 stays.
    One verdict at a time would have handed the prefix to r1 in between."""
    pr = PrimaryRoutes()
    nodes = [router(1, LAN), router(2, LAN)]
    pr.compute(nodes)
    pr.set_health({1: False})
    pr.compute(nodes)
    pr.set_health({2: False})
    pr.compute(nodes)
    assert pr.primary_for(LAN) == 2 and pr.unhealthy == {1, 2}
    assert pr.set_health({1: True, 2: True})
    assert not pr.set_health({1: True, 2: True})
    assert pr.compute(nodes) == set()
    assert pr.primary_for(LAN) == 2
    # The other way round, for contrast: r1 alone recovering takes the prefix.
    pr.set_health({1: False, 2: False})
    pr.compute(nodes)
    pr.set_health({1: True})
    pr.compute(nodes)
    assert pr.primary_for(LAN) == 1


def test_a_kept_prefix_stays_with_its_unhealthy_primary_and_others_fail_over() -> None:
    """`keep` (a prefix whose cycle lacks a router's verdict) holds that prefix only: r3,
    the backup of both sites, is unhealthy for both, so the other site fails over."""
    pr = PrimaryRoutes()
    nodes = [router(1, LAN, OTHER), router(2, LAN), router(3, OTHER)]
    pr.compute(nodes)
    assert pr.primary_for(LAN) == 1 and pr.primary_for(OTHER) == 1
    pr.set_health({1: False})
    assert pr.compute(nodes, keep={LAN}) == {1, 3}
    assert pr.primary_for(LAN) == 1 and pr.primary_for(OTHER) == 3
    # Kept only while it still serves the prefix.
    assert pr.compute([replace(nodes[0], online=False), *nodes[1:]], keep={LAN}) == {1, 2}
    assert pr.primary_for(LAN) == 2
