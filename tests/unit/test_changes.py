import asyncio

from pyheadscale.state.changes import Change, ChangeBus, ChangeKind, Field


async def test_batching_coalesces_within_window() -> None:
    bus = ChangeBus(batch_delay=0.05)
    sub = bus.subscribe(1)
    bus.publish(Change(ChangeKind.NODE_PATCH, 7, frozenset({Field.ENDPOINTS})))
    bus.publish(Change(ChangeKind.NODE_PATCH, 7, frozenset({Field.HOME_DERP})))
    bus.publish(Change(ChangeKind.NODE_ADDED, 8))
    batch = await asyncio.wait_for(sub.__anext__(), 1)
    assert batch == [Change(ChangeKind.NODE_PATCH, 7, frozenset({Field.ENDPOINTS, Field.HOME_DERP})),
                     Change(ChangeKind.NODE_ADDED, 8)]


async def test_changes_during_window_ride_along() -> None:
    bus = ChangeBus(batch_delay=0.1)
    sub = bus.subscribe(1)
    bus.publish(Change(ChangeKind.NODE_ADDED, 2))
    task = asyncio.ensure_future(sub.__anext__())
    await asyncio.sleep(0.03)
    bus.publish(Change(ChangeKind.NODE_ADDED, 3))
    batch = await asyncio.wait_for(task, 1)
    assert [c.node_id for c in batch] == [2, 3]


async def test_zero_delay_is_immediate() -> None:
    bus = ChangeBus(batch_delay=0)
    sub = bus.subscribe(1)
    bus.publish(Change(ChangeKind.DNS))
    assert await asyncio.wait_for(sub.__anext__(), 0.5) == [Change(ChangeKind.DNS)]


async def test_newer_subscription_replaces_older() -> None:
    bus = ChangeBus(batch_delay=0)
    old = bus.subscribe(5)
    got: list[list[Change]] = []

    async def drain() -> None:
        async for b in old:
            got.append(b)

    t = asyncio.ensure_future(drain())
    await asyncio.sleep(0)
    new = bus.subscribe(5)
    await asyncio.wait_for(t, 1)  # the old iterator ended
    assert old.closed and not new.closed
    bus.publish(Change(ChangeKind.DERP))
    assert await asyncio.wait_for(new.__anext__(), 0.5) == [Change(ChangeKind.DERP)]
    assert got == []
    old.close()  # closing a replaced subscription must not unsubscribe the new one
    assert bus.subscribed(5)


async def test_slow_subscriber_collapses_to_full_and_does_not_block() -> None:
    bus = ChangeBus(batch_delay=0, max_buffer=10)
    slow = bus.subscribe(1)
    fast = bus.subscribe(2)
    for i in range(50):
        bus.publish(Change(ChangeKind.NODE_CHANGED, i))
        if i % 10 == 0:
            await asyncio.wait_for(fast.__anext__(), 0.5)
    assert await asyncio.wait_for(slow.__anext__(), 0.5) == [Change.full()]
    assert slow.overflows == 1
    bus.publish(Change(ChangeKind.NODE_ADDED, 99))
    assert await asyncio.wait_for(slow.__anext__(), 0.5) == [Change(ChangeKind.NODE_ADDED, 99)]


async def test_targeted_change_only_reaches_target() -> None:
    bus = ChangeBus(batch_delay=0)
    a, b = bus.subscribe(1), bus.subscribe(2)
    bus.publish(Change(ChangeKind.SELF, 2, target=2))
    assert b.pending() == 1 and a.pending() == 0


async def test_full_subsumes_batch() -> None:
    bus = ChangeBus(batch_delay=0.01)
    sub = bus.subscribe(1)
    bus.publish(Change(ChangeKind.NODE_ADDED, 1), Change.full(), Change(ChangeKind.DNS))
    assert await asyncio.wait_for(sub.__anext__(), 0.5) == [Change.full()]
    sub.close()
    assert not bus.subscribed(1)


