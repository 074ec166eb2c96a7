"""PolicyManager.update() reuses what a change leaves alone; the result is a full recompile's.

update() keeps the compiled grants whose inputs (their aliases' address sets, the node
addresses, the approved subnet routes a wildcard adds) did not change, and the address
renderings while the node addresses stay. For random tailnets, policies (ACLs, grants, SSH
rules, nodeAttrs) and chains of random changes (tags set and dropped, owners, routes, nodes
replaced), every query must answer exactly what a PolicyManager built from scratch on the
same snapshot answers.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from pyheadscale.policy import PolicyError, PolicyManager
from pyheadscale.state.model import Node, User
from pyheadscale.state.routes import PrimaryRoutes
from tests.unit._statefix import make_node
from tests.unit.test_policy_perf_equivalence import (
    TAGS,
    make_policy,
    make_users,
    mutate,
    random_node,
)


def _with_ssh_and_attrs(text: str, rng: random.Random, users: list[User]) -> str:
    doc = json.loads(text)
    if "acls" in doc:
        # A prefix made only of node addresses renders address by address, otherwise as a
        # prefix: its rendering changes when a node there goes or comes.
        doc["acls"].append({"action": "accept", "src": ["100.64.0.2/31"],
                            "dst": ["100.64.0.2/31:22", "autogroup:member:22"]})
    if rng.random() < 0.6:
        u = rng.choice(users).name + "@"
        pairs = [("autogroup:member", "autogroup:self"), ("group:g0", "autogroup:self"),
                 (rng.choice(TAGS), rng.choice(TAGS)), ("autogroup:member", rng.choice(TAGS)),
                 (u, u)]
        doc["ssh"] = [{"action": rng.choice(["accept", "check"]), "src": [src], "dst": [dst],
                       "users": rng.choice([["root"], ["autogroup:nonroot"], ["alice"]])}
                      for src, dst in rng.sample(pairs, rng.randint(1, 3))]
    if rng.random() < 0.5:
        doc["nodeAttrs"] = [{"target": [rng.choice([*TAGS, "autogroup:member", "*"])],
                             "attr": [rng.choice(["disable-ipv4", "example:x"])]}]
    return json.dumps(doc)


def _tag_change(rng: random.Random, nodes: list[Node], users: list[User]) -> list[Node]:
    """One node gets (or swaps, or loses) its tags: what the admin's SetTags does."""
    out = list(nodes)
    if rng.random() < 0.2:  # now and then a node goes instead (its address with it)
        del out[rng.randrange(len(out))]
        return out
    i = rng.randrange(len(out))
    n = out[i]
    if n.tags and rng.random() < 0.3:
        out[i] = replace(n, tags=(), user_id=rng.choice(users).id)
    else:
        out[i] = replace(n, tags=tuple(rng.sample(TAGS, rng.randint(1, 2))), user_id=None)
    return out


def assert_same(pm: PolicyManager, fresh: PolicyManager, nodes: list[Node], label: str) -> None:
    assert pm.global_filter() == fresh.global_filter(), f"{label}: global filter"
    primaries = PrimaryRoutes()
    primaries.compute(replace(n, online=True) for n in nodes)
    for v in nodes:
        assert pm.packet_filter(v) == fresh.packet_filter(v), f"{label}: filter of {v.id}"
        assert pm.peers(v) == fresh.peers(v), f"{label}: peers of {v.id}"
        assert pm.ssh_policy(v) == fresh.ssh_policy(v), f"{label}: SSH policy of {v.id}"
        assert pm.node_capmap(v) == fresh.node_capmap(v), f"{label}: CapMap of {v.id}"
        assert pm.auto_approved_routes(v) == fresh.auto_approved_routes(v), label
        for p in nodes:
            prim = primaries.routes_of(p.id)
            assert (sorted(map(str, pm.routes_for_peer(v, p, prim)))
                    == sorted(map(str, fresh.routes_for_peer(v, p, prim)))), (
                f"{label}: routes {p.id} offers {v.id}")


