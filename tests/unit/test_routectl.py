"""The route controller wired to a real Tailnet and ControlPlane: primaries in the map
context, auto-approval, HA probe verdicts, and the expiry watcher."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pyheadscale.control.dispatch import ControlPlane
from pyheadscale.control.expiry import ExpiryWatcher
from pyheadscale.control.routectl import held_prefixes
from pyheadscale.state.changes import ChangeKind, Field
from tests.unit._statefix import key, open_control

LAN = ipaddress.ip_network("10.1.0.0/24")
LAN2 = ipaddress.ip_network("10.2.0.0/24")
POLICY = ('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}], '
          '"autoApprovers": {"routes": {"10.1.0.0/16": ["alice@"]}, "exitNode": ["alice@"]}}')


@pytest.fixture
async def cp(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    cp = await open_control(tmp_path, node={"expiry": "0",
                                            "routes": {"ha": {"probe_interval": "0s"}}})
    tn = cp.tailnet
    cp.routes.start()
    try:
        yield cp
    finally:
        await cp.routes.stop()
        await tn.close()


async def router(cp: ControlPlane, i: int, *routes: str) -> int:
    tn = cp.tailnet
    user = tn.user_by_name("alice") or await tn.create_user("alice")
    _, full = await tn.create_preauth_key(user.id)
    n = await tn.register_with_authkey(key(i), key(100 + i), None,
                                       {"Hostname": f"r{i}", "RoutableIPs": list(routes)}, key=full)
    return n.id


async def online_routers(cp: ControlPlane, *indexes: int,
                         prefix: ipaddress.IPv4Network = LAN) -> list[int]:
    """Routers for `prefix` (approved), each with an open map session and online."""
    ids = []
    for i in indexes:
        nid = await router(cp, i, str(prefix))
        await cp.tailnet.approve_routes(nid, [str(prefix)])
        cp.tailnet.bus.subscribe(nid)  # an open map session
        await cp.tailnet.set_online(nid, True)
        ids.append(nid)
    return ids


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def answer(cp: ControlPlane, node_id: int, delay: float = 0.0) -> None:
    """Answer the PingRequest waiting for `node_id`'s stream (after `delay`)."""
    rc = cp.routes
    await asyncio.sleep(delay)
    for _ in range(40):
        await asyncio.sleep(0.005)
        msg = rc.outbox.take(node_id)
        if msg:
            ping_id = msg["PingRequest"]["URL"].rsplit("id=", 1)[1]
            assert rc.pings.complete(ping_id)
            return


async def test_primaries_follow_online_state_and_reach_the_map_context(
        cp: ControlPlane) -> None:
    tn = cp.tailnet
    r1, r2 = await router(cp, 1, str(LAN)), await router(cp, 2, str(LAN))
    await tn.approve_routes(r1, [str(LAN)])
    await tn.approve_routes(r2, [str(LAN)])
    assert cp.mapctx.routes_of(r1) == ()  # approved and announced, but nobody is online
    sub = tn.bus.subscribe(999)
    gen = cp.mapctx.generation
    await tn.set_online(r2, True)
    await tn.set_online(r1, True)
    assert cp.mapctx.routes_of(r2) == (LAN,) and cp.mapctx.routes_of(r1) == ()
    assert cp.mapctx.generation > gen
    batch = await sub.__anext__()
    assert any(c.kind is ChangeKind.NODE_CHANGED and c.node_id == r2
               and Field.PRIMARY_ROUTES in c.fields for c in batch)
    await tn.set_online(r2, False)
    assert cp.mapctx.routes_of(r1) == (LAN,)
    await tn.set_online(r2, True)
    assert cp.mapctx.routes_of(r1) == (LAN,) and cp.mapctx.routes_of(r2) == ()
    await tn.approve_routes(r1, [])
    assert cp.mapctx.routes_of(r2) == (LAN,)


async def test_policy_auto_approves_announced_routes_and_exit_pairs(cp: ControlPlane) -> None:
    tn = cp.tailnet
    nid = await router(cp, 1, "10.1.2.0/24", "192.168.0.0/24", "0.0.0.0/0", "::/0")
    await settle()
    assert tn.nodes[nid].approved_routes == ()  # no policy yet
    await cp.policy.set(POLICY)
    for _ in range(50):
        await asyncio.sleep(0.01)
        if tn.nodes[nid].approved_routes:
            break
    assert {str(r) for r in tn.nodes[nid].approved_routes} == {"10.1.2.0/24", "0.0.0.0/0",
                                                                 "::/0"}
    # Announced later: approved on announcement.
    await tn.update_from_map_request(nid, hostinfo={"Hostname": "r1", "RoutableIPs": [
        "10.1.2.0/24", "10.1.3.0/24", "0.0.0.0/0", "::/0"]})
    for _ in range(50):
        await asyncio.sleep(0.01)
        if len(tn.nodes[nid].approved_routes) == 4:
            break
    assert ipaddress.ip_network("10.1.3.0/24") in tn.nodes[nid].approved_routes