async def test_every_subscriber_gets_the_same_batch_object() -> None:
    bus = ChangeBus(batch_delay=0.01)
    a, b = bus.subscribe(1), bus.subscribe(2)
    bus.publish(Change(ChangeKind.NODE_ADDED, 3), Change(ChangeKind.NODE_ONLINE, 3))
    got_a = await asyncio.wait_for(a.__anext__(), 1)
    got_b = await asyncio.wait_for(b.__anext__(), 1)
    assert got_a is got_b  # one batch, so the mapper can encode it once for both
    assert [c.kind for c in got_a] == [ChangeKind.NODE_ADDED, ChangeKind.NODE_ONLINE]


async def test_targeted_change_joins_the_shared_batch_for_its_target_only() -> None:
    bus = ChangeBus(batch_delay=0.01)
    a, b = bus.subscribe(1), bus.subscribe(2)
    bus.publish(Change(ChangeKind.DNS), Change(ChangeKind.SELF, 2, target=2))
    assert await asyncio.wait_for(a.__anext__(), 1) == [Change(ChangeKind.DNS)]
    assert await asyncio.wait_for(b.__anext__(), 1) == [Change(ChangeKind.DNS),
                                                        Change(ChangeKind.SELF, 2, target=2)]


async def test_slow_fanout_stretches_the_next_window() -> None:
    """While the sessions are still writing one batch the next window stays open; once they
    are done it stays open as long as that took (storm protection), within the cap."""
    from pyheadscale.state.changes import MAX_STRETCH

    bus = ChangeBus(batch_delay=0.02)
    a, b = bus.subscribe(1), bus.subscribe(2)
    bus.publish(Change(ChangeKind.NODE_ADDED, 3))
    await asyncio.wait_for(a.__anext__(), 1)
    await asyncio.wait_for(b.__anext__(), 1)
    bus.publish(Change(ChangeKind.NODE_ADDED, 4))  # b has not come back for more yet
    nxt = asyncio.ensure_future(a.__anext__())
    await asyncio.sleep(0.1)
    assert not nxt.done()  # held: the last fan-out (b's part) is not finished
    t0 = asyncio.get_running_loop().time()
    late = asyncio.ensure_future(b.__anext__())  # b is done with batch 1
    await asyncio.wait_for(nxt, 1)
    waited = asyncio.get_running_loop().time() - t0
    assert bus.last_fanout_s >= 0.1
    assert 0.09 <= waited <= MAX_STRETCH * 0.02 + 0.1  # ~ as long as the slow fan-out took
    await asyncio.wait_for(late, 1)


async def test_a_stuck_session_holds_the_next_window_only_up_to_the_cap() -> None:
    from pyheadscale.state.changes import MAX_STRETCH

    bus = ChangeBus(batch_delay=0.01)
    a, stuck = bus.subscribe(1), bus.subscribe(2)
    bus.publish(Change(ChangeKind.NODE_ADDED, 3))
    await asyncio.wait_for(a.__anext__(), 1)
    await asyncio.wait_for(stuck.__anext__(), 1)  # takes it, never comes back
    t0 = asyncio.get_running_loop().time()
    bus.publish(Change(ChangeKind.NODE_ADDED, 4))
    await asyncio.wait_for(a.__anext__(), 2)
    assert asyncio.get_running_loop().time() - t0 <= MAX_STRETCH * 0.01 + 0.1


def test_window_is_the_delay_after_quick_fanouts() -> None:
    bus = ChangeBus(batch_delay=0.1)
    assert bus.window() == 0.1
    from pyheadscale.state.changes import MAX_STRETCH, STRETCH

    bus.last_fanout_s = 0.5
    assert bus.window() == min(STRETCH * 0.5, MAX_STRETCH * 0.1)
    bus.last_fanout_s = 1000.0

    assert bus.window() == MAX_STRETCH * 0.1
