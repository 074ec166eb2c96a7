"""The indexed policy evaluation (policy/evaluate.py) against the direct definitions.

Random small tailnets (users, tagged and owned nodes, subnet routers, exit nodes) and random
policies (ACLs and grants with users, groups, tags, hosts, prefixes, autogroups including
self and internet, protocols, via and app grants) are compiled once; every node's packet
filter must equal, rule for rule and in order, policy/reference.py's reduce(node_rules), its
peer set the pairwise evaluation, and the routes each peer offers it the pairwise
RoutesForPeer. Also: update() after random changes, the no-op update,
and the cached address renderings against ipaddress's own.
"""

from __future__ import annotations

import ipaddress
import json
import random
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from pyheadscale.policy import PolicyError, PolicyManager, reference
from pyheadscale.policy.ipset import IPSet, prefix_string
from pyheadscale.state.model import Node, User
from pyheadscale.state.routes import PrimaryRoutes
from tests.unit._statefix import make_node

TAGS = ["tag:a", "tag:b", "tag:c"]
ROUTES = ["10.1.0.0/16", "10.1.2.0/24", "192.168.7.0/24", "fd00:1::/64", "100.64.0.0/29"]
EXIT = ["0.0.0.0/0", "::/0"]


def make_users(rng: random.Random) -> list[User]:
    return [User(id=i, name=f"u{i}", email=f"u{i}@example.com")
            for i in range(1, rng.randint(2, 4) + 1)]


def random_node(rng: random.Random, i: int, users: list[User]) -> Node:
    tagged = rng.random() < 0.35
    tags = tuple(rng.sample(TAGS, rng.randint(1, 2))) if tagged else ()
    # Mostly consecutive addresses (the renderer splits runs of node addresses), some gaps.
    v4 = ipaddress.IPv4Address(int(ipaddress.IPv4Address("100.64.0.0")) + i + (
        rng.choice([0, 0, 0, 40])))
    v6 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("fd7a:115c:a1e0::")) + i)
    routes: list[str] = []
    if rng.random() < 0.25:
        routes += rng.sample(ROUTES, rng.randint(1, 2))
    if rng.random() < 0.15:
        routes += EXIT
    approved = [r for r in routes if rng.random() < 0.8]
    if set(EXIT) & set(approved):
        approved = list(dict.fromkeys(approved + EXIT))
    return make_node(
        i, user=None if tagged else rng.choice(users).id, tags=tags, routes=routes,
        approved=approved,
        machine_key=i.to_bytes(32, "big"), node_key=(i + 7).to_bytes(32, "big"),
        ipv4=v4 if rng.random() < 0.95 else None, ipv6=v6 if rng.random() < 0.8 else None,
    )


