"""BatchView.of against a plain reading of the rules it applies, on random batches.

BatchView.of is written for speed (every joiner of a storm window reads its own batch of up
to thousands of changes); ``_reference`` is the same rules one change at a time, as they
read in the mapper's docstring: a whole-node change (added, changed, key expiry) resends
the node and makes its own Node due, reconciling its peers when its identity changed or the
fields are not known; a patch of only PATCH_FIELDS is a PeerChange, anything else a whole
node; online flips are patches of Online and LastSeen; a removal is a whole node.
"""

from __future__ import annotations

import random

import pytest

from pyheadscale.mapper.delta import BatchView
from pyheadscale.state.changes import (
    IDENTITY_FIELDS,
    PATCH_FIELDS,
    Change,
    ChangeKind,
    Field,
    coalesce,
)

_SELF = frozenset({Field.EXPIRY, Field.NODE_KEY})
_NODE = {ChangeKind.NODE_ADDED, ChangeKind.NODE_CHANGED, ChangeKind.NODE_PATCH,
         ChangeKind.NODE_REMOVED, ChangeKind.NODE_ONLINE, ChangeKind.NODE_KEY_EXPIRY}


def _reference(changes: list[Change]) -> BatchView:
    b = BatchView()
    kinds = set()
    for c in changes:
        kinds.add(c.kind)
        kind = ChangeKind.NODE_CHANGED if c.kind is ChangeKind.NODE_KEY_EXPIRY else c.kind
        if kind is ChangeKind.FULL:
            b.full = True
        elif kind is ChangeKind.POLICY:
            b.policy = True
        elif kind is ChangeKind.DNS:
            b.dns = True
        elif kind is ChangeKind.DERP:
            b.derp = True
        elif kind is ChangeKind.USER:
            if c.user_id is None or b.user_ids is None:
                b.user_ids = None
            else:
                b.user_ids.add(c.user_id)
        if c.kind not in _NODE or c.node_id is None:
            continue
        nid, fields = c.node_id, c.fields or None
        due, reconcile = b.own.get(nid, (False, False))
        whole = kind in (ChangeKind.NODE_ADDED, ChangeKind.NODE_CHANGED)
        if whole:
            due = True
            reconcile = reconcile or fields is None or bool(fields & IDENTITY_FIELDS)
        elif kind is ChangeKind.NODE_PATCH and (fields is None or fields & _SELF):
            due = True
        b.own[nid] = (due, reconcile)
        b.touched.add(nid)
        if whole or kind is ChangeKind.NODE_REMOVED:
            b.full_ids.add(nid)
        elif kind is ChangeKind.NODE_ONLINE:
            b.patch_fields.setdefault(nid, set()).update((Field.ONLINE, Field.LAST_SEEN))
        elif fields is None or not fields <= PATCH_FIELDS:
            b.full_ids.add(nid)
        else:
            b.patch_fields.setdefault(nid, set()).update(fields)
    b.kinds = frozenset(kinds)
    return b


def _random_change(rng: random.Random) -> Change:
    kind = rng.choice(list(ChangeKind))
    fields = frozenset(rng.sample(list(Field), rng.choice((0, 0, 1, 1, 2, 3))))
    if kind is ChangeKind.NODE_PATCH and rng.random() < 0.6:
        fields = frozenset(rng.sample(sorted(PATCH_FIELDS, key=lambda f: f.value), 2))
    node = rng.choice((None, 1, 2, 3, 4, 5, 6)) if kind in _NODE else None
    user = rng.choice((None, 1, 2)) if kind is ChangeKind.USER else None
    return Change(kind, node, fields, user_id=user)


@pytest.mark.parametrize("seed", range(40))
def test_batchview_matches_the_rules(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        batch = [_random_change(rng) for _ in range(rng.randint(0, 30))]
        for changes in (batch, coalesce(batch)):
            assert BatchView.of(changes) == _reference(changes)


def test_key_expiry_is_a_whole_node_with_its_own_node_due() -> None:
    b = BatchView.of([Change(ChangeKind.NODE_KEY_EXPIRY, 7, frozenset({Field.EXPIRY}))])
    assert b.full_ids == {7} and b.own == {7: (True, False)} and b.touched == {7}
