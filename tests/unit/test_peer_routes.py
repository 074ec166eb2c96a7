"""Per-viewer peer routes: only routes a viewer may use are sent to it, `via` grants steer a
prefix to a named router, entries are shared by viewers with the same view, and a stream
hears of a peer again when a policy change alters the routes it may use.

Expected values are written by hand from Headscale's RoutesForPeer / ViaRoutesForPeer rules
and the hosted plane's captures, not copied from this code's output.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from pyheadscale.mapper import MapContext, PeerCache, delta, full_map_and_peers, to_plain
from pyheadscale.policy import PolicyManager
from pyheadscale.state.changes import Change, ChangeKind
from pyheadscale.state.model import Node, User
from pyheadscale.state.routes import PrimaryRoutes
from tests.unit._statefix import key, make_node

NOW = datetime(2026, 8, 22, 16, 0, tzinfo=UTC)
USERS = [User(id=1, name="alice", email="alice@example.com"),
         User(id=2, name="bob", email="bob@example.com")]
TAGS = {t: ["alice@example.com"] for t in
        ("tag:router", "tag:ra", "tag:rb", "tag:ga", "tag:gb", "tag:v6only")}


def node(i: int, *, user: int | None = 1, tags: tuple[str, ...] = (),
         routes: tuple[str, ...] = (), approved: tuple[str, ...] | None = None) -> Node:
    return make_node(i, user=user, tags=tags, routes=routes,
                     approved=routes if approved is None else approved, machine_key=key(i),
                     node_key=key(0x40 + i), created_at=NOW, updated_at=NOW,
                     hostinfo={"RoutableIPs": list(routes)}, online=True, capver=113, version=1)


def context(policy: dict[str, Any], nodes: list[Node], generation: int = 1) -> MapContext:
    pm = PolicyManager(json.dumps({"tagOwners": TAGS, **policy}), USERS, nodes)
    primaries = PrimaryRoutes()
    primaries.compute(nodes)
    return MapContext(policy=pm, primary_routes=primaries.by_node(), generation=generation)


def peers_of(nodes: list[Node], viewer: Node, ctx: MapContext,
             cache: PeerCache | None = None) -> dict[int, dict[str, Any]]:
    resp, _ = full_map_and_peers(nodes, USERS, viewer, ctx, NOW, cache)
    return {p["ID"]: p for p in to_plain(resp).get("Peers") or ()}


def routes(entry: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(AllowedIPs without the node's own addresses, PrimaryRoutes)."""
    own = set(entry["Addresses"])
    return [a for a in entry["AllowedIPs"] if a not in own], entry.get("PrimaryRoutes", [])


