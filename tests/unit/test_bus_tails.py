"""A session that subscribed while a window was open gets the window's changes from its cut
on, coalesced: the bus takes that tail as a suffix of the window's coalesced list where it
can (``_Tails``), and must hand out exactly what coalescing the tail gives."""

from __future__ import annotations

import asyncio
import random

import pytest

from pyheadscale.state.changes import Change, ChangeBus, ChangeKind, Field, _Tails, coalesce

_KINDS = [ChangeKind.NODE_ADDED, ChangeKind.NODE_CHANGED, ChangeKind.NODE_PATCH,
          ChangeKind.NODE_ONLINE, ChangeKind.USER, ChangeKind.DNS, ChangeKind.SELF]


def _change(rng: random.Random, full: bool) -> Change:
    kind = rng.choice(_KINDS + ([ChangeKind.FULL] if full else []))
    fields = frozenset(rng.sample(list(Field), rng.choice((0, 1, 1, 2))))
    node = rng.randint(1, 6) if kind is not ChangeKind.DNS else None
    target = node if kind is ChangeKind.SELF else None
    user = rng.randint(1, 2) if kind is ChangeKind.USER else None
    return Change(kind, node, fields, target, user)


@pytest.mark.parametrize("seed", range(30))
def test_every_tail_is_the_coalesced_tail(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(40):
        pending = [_change(rng, full=rng.random() < 0.1) for _ in range(rng.randint(0, 25))]
        tails = _Tails(pending, coalesce(pending))
        for cut in range(len(pending) + 1):
            own = [_change(rng, full=False) for _ in range(rng.choice((0, 0, 0, 1, 2)))]
            assert tails.after(cut, own) == coalesce([*pending[cut:], *own])


def test_a_key_repeated_across_the_cut_keeps_only_the_tails_fields() -> None:
    # The window's merged change of node 7 has both fields; the joiner's tail only one.
    pending = [Change(ChangeKind.NODE_PATCH, 7, frozenset({Field.ENDPOINTS})),
               Change(ChangeKind.NODE_ADDED, 8),
               Change(ChangeKind.NODE_PATCH, 7, frozenset({Field.HOME_DERP}))]
    tails = _Tails(pending, coalesce(pending))
    assert tails.after(1, []) == [Change(ChangeKind.NODE_ADDED, 8),
                                  Change(ChangeKind.NODE_PATCH, 7, frozenset({Field.HOME_DERP}))]
    assert tails.after(2, []) == [Change(ChangeKind.NODE_PATCH, 7, frozenset({Field.HOME_DERP}))]


async def test_joiners_of_one_window_each_get_their_own_tail() -> None:
    bus = ChangeBus(batch_delay=0.05)
    old = bus.subscribe(1)
    bus.publish(Change(ChangeKind.NODE_ADDED, 2))
    two = bus.subscribe(2)
    bus.publish(Change(ChangeKind.NODE_PATCH, 5, frozenset({Field.ENDPOINTS})),
                Change(ChangeKind.NODE_ONLINE, 2, frozenset({Field.ONLINE})),
                Change(ChangeKind.NODE_ADDED, 3))
    three = bus.subscribe(3)
    bus.publish(Change(ChangeKind.NODE_PATCH, 5, frozenset({Field.HOME_DERP})),
                Change(ChangeKind.NODE_ONLINE, 3, frozenset({Field.ONLINE})))
    got_old = await asyncio.wait_for(old.__anext__(), 1)
    got_two = await asyncio.wait_for(two.__anext__(), 1)
    got_three = await asyncio.wait_for(three.__anext__(), 1)
    assert [(c.kind, c.node_id) for c in got_old] == [
        (ChangeKind.NODE_ADDED, 2), (ChangeKind.NODE_PATCH, 5), (ChangeKind.NODE_ONLINE, 2),
        (ChangeKind.NODE_ADDED, 3), (ChangeKind.NODE_ONLINE, 3)]
    assert got_two == [
        Change(ChangeKind.NODE_PATCH, 5, frozenset({Field.ENDPOINTS, Field.HOME_DERP})),
        Change(ChangeKind.NODE_ONLINE, 2, frozenset({Field.ONLINE})),
        Change(ChangeKind.NODE_ADDED, 3),
        Change(ChangeKind.NODE_ONLINE, 3, frozenset({Field.ONLINE}))]
    # Node 5's patch repeats across three's cut: only the fields published after it.
    assert got_three == [Change(ChangeKind.NODE_PATCH, 5, frozenset({Field.HOME_DERP})),
                         Change(ChangeKind.NODE_ONLINE, 3, frozenset({Field.ONLINE}))]