def make_policy(rng: random.Random, users: list[User]) -> str:
    groups = {f"group:g{g}": [f"{u.name}@" for u in rng.sample(users, rng.randint(1, len(users)))]
              for g in range(2)}
    hosts = {"h1": "100.64.0.0/30", "h2": "10.1.2.0/24", "h3": "100.64.0.5"}

    def alias(dst: bool) -> str:
        choices = ["*", f"{rng.choice(users).name}@", rng.choice(list(groups)),
                   rng.choice(TAGS), rng.choice(list(hosts)), "autogroup:member",
                   "autogroup:tagged", rng.choice(["100.64.0.0/28", "10.1.0.0/16",
                                                   "100.64.0.3", "fd7a:115c:a1e0::/120"])]
        if dst:
            choices += ["autogroup:self", "autogroup:self", "autogroup:internet"]
        return rng.choice(choices)

    def self_ok_src(acl: bool = True) -> str:
        return rng.choice(["*"] * acl + [f"{rng.choice(users).name}@", rng.choice(list(groups)),
                                         "autogroup:member"])

    acls: list[dict[str, Any]] = []
    for _ in range(rng.randint(1, 7)):
        dst = [alias(True) for _ in range(rng.randint(1, 3))]
        if "autogroup:self" in dst:
            src = [self_ok_src() for _ in range(rng.randint(1, 2))]
        else:
            src = [alias(False) for _ in range(rng.randint(1, 3))]
        proto = rng.choice(["", "", "tcp", "udp", "icmp"])
        port = "*" if proto == "icmp" else rng.choice(["*", "22", "80,443", "1000-2000"])
        acl: dict[str, Any] = {"action": "accept", "src": src,
                               "dst": [f"{d}:{port}" for d in dst]}
        if proto:
            acl["proto"] = proto
        acls.append(acl)
    # Repeat a rule's sources with another destination so rules merge.
    if acls and rng.random() < 0.5:
        twin = dict(rng.choice(acls))
        twin["dst"] = [f"{alias(False)}:" + ("*" if twin.get("proto") == "icmp" else "8080")]
        acls.insert(rng.randrange(len(acls) + 1), twin)
    grants: list[dict[str, Any]] = []
    if rng.random() < 0.5:
        grants.append({"src": [self_ok_src(acl=False)], "dst": ["autogroup:self"],
                       "ip": ["tcp:22"], "app": {"example.com/cap/x": [{"k": 1}]}})
    if rng.random() < 0.5:
        grants.append({"src": [alias(False)], "dst": [rng.choice(["10.1.0.0/16",
                                                                  "192.168.7.0/24"])],
                       "ip": ["*"], "via": [rng.choice(TAGS)]})
    if rng.random() < 0.3:
        grants.append({"src": [alias(False)], "dst": ["autogroup:internet"],
                       "ip": ["tcp:443"], "via": [rng.choice(TAGS)]})
    if rng.random() < 0.3:
        grants.append({"src": [alias(False)], "dst": [rng.choice(TAGS)],
                       "app": {"tailscale.com/cap/drive": [{"shares": ["*"]}]}})
    if rng.random() < 0.2:
        grants.append({"src": [alias(False)], "dst": ["10.1.0.0/16"],
                       "app": {"example.com/cap/y": [{}]}, "via": [rng.choice(TAGS)]})
    doc: dict[str, Any] = {"groups": groups, "hosts": hosts,
                           "tagOwners": {t: ["group:g0"] for t in TAGS}, "acls": acls}
    if grants:
        doc["grants"] = grants
    if rng.random() < 0.05:
        doc = {"groups": groups, "tagOwners": doc["tagOwners"]}  # no rules: allow-all
    return json.dumps(doc)


def assert_equivalent(pm: PolicyManager, nodes: list[Node], label: str) -> None:
    for n in nodes:
        want = reference.packet_filter(pm, n)
        got = pm.packet_filter(n)
        assert got == want, f"{label}: packet filter of node {n.id} differs"
        assert pm.peers(n) == reference.peers(pm, n, nodes), f"{label}: peers of node {n.id}"
    primaries = PrimaryRoutes()
    primaries.compute(replace(n, online=True) for n in nodes)
    for v in nodes:
        for p in nodes:
            prim = primaries.routes_of(p.id)
            got = set(pm.routes_for_peer(v, p, prim))
            assert got == reference.routes_for_peer(pm, v, p, prim), (
                f"{label}: routes node {p.id} offers node {v.id}")


def mutate(rng: random.Random, nodes: list[Node], users: list[User]) -> list[Node]:
    out = list(nodes)
    i = rng.randrange(len(out))
    n = out[i]
    k = rng.randrange(4)
    if k == 0:
        out[i] = replace(n, tags=(rng.choice(TAGS),), user_id=None)
    elif k == 1:
        out[i] = replace(n, tags=(), user_id=rng.choice(users).id)
    elif k == 2:
        routes = rng.sample(ROUTES, 1) + (EXIT if rng.random() < 0.5 else [])
        out[i] = replace(n, hostinfo={"RoutableIPs": routes},
                         approved_routes=tuple(ipaddress.ip_network(r) for r in routes))
    else:
        del out[i]
        out.append(random_node(rng, max(x.id for x in nodes) + 1, users))  # IDs stay unique
    return out