# A router with two subnets; alice may use only the first, bob only the second.
ROUTER = node(1, tags=("tag:router",), routes=("10.1.0.0/16", "10.2.0.0/16"))
ALICE, BOB, ALICE2 = node(2, user=1), node(3, user=2), node(4, user=1)
SPLIT = {"acls": [
    {"action": "accept", "src": ["alice@example.com"], "dst": ["10.1.0.0/16:*"]},
    {"action": "accept", "src": ["bob@example.com"], "dst": ["10.2.0.0/16:*"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:*"]},
]}


def test_each_viewer_gets_only_the_routes_it_may_use() -> None:
    nodes = [ROUTER, ALICE, BOB, ALICE2]
    ctx = context(SPLIT, nodes)
    assert routes(peers_of(nodes, ALICE, ctx)[1]) == (["10.1.0.0/16"], ["10.1.0.0/16"])
    assert routes(peers_of(nodes, BOB, ctx)[1]) == (["10.2.0.0/16"], ["10.2.0.0/16"])
    # The router needs no route of its viewers, and viewers without routes offer none.
    assert routes(peers_of(nodes, ALICE, ctx)[3]) == ([], [])


def test_viewers_with_the_same_view_share_one_encoded_entry() -> None:
    nodes = [ROUTER, ALICE, BOB, ALICE2]
    ctx = context(SPLIT, nodes)
    cache = PeerCache()
    frags = {}
    for viewer in (ALICE, BOB, ALICE2):
        resp, _ = full_map_and_peers(nodes, USERS, viewer, ctx, NOW, cache)
        frags[viewer.id] = resp["Peers"][0]  # peers come sorted by ID: the router first
    assert frags[ALICE.id] is frags[ALICE2.id]  # same view: one encoding
    assert frags[ALICE.id] is not frags[BOB.id]
    # The router: 2 views; the three users' entries: one each (nobody routes through them).
    assert len(cache) == 2 + 3


def test_policy_change_resends_a_peer_whose_routes_changed_for_this_viewer() -> None:
    nodes = [ROUTER, ALICE, BOB, ALICE2]
    before = context(SPLIT, nodes, generation=1)
    _, known = full_map_and_peers(nodes, USERS, BOB, before, NOW)
    assert set(known) == {1, 2, 4}
    wider = {"acls": [*SPLIT["acls"], {"action": "accept", "src": ["bob@example.com"],
                                        "dst": ["10.1.0.0/16:22"]}]}
    after = context(wider, nodes, generation=2)
    resp, known2 = delta([Change(ChangeKind.POLICY)], nodes, USERS, BOB, after, NOW, known)
    assert resp is not None
    changed = {p["ID"]: p for p in to_plain(resp)["PeersChanged"]}
    assert set(changed) == {1}  # alice's devices look the same to bob: not resent
    assert routes(changed[1]) == (["10.1.0.0/16", "10.2.0.0/16"],
                                  ["10.1.0.0/16", "10.2.0.0/16"])
    assert known2[1].routes != known[1].routes
    # The same policy again: nothing to resend.
    resp, _ = delta([Change(ChangeKind.POLICY)], nodes, USERS, BOB, after, NOW, known2)
    assert resp is not None and "PeersChanged" not in resp


# Two routers for one LAN, two groups of clients, each steered to its own router.
RA = node(1, tags=("tag:ra",), routes=("10.9.0.0/24",))
RB = node(2, tags=("tag:rb",), routes=("10.9.0.0/24",))
CA, CB = node(3, tags=("tag:ga",)), node(4, tags=("tag:gb",))
MESH = {"src": ["tag:ra", "tag:rb", "tag:ga", "tag:gb"],
        "dst": ["tag:ra", "tag:rb", "tag:ga", "tag:gb"], "ip": ["*"]}
VIA = {"grants": [
    MESH,
    {"src": ["tag:ga"], "dst": ["10.9.0.0/24"], "ip": ["*"], "via": ["tag:ra"]},
    {"src": ["tag:gb"], "dst": ["10.9.0.0/24"], "ip": ["*"], "via": ["tag:rb"]},
]}


def test_via_grants_steer_one_prefix_to_a_different_router_per_viewer() -> None:
    nodes = [RA, RB, CA, CB]
    ctx = context(VIA, nodes)
    assert ctx.routes_of(RA.id) == (ipaddress.ip_network("10.9.0.0/24"),)  # global primary
    a, b = peers_of(nodes, CA, ctx), peers_of(nodes, CB, ctx)
    assert routes(a[RA.id]) == (["10.9.0.0/24"], ["10.9.0.0/24"])
    assert routes(a[RB.id]) == ([], [])
    # Client B is steered to router B although router A is the global primary.
    assert routes(b[RA.id]) == ([], [])
    assert routes(b[RB.id]) == (["10.9.0.0/24"], ["10.9.0.0/24"])
    # Each router sees the other's primary for the prefix it serves too (co-router view).
    assert routes(peers_of(nodes, RB, ctx)[RA.id]) == (["10.9.0.0/24"], ["10.9.0.0/24"])


def test_a_regular_grant_for_the_prefix_defers_to_the_global_primary() -> None:
    nodes = [RA, RB, CA, CB]
    pol = {"grants": [*VIA["grants"],
                      {"src": ["tag:gb"], "dst": ["10.9.0.0/24"], "ip": ["tcp:443"]}]}
    b = peers_of(nodes, CB, context(pol, nodes))
    assert routes(b[RA.id]) == (["10.9.0.0/24"], ["10.9.0.0/24"])
    assert routes(b[RB.id]) == ([], [])


def test_via_routers_sharing_a_tag_elect_the_lowest_id() -> None:
    ra2 = node(5, tags=("tag:ra",), routes=("10.9.0.0/24",))
    nodes = [RA, RB, CA, CB, ra2]
    a = peers_of(nodes, CA, context(VIA, nodes))
    assert routes(a[RA.id])[0] == ["10.9.0.0/24"]
    assert routes(a[ra2.id])[0] == []


def test_via_internet_offers_only_the_named_exit_node() -> None:
    ex1 = node(1, tags=("tag:ra",), routes=("0.0.0.0/0", "::/0"))
    ex2 = node(2, tags=("tag:rb",), routes=("0.0.0.0/0", "::/0"))
    nodes = [ex1, ex2, CA]
    pol = {"grants": [{"src": ["tag:ga"], "dst": ["autogroup:internet"], "ip": ["*"],
                       "via": ["tag:ra"]}]}
    a = peers_of(nodes, CA, context(pol, nodes))
    assert routes(a[ex1.id]) == (["0.0.0.0/0", "::/0"], [])  # exit routes are not primary
    assert a[ex1.id]["CapMap"] == {"suggest-exit-node": None}
    assert ex2.id not in a
    # A regular grant to the other exit node makes it a peer, yet it offers no exit route:
    # the via grant steers this viewer's Internet to tag:ra.
    pol["grants"].append({"src": ["tag:ga"], "dst": ["tag:rb"], "ip": ["tcp:22"]})
    a = peers_of(nodes, CA, context(pol, nodes))
    assert routes(a[ex2.id]) == ([], [])


def test_a_standby_router_holds_its_route_itself_but_is_not_primary() -> None:
    r1 = node(5, tags=("tag:router",), routes=("10.1.0.0/16",))
    r2 = node(6, tags=("tag:router",), routes=("10.1.0.0/16",))
    nodes = [r1, r2, ALICE]
    ctx = context(SPLIT, nodes)
    own = to_plain(full_map_and_peers(nodes, USERS, r2, ctx, NOW)[0])["Node"]
    assert "10.1.0.0/16" in own["AllowedIPs"] and "PrimaryRoutes" not in own
    alice = peers_of(nodes, ALICE, ctx)
    assert routes(alice[r1.id]) == (["10.1.0.0/16"], ["10.1.0.0/16"])
    assert routes(alice[r2.id]) == ([], [])
    # r1 goes offline: r2 takes over and alice's view of both follows.
    off = [replace(r1, online=False), r2, ALICE]
    alice = peers_of(off, ALICE, context(SPLIT, off))
    assert routes(alice[r1.id]) == ([], []) and routes(alice[r2.id])[1] == ["10.1.0.0/16"]


def test_disable_ipv4_hides_ipv4_on_both_sides() -> None:
    v6 = node(5, tags=("tag:v6only",))
    nodes = [ALICE, BOB, v6]
    pol = {"nodeAttrs": [{"target": ["tag:v6only"], "attr": ["disable-ipv4"]}]}
    ctx = context(pol, nodes)
    own, _ = full_map_and_peers(nodes, USERS, v6, ctx, NOW)
    got = to_plain(own)
    assert got["Node"]["Addresses"] == ["fd7a:115c:a1e0::5/128"]
    assert {p["ID"]: p["Addresses"] for p in got["Peers"]} == {
        2: ["fd7a:115c:a1e0::2/128"], 3: ["fd7a:115c:a1e0::3/128"]}
    alice = peers_of(nodes, ALICE, ctx)
    assert alice[5]["Addresses"] == alice[5]["AllowedIPs"] == ["fd7a:115c:a1e0::5/128"]
    assert alice[3]["Addresses"] == ["100.64.0.3/32", "fd7a:115c:a1e0::3/128"]


def test_ipv6_subnet_routes_and_literals_select_routes_per_viewer() -> None:
    r6 = node(1, tags=("tag:router",), routes=("fd00:1::/64", "fd00:2::/64"))
    nodes = [r6, ALICE, BOB]
    pol = {"hosts": {"lab6": "fd00:2::/64"}, "grants": [
        {"src": ["alice@example.com"], "dst": ["fd00:1::/64"], "ip": ["*"]},
        {"src": ["bob@example.com"], "dst": ["lab6"], "ip": ["tcp:22"]},
        {"src": ["fd7a:115c:a1e0::2"], "dst": ["fd00:2::5"], "ip": ["*"]},  # alice's v6
    ]}
    ctx = context(pol, nodes)
    assert routes(peers_of(nodes, ALICE, ctx)[1])[0] == ["fd00:1::/64", "fd00:2::/64"]
    assert routes(peers_of(nodes, BOB, ctx)[1])[0] == ["fd00:2::/64"]
