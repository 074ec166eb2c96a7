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


def test_window_widens_with_sessions() -> None:
    from pyheadscale.state.changes import SESSIONS_PER_DELAY

    bus = ChangeBus(batch_delay=0.1)
    assert bus.window() == 0.1
    subs = [bus.subscribe(i) for i in range(SESSIONS_PER_DELAY)]
    assert bus.window() == 0.2
    for s in subs:
        s.close()
    assert bus.window() == 0.1