def random_tailnets(
    rng: random.Random, tries: int = 6
) -> Iterator[tuple[int, list[User], list[Node], PolicyManager]]:
    """(attempt, users, nodes, manager) for each of `tries` random tailnets whose random
    policy compiles (the generator also makes policies the validator refuses)."""
    for attempt in range(tries):
        users = make_users(rng)
        nodes = [random_node(rng, i, users) for i in range(1, rng.randint(2, 12) + 1)]
        try:
            pm = PolicyManager(make_policy(rng, users), users, nodes, run_tests=False)
        except PolicyError:
            continue
        yield attempt, users, nodes, pm


@pytest.mark.parametrize("seed", range(60))
def test_random_tailnets_match_reference(seed: int) -> None:
    rng = random.Random(seed)
    compiled = 0
    for attempt, users, nodes, pm in random_tailnets(rng):
        compiled += 1
        assert_equivalent(pm, nodes, f"seed {seed}/{attempt}")
        for step in range(2):
            nodes = mutate(rng, nodes, users)
            pm.update(nodes=nodes)  # False when the mutation happened to change nothing
            assert_equivalent(pm, nodes, f"seed {seed}/{attempt} after change {step}")
        before = {n.id: (pm.packet_filter(n), pm.peers(n)) for n in nodes}
        moved = [replace(n, endpoints=("192.0.2.1:41641",), hostname="renamed") for n in nodes]
        assert pm.update(nodes=moved) is False
        assert {n.id: (pm.packet_filter(n), pm.peers(n)) for n in moved} == before
    assert compiled >= 3, "the generator made too few valid policies"


def test_no_policy_matches_reference() -> None:
    rng = random.Random(99)
    users = make_users(rng)
    nodes = [random_node(rng, i, users) for i in range(1, 9)]
    assert_equivalent(PolicyManager(None, users, nodes), nodes, "no policy")


def test_unknown_viewer_uses_direct_definition() -> None:
    rng = random.Random(5)
    users = make_users(rng)
    nodes = [random_node(rng, i, users) for i in range(1, 8)]
    pm = PolicyManager(json.dumps({"acls": [{"action": "accept", "src": ["*"],
                                             "dst": ["*:*"]}]}), users, nodes)
    stranger = random_node(rng, 50, users)
    assert pm.packet_filter(stranger) == reference.packet_filter(pm, stranger)
    assert pm.peers(stranger) == reference.peers(pm, stranger, nodes)


def _ref_strings(s: IPSet) -> list[str]:
    out = []
    for lo, hi in s.ranges:
        a, b = _addrs(lo, hi)
        nets = list(ipaddress.summarize_address_range(a, b))  # type: ignore[arg-type]
        if lo == hi:
            out.append(str(a))
        elif len(nets) == 1:
            out.append(str(nets[0]))
        else:
            out.append(f"{a}-{b}")
    return out


def _addrs(lo: int, hi: int) -> tuple[Any, Any]:
    v6 = 1 << 200
    if lo >= v6:
        return ipaddress.IPv6Address(lo - v6), ipaddress.IPv6Address(hi - v6)
    return ipaddress.IPv4Address(lo), ipaddress.IPv4Address(hi)


@pytest.mark.parametrize("seed", range(20))
def test_cached_renderings_match_ipaddress(seed: int) -> None:
    rng = random.Random(seed)
    items: list[Any] = []
    for _ in range(rng.randint(1, 12)):
        if rng.random() < 0.5:
            base = ipaddress.IPv4Address("100.64.0.0") + rng.randrange(4096)
            items.append(ipaddress.ip_network(f"{base}/{rng.randint(20, 32)}", strict=False))
        else:
            base6 = ipaddress.IPv6Address("fd7a:115c:a1e0::") + rng.randrange(1 << 20)
            items.append(ipaddress.ip_network(f"{base6}/{rng.randint(100, 128)}", strict=False))
    s = IPSet.of(items)
    assert s.strings() == _ref_strings(s)
    assert s.prefix_strings() == [prefix_string(p) for p in s.prefixes()]
    atoms = frozenset(k for lo, hi in s.ranges[:2] for k in range(lo, min(hi, lo + 8) + 1))
    assert s.prefix_strings(atoms) == [prefix_string(p) for p in s.prefixes(atoms)]