async def test_probe_verdicts_fail_over_and_answers_recover_without_flap(
        cp: ControlPlane) -> None:
    rc = cp.routes
    rc.probe_timeout = 0.05
    r1, r2 = await online_routers(cp, 1, 2)
    assert rc.primaries.ha_nodes() == {LAN: [r1, r2]}

    # First cycle: both answer. Second: r1 is silent on a session seen before -> unhealthy.
    await asyncio.gather(rc.probe_once(), answer(cp, r1), answer(cp, r2))
    assert cp.mapctx.routes_of(r1) == (LAN,)
    await asyncio.gather(rc.probe_once(), answer(cp, r2))
    assert cp.mapctx.routes_of(r2) == (LAN,) and cp.mapctx.routes_of(r1) == ()
    await asyncio.gather(rc.probe_once(), answer(cp, r1), answer(cp, r2))
    assert r1 not in rc.primaries.unhealthy
    assert cp.mapctx.routes_of(r2) == (LAN,)  # recovered, but no flap back


async def test_fresh_session_gets_a_cycle_before_a_silent_probe_counts(
        cp: ControlPlane) -> None:
    rc = cp.routes
    rc.probe_timeout = 0.05
    r1, r2 = await online_routers(cp, 1, 2)
    await rc.probe_once()  # nobody answers, but both sessions are new
    assert rc.primaries.unhealthy == set()
    assert rc.outbox.take(r1) is not None  # the PingRequest waited for r1's stream


async def both_unhealthy_r2_primary(cp: ControlPlane) -> tuple[int, int]:
    """Two routers through the prober: r1 silent (r2 takes over), then both silent (r2 is
    kept: no flap onto an unreachable r1)."""
    rc = cp.routes
    rc.probe_timeout = 0.05
    r1, r2 = await online_routers(cp, 1, 2)
    await asyncio.gather(rc.probe_once(), answer(cp, r1), answer(cp, r2))
    await asyncio.gather(rc.probe_once(), answer(cp, r2))
    assert cp.mapctx.routes_of(r2) == (LAN,)
    await rc.probe_once()
    assert rc.primaries.unhealthy == {r1, r2}
    assert cp.mapctx.routes_of(r2) == (LAN,)
    return r1, r2


async def test_a_cycles_verdicts_elect_once_so_routers_back_together_keep_the_primary(
        cp: ControlPlane) -> None:
    """Both answer in one cycle, r1 first: one election over both verdicts keeps r2 (a
    verdict-by-verdict election would have moved the prefix to r1 in between)."""
    rc = cp.routes
    r1, r2 = await both_unhealthy_r2_primary(cp)
    rc.probe_timeout = 0.5
    await asyncio.gather(rc.probe_once(), answer(cp, r1), answer(cp, r2, delay=0.1))
    assert rc.primaries.unhealthy == set()
    assert cp.mapctx.routes_of(r2) == (LAN,) and cp.mapctx.routes_of(r1) == ()


async def test_a_silence_that_proves_nothing_keeps_its_prefixs_primary(
        cp: ControlPlane) -> None:
    """r2 (primary, all unhealthy) opens a new session and stays silent while r1 answers:
    r1's answer is recorded, but LAN stays with r2 (r2's verdict is missing this cycle)."""
    rc = cp.routes
    r1, r2 = await both_unhealthy_r2_primary(cp)

    async def reconnect_r2() -> None:
        await asyncio.sleep(0.01)
        cp.tailnet.bus.subscribe(r2)  # a new map session replaces the old one

    await asyncio.gather(rc.probe_once(), answer(cp, r1), reconnect_r2())
    assert rc.primaries.unhealthy == set()
    assert cp.mapctx.routes_of(r2) == (LAN,) and cp.mapctx.routes_of(r1) == ()


async def test_a_deferred_router_keeps_the_primary_its_verdict_could_have_kept(
        cp: ControlPlane) -> None:
    """r1 (primary) is silent on a session seen before while r2 reconnects mid-probe: had
    r2 been silent too, r1 would keep LAN (all unhealthy), so the cycle does not move it;
    r1's mark is recorded all the same."""
    rc = cp.routes
    rc.probe_timeout = 0.05
    r1, r2 = await online_routers(cp, 1, 2)
    await asyncio.gather(rc.probe_once(), answer(cp, r1), answer(cp, r2))

    async def reconnect_r2() -> None:
        await asyncio.sleep(0.01)
        cp.tailnet.bus.subscribe(r2)

    await asyncio.gather(rc.probe_once(), reconnect_r2())
    assert rc.primaries.unhealthy == {r1}
    assert cp.mapctx.routes_of(r1) == (LAN,) and cp.mapctx.routes_of(r2) == ()


