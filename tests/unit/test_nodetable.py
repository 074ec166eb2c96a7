"""The live node table's key version, and the policy's peer-set answer that trusts it.

PolicyManager.peer_ids gives its shared IdBlocks only when the nodes it is asked about are
exactly its snapshot's; with a NodeTable it compares the key sets once per key version.
Every way of changing the key set must move the version (else a stale "same IDs" answer
would hand the mapper a peer set naming a node the table no longer has, or missing one),
and replacing a node under its ID must not (else nothing is saved).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

import pytest

from pyheadscale.idblocks import IdBlocks
from pyheadscale.policy import PolicyManager
from pyheadscale.state.nodetable import NodeTable
from tests.unit._statefix import make_node

POLICY = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'


def test_key_version_moves_with_the_key_set_only() -> None:
    t = NodeTable()
    n1, n2, n3 = (make_node(i, user=1) for i in (1, 2, 3))
    steps: list[tuple[Callable[[], object], bool]] = [
        (lambda: t.__setitem__(1, n1), True),
        (lambda: t.__setitem__(1, replace(n1, hostname="x")), False),
        (lambda: t.setdefault(2, n2), True),
        (lambda: t.setdefault(2, n2), False),
        (lambda: t.update({3: n3}), True),
        (lambda: t.pop(3), True),
        (lambda: t.pop(3, None), False),
        (lambda: t.__delitem__(2), True),
        (lambda: t.__ior__({2: n2}), True),
        (lambda: t.popitem(), True),
        (lambda: t.clear(), True),
    ]
    for step, moves in steps:
        before = t.key_version
        step()
        assert (t.key_version != before) is moves
    with pytest.raises(KeyError):
        t.pop(99)
    assert NodeTable({1: n1}) == {1: n1} and NodeTable({1: n1}).key_version == 0


def test_peer_ids_follows_every_key_change_of_a_node_table() -> None:
    rng = random.Random(5)
    base = {i: make_node(i, user=1 + i % 2) for i in range(1, 41)}
    pm = PolicyManager(POLICY, [], list(base.values()), run_tests=False)
    table = NodeTable(base)
    viewer = base[1]
    assert isinstance(pm.peer_ids(viewer, table), IdBlocks)
    assert isinstance(pm.peer_ids(viewer, table), IdBlocks)  # the remembered answer
    for _ in range(60):
        # Swap one node for a new ID (same length), or add or drop one: never the
        # snapshot's IDs, so never its IdBlocks; then back, which is the snapshot's again.
        op = rng.choice(["swap", "add", "drop"])
        gone = rng.choice([i for i in table if i != viewer.id])
        saved = table[gone]
        if op in ("swap", "drop"):
            del table[gone]
        if op in ("swap", "add"):
            table[200] = make_node(200, user=1)
        got = pm.peer_ids(viewer, table)
        want = {i for i in table if i != viewer.id}  # allow-all: every other node
        assert not isinstance(got, IdBlocks) and set(got) & table.keys() == want
        table.pop(200, None)
        table[gone] = saved
        got = pm.peer_ids(viewer, table)
        assert isinstance(got, IdBlocks) and set(got) == want - {200} | {gone}


def test_a_table_survives_pickle_and_copy() -> None:
    import copy
    import pickle

    t = NodeTable()
    for i in (1, 2, 3):
        t[i] = make_node(i, user=1)
    del t[2]
    for back in (pickle.loads(pickle.dumps(t)), copy.copy(t), copy.deepcopy(t)):
        assert type(back) is NodeTable
        assert back == t and back.key_version == t.key_version
        back[9] = make_node(9, user=1)
        assert back.key_version == t.key_version + 1
