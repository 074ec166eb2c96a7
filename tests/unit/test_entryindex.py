"""The evaluation index's DstPorts entries by address (policy/entryindex.py) and what it
hands from one snapshot to the next (parses, matchers and their node masks).

hits() is checked against the plain definition (an entry is served by a node whose address
it contains, whose subnet route overlaps it, or that is an exit node when it is within the
Internet) for random pieces mixing single addresses, prefixes, ranges, "*" and bad text,
the same address in several entries and pieces, and parses shared across rebuilds.
"""

from __future__ import annotations

import ipaddress
import json
import random
from dataclasses import replace
from typing import Any

import pytest

from pyheadscale.policy import PolicyManager
from pyheadscale.policy.compile import Matcher, NodeInfo
from pyheadscale.policy.entryindex import EntryIndex, PieceParses
from pyheadscale.policy.ipset import THE_INTERNET, parse_wire
from pyheadscale.state.model import User
from tests.unit._statefix import make_node


def _address(rng: random.Random) -> str:
    k = rng.randrange(10)
    i = rng.randint(1, 12)
    if k < 5:
        return rng.choice([f"100.64.0.{i}", f"fd7a:115c:a1e0::{i}"])
    if k == 5:
        return f"100.64.0.{i & ~3}/30"
    if k == 6:
        return f"100.64.0.{i}-100.64.0.{i + rng.randint(0, 4)}"
    if k == 7:
        return rng.choice(["10.0.0.0/8", "10.1.0.0/16", "0.0.0.0/0", "8.8.8.8"])
    if k == 8:
        return "*"
    return rng.choice(["not-an-ip", "100.64.0.9/8"])  # refused by parse_wire: never hit


def _node_info(rng: random.Random, i: int) -> NodeInfo:
    routes = rng.sample(["10.1.2.0/24", "10.0.0.0/8", "0.0.0.0/0", "::/0", "192.168.0.0/16"],
                        rng.randint(0, 2))
    if "0.0.0.0/0" in routes or "::/0" in routes:
        routes = [r for r in routes if r not in ("0.0.0.0/0", "::/0")] + ["0.0.0.0/0", "::/0"]
    return NodeInfo.of(make_node(i, routes=routes, approved=routes))


def _served(info: NodeInfo, ip: str) -> bool:
    s = parse_wire(ip)
    if s is None:
        return False
    return (s.contains_any(info.ips) or any(s.overlaps_prefix(r) for r in info.subnet_routes)
            or (info.is_exit and s.issubset(THE_INTERNET)))


def _pieces(rng: random.Random) -> list[tuple[int, dict[str, Any]]]:
    return [(rng.randrange(5), {"SrcIPs": ["*"], "DstPorts": [
                {"IP": _address(rng), "Ports": "*"} for _ in range(rng.randint(0, 6))]})
            for _ in range(rng.randint(1, 8))]


@pytest.mark.parametrize("seed", range(60))
def test_hits_are_the_entries_a_node_serves(seed: int) -> None:
    rng = random.Random(seed)
    parses = PieceParses()
    pieces = _pieces(rng)
    for _ in range(3):  # rebuilds sharing parses: kept, changed and new pieces
        index = EntryIndex(pieces, parses)
        flat = [(label, dp) for label, rule in pieces for dp in rule["DstPorts"]]
        assert list(zip(index.label, index.dp, strict=True)) == flat
        for i in range(1, 13):
            info = _node_info(rng, i)
            want = {eid for eid, (_, dp) in enumerate(flat) if _served(info, dp["IP"])}
            assert index.hits(info) == want, (seed, info.keys, info.route_ranges)
        pieces = [p if rng.random() < 0.5 else (p[0], {**p[1], "DstPorts": list(
            p[1]["DstPorts"])}) for p in pieces] + _pieces(rng)[:2]


def test_equal_destinations_share_one_parse() -> None:
    parses = PieceParses()
    dsts = [{"IP": f"100.64.0.{i}", "Ports": "22"} for i in range(1, 50)]
    EntryIndex([(0, {"SrcIPs": ["*"], "DstPorts": dsts})], parses)
    kept = parses.get([dict(d) for d in dsts])  # a recompiled rule's equal list
    assert kept is parses.get(dsts)


def _tailnet() -> tuple[str, list[User], list[Any]]:
    users = [User(id=1, name="alice"), User(id=2, name="bob")]
    nodes = [make_node(i, user=1 + i % 2) for i in range(1, 13)]
    text = json.dumps({
        "tagOwners": {"tag:web": ["alice@"]},
        "acls": [
            {"action": "accept", "src": ["bob@"], "dst": ["100.64.0.0/29:22"]},
            {"action": "accept", "src": ["100.64.0.8/29"], "dst": ["bob@:80"]},
            {"action": "accept", "src": ["alice@"], "dst": ["tag:web:443"]},
        ]})
    return text, users, nodes


def test_a_tag_change_reuses_the_matchers_it_leaves_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    text, users, nodes = _tailnet()
    pm = PolicyManager(text, users, nodes, run_tests=False)
    pm.peers(nodes[0])
    built: list[dict[str, Any]] = []
    of = Matcher.of.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(Matcher, "of", classmethod(lambda cls, r: built.append(r) or of(cls, r)))
    nodes[1] = replace(nodes[1], tags=("tag:web",), user_id=None)  # an alice node
    assert pm.update(nodes=nodes)
    for v in nodes:
        pm.peers(v)
    # Only alice's rule names what moved; bob's two keep their matchers and masks.
    assert [r["SrcIPs"] for r in built if "100.64.0.8/29" in r["SrcIPs"]] == []
    assert any(r["DstPorts"][0]["Ports"]["First"] == 443 for r in built)
    fresh = PolicyManager(text, users, nodes, run_tests=False)
    assert all(pm.peers(v) == fresh.peers(v) for v in nodes)


def test_masks_follow_a_node_address_change() -> None:
    text, users, nodes = _tailnet()
    pm = PolicyManager(text, users, nodes, run_tests=False)
    before = {v.id: set(pm.peers(v)) for v in nodes}
    # Node 10 (alice's) leaves 100.64.0.8/29, the only rule it was in: the rules keep their
    # text, not their node masks.
    nodes[9] = replace(nodes[9], ipv4=ipaddress.IPv4Address("100.64.0.99"))
    pm.update(nodes=nodes)
    fresh = PolicyManager(text, users, nodes, run_tests=False)
    for v in nodes:
        assert pm.peers(v) == fresh.peers(v)
        assert pm.packet_filter(v) == fresh.packet_filter(v)
    assert {v.id: set(pm.peers(v)) for v in nodes} != before