def test_a_defer_holds_only_the_prefixes_its_router_serves() -> None:
    a, b, c = (ipaddress.ip_network(f"10.{i}.0.0/24") for i in (1, 2, 3))
    # Hub and spoke: 9 is the backup of every site.
    ha = {a: [1, 9], b: [2, 9], c: [3, 9]}
    assert held_prefixes(ha, {1: "defer", 2: "unhealthy", 3: "skip", 9: "healthy"}) == {a}
    assert held_prefixes(ha, {9: "defer", 1: "healthy"}) == {a, b, c}
    assert held_prefixes(ha, {1: "healthy", 2: "unhealthy", 9: "skip"}) == frozenset()


async def test_a_reconnecting_site_router_does_not_hold_off_failover_through_a_shared_backup(
        cp: ControlPlane) -> None:
    """Hub and spoke: rA serves LAN, rB serves LAN2, bk backs up both. rA reconnects during
    the cycle while rB, primary for LAN2, is silent on a session seen before: LAN2 fails
    over to bk in that cycle (bk's answer counts for both sites), LAN stays with rA."""
    rc = cp.routes
    rc.probe_timeout = 0.05
    tn = cp.tailnet
    (ra,) = await online_routers(cp, 1)
    (rb,) = await online_routers(cp, 2, prefix=LAN2)
    bk = await router(cp, 3, str(LAN), str(LAN2))
    await tn.approve_routes(bk, [str(LAN), str(LAN2)])
    tn.bus.subscribe(bk)
    await tn.set_online(bk, True)
    assert rc.primaries.ha_nodes() == {LAN: [ra, bk], LAN2: [rb, bk]}
    assert cp.mapctx.routes_of(ra) == (LAN,) and cp.mapctx.routes_of(rb) == (LAN2,)
    await asyncio.gather(rc.probe_once(), answer(cp, ra), answer(cp, rb), answer(cp, bk))

    async def reconnect_ra() -> None:
        await asyncio.sleep(0.01)
        tn.bus.subscribe(ra)

    await asyncio.gather(rc.probe_once(), reconnect_ra(), answer(cp, bk))
    assert rc.primaries.unhealthy == {rb}
    assert cp.mapctx.routes_of(bk) == (LAN2,) and cp.mapctx.routes_of(rb) == ()
    assert cp.mapctx.routes_of(ra) == (LAN,)


async def test_a_new_session_of_an_online_node_clears_its_unhealthy_mark(
        cp: ControlPlane) -> None:
    """Headscale's Connect: a node that opens a map session reached us, so it is healthy
    (also when it was online already, its old session half-open)."""
    rc = cp.routes
    r1, r2 = await both_unhealthy_r2_primary(cp)
    assert cp.tailnet.nodes[r1].online
    cp.tailnet.bus.subscribe(r1)
    assert rc.primaries.unhealthy == {r2}
    assert cp.mapctx.routes_of(r1) == (LAN,)  # the only healthy server now


async def test_going_offline_or_losing_routes_clears_the_unhealthy_mark(
        cp: ControlPlane) -> None:
    rc = cp.routes
    r1, r2 = await both_unhealthy_r2_primary(cp)
    await cp.tailnet.set_online(r1, False)
    assert r1 not in rc.primaries.unhealthy
    await cp.tailnet.approve_routes(r2, [])
    assert rc.primaries.unhealthy == set()
    assert cp.mapctx.routes_of(r2) == ()


async def test_announcing_no_approved_route_clears_the_unhealthy_mark(
        cp: ControlPlane) -> None:
    """The approval stays, but the router stops announcing the prefix: no candidate (what
    it announces and is approved is empty), so no health to keep."""
    rc = cp.routes
    r1, r2 = await both_unhealthy_r2_primary(cp)
    await cp.tailnet.update_from_map_request(r2, hostinfo={"Hostname": "r2", "RoutableIPs": []})
    assert cp.tailnet.nodes[r2].approved_routes == (LAN,)
    assert rc.primaries.unhealthy == {r1}
    # r2 was the primary; r1, the only server left, is unhealthy: nobody is pointed at it.
    # A lone server is not probed (Headscale probes prefixes with two servers or more), so
    # it is its next map session that makes it healthy and the primary.
    assert cp.mapctx.routes_of(r1) == () and cp.mapctx.routes_of(r2) == ()
    assert rc.primaries.ha_nodes() == {}
    cp.tailnet.bus.subscribe(r1)
    assert cp.mapctx.routes_of(r1) == (LAN,)


async def test_expiry_watcher_publishes_expiries_as_they_pass(cp: ControlPlane) -> None:
    tn = cp.tailnet
    nid = await router(cp, 1)
    soon = datetime.now(UTC) + timedelta(seconds=30)
    await tn.set_expiry(nid, soon)
    w = ExpiryWatcher(tn)
    w.last_check = soon - timedelta(seconds=10)
    sub = tn.bus.subscribe(999)
    assert w.check(soon - timedelta(seconds=1)) == []
    assert w.check(soon + timedelta(seconds=1)) == [nid]
    batch = await sub.__anext__()
    assert [(c.kind, c.node_id) for c in batch] == [(ChangeKind.NODE_KEY_EXPIRY, nid)]
    assert w.check(soon + timedelta(seconds=5)) == []  # reported once