@pytest.mark.parametrize("seed", range(40))
def test_updates_equal_a_full_recompile(seed: int) -> None:
    rng = random.Random(1000 + seed)
    checked = 0
    for attempt in range(4):
        users = make_users(rng)
        nodes = [random_node(rng, i, users) for i in range(1, rng.randint(3, 12) + 1)]
        text = _with_ssh_and_attrs(make_policy(rng, users), rng, users)
        try:
            pm = PolicyManager(text, users, nodes, run_tests=False)
        except PolicyError:
            continue
        for n in nodes[:2]:
            pm.packet_filter(n)  # warm caches the update must drop or keep correctly
        for step in range(5):
            nodes = (_tag_change if rng.random() < 0.6 else mutate)(rng, nodes, users)
            pm.update(nodes=nodes)
            try:
                fresh = PolicyManager(text, users, nodes, run_tests=False)
            except PolicyError:
                break  # e.g. a user reference the new snapshot makes ambiguous
            assert_same(pm, fresh, nodes, f"seed {seed}/{attempt} step {step}")
            checked += 1
    assert checked >= 5, "the generator made too few valid policies"


def test_a_tag_change_recompiles_only_the_rules_it_touches() -> None:
    users = [User(id=1, name="alice"), User(id=2, name="bob")]
    nodes = [make_node(i, user=1 + i % 2) for i in range(1, 9)]
    text = json.dumps({
        "tagOwners": {"tag:web": ["alice@"]},
        "acls": [
            {"action": "accept", "src": ["bob@"], "dst": ["100.64.0.0/24:22"]},
            {"action": "accept", "src": ["alice@"], "dst": ["tag:web:443"]},
            {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:80"]},
        ]})
    pm = PolicyManager(text, users, nodes, run_tests=False)
    before = list(pm._grants)
    nodes[1] = replace(nodes[1], tags=("tag:web",), user_id=None)  # an alice node
    assert pm.update(nodes=nodes)
    after = list(pm._grants)
    # bob's rule names nothing the tag moves: the same compiled object, its rules untouched.
    assert after[0] is before[0]
    assert after[1] is not before[1] and after[2] is not before[2]
    assert_same(pm, PolicyManager(text, users, nodes, run_tests=False), nodes, "tagged")


def test_a_grant_whose_sources_alone_changed_keeps_its_destinations() -> None:
    users = [User(id=1, name="alice"), User(id=2, name="bob")]
    nodes = [make_node(i, user=1 + i % 2) for i in range(1, 9)]
    text = json.dumps({
        "tagOwners": {"tag:web": ["alice@"]},
        "acls": [
            {"action": "accept", "src": ["alice@", "bob@"], "dst": ["100.64.0.0/24:22,80"]},
            {"action": "accept", "src": ["autogroup:member"],
             "dst": ["tag:web:443", "bob@:8080"], "proto": "tcp"},
            {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:80"]},
        ]})
    pm = PolicyManager(text, users, nodes, run_tests=False)
    before = list(pm._grants)
    resourced = pm._memo.resourced
    nodes[2] = replace(nodes[2], tags=("tag:web",), user_id=None)  # a bob node
    assert pm.update(nodes=nodes)
    after = list(pm._grants)
    fresh = PolicyManager(text, users, nodes, run_tests=False)
    # The first grant's sources lost the node, its destinations (a prefix) did not: its
    # DstPorts lists are the very ones compiled before, its SrcIPs are new.
    assert [r["DstPorts"] for r in after[0].rules] == [r["DstPorts"] for r in before[0].rules]
    assert all(a["DstPorts"] is b["DstPorts"] for a, b in zip(after[0].rules, before[0].rules,
                                                                 strict=True))
    assert after[0].rules[0]["SrcIPs"] != before[0].rules[0]["SrcIPs"]
    # The others' destinations moved with the node (tag:web had none before): compiled
    # whole.
    assert not before[1].rules and after[1].rules
    assert after[2].rules[0]["DstPorts"] is not before[2].rules[0]["DstPorts"]
    assert pm._memo.resourced == resourced + 1
    assert [g.rules for g in after] == [g.rules for g in fresh._grants]
    assert_same(pm, fresh, nodes, "sources only")
