import asyncio
import time

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
    are done, if changes keep coming, it stays open STRETCH x as long as that took (storm
    protection), within the cap."""
    from pyheadscale.state.changes import STRETCH

    bus = ChangeBus(batch_delay=0.05)
    loop = asyncio.get_running_loop()
    a, b = bus.subscribe(1), bus.subscribe(2)
    bus.publish(Change(ChangeKind.NODE_ADDED, 3))
    await asyncio.wait_for(a.__anext__(), 1)
    await asyncio.wait_for(b.__anext__(), 1)
    nxt = asyncio.ensure_future(a.__anext__())
    for node in range(4, 24):  # changes keep coming (a storm) while b has not come back
        bus.publish(Change(ChangeKind.NODE_ADDED, node))
        await asyncio.sleep(0.01)
    assert not nxt.done()  # held: the last fan-out (b's part) is not finished
    t0 = loop.time()
    late = asyncio.ensure_future(b.__anext__())  # b is done with batch 1
    node = 24
    while loop.time() - t0 < 3:
        await asyncio.sleep(0.01)
        if nxt.done():
            break
        bus.publish(Change(ChangeKind.NODE_ADDED, node))
        node += 1
    waited = loop.time() - t0
    assert bus.last_fanout_s >= 0.2
    assert min(STRETCH * 0.2, bus.cap()) - 0.05 <= waited
    assert waited <= min(STRETCH * bus.last_fanout_s, bus.cap()) + 0.3
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


def test_the_storm_cap_grows_with_the_open_sessions() -> None:
    """A fixed cap let frames per node grow with a storm's length (so with the tailnet):
    the cap is MAX_STRETCH delays, or SESSION_STRETCH_S per open session when longer."""
    from pyheadscale.state.changes import MAX_STRETCH, SESSION_STRETCH_S, STRETCH

    bus = ChangeBus(batch_delay=0.1)
    for nid in range(1, 11):
        bus.subscribe(nid)
    bus.last_fanout_s = 1000.0
    assert bus.cap() == bus.window() == MAX_STRETCH * 0.1  # a small tailnet: the fixed cap
    for nid in range(11, 5001):
        bus.subscribe(nid)
    assert bus.cap() == bus.window() == 5000 * SESSION_STRETCH_S > MAX_STRETCH * 0.1
    bus.last_fanout_s = 0.2
    assert bus.window() == STRETCH * 0.2 < bus.cap()  # below the cap the stretch is what the fan-out took
    bus.close()


async def _storm_bus(delay: float) -> tuple[ChangeBus, asyncio.Future[list[Change]]]:
    """A bus whose last fan-out has just ended and took long (a storm's), and the next batch
    its one session waits for."""
    bus = ChangeBus(batch_delay=delay)
    a = bus.subscribe(1)
    bus.publish(Change(ChangeKind.NODE_ADDED, 2))
    await asyncio.wait_for(a.__anext__(), 1)
    nxt = asyncio.ensure_future(a.__anext__())  # a is done with its batch: fan-out over
    await asyncio.sleep(0)
    bus.last_fanout_s = 1000.0  # the window after it: the cap (20 delays)
    return bus, nxt


async def test_changes_that_keep_coming_after_a_long_fanout_share_one_window_up_to_the_cap(
) -> None:
    from pyheadscale.state.changes import MAX_STRETCH

    bus, nxt = await _storm_bus(0.05)  # cap: 1 s
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    node = 3
    while not nxt.done() and loop.time() - t0 < 3:
        bus.publish(Change(ChangeKind.NODE_ADDED, node))
        node += 1
        await asyncio.sleep(0.01)
    took = loop.time() - t0
    assert MAX_STRETCH * 0.05 - 0.05 <= took <= MAX_STRETCH * 0.05 + 0.5  # the cap holds
    batch = nxt.result()
    assert len(batch) >= 10 and [c.node_id for c in batch] == list(range(3, 3 + len(batch)))
    bus.close()


async def test_a_storm_window_closes_once_changes_stop_coming() -> None:
    """The storm's last changes go out QUIET_GAP delays after the last one, not at the end
    of the stretched window (a change right after a storm is not held for the cap)."""
    from pyheadscale.state.changes import QUIET_GAP

    bus, nxt = await _storm_bus(0.05)  # stretched window: 1 s
    loop = asyncio.get_running_loop()
    for node in (3, 4, 5):
        bus.publish(Change(ChangeKind.NODE_ADDED, node))
        await asyncio.sleep(0.03)
    t_last = loop.time() - 0.03
    batch = await asyncio.wait_for(nxt, 2)
    after = loop.time() - t_last
    assert QUIET_GAP * 0.05 - 0.02 <= after <= QUIET_GAP * 0.05 + 0.4
    assert [c.node_id for c in batch] == [3, 4, 5]
    bus.close()


async def test_sessions_behind_by_the_same_batches_share_one_merged_batch() -> None:
    """A backlog of several batches is merged once; every subscriber behind by the same
    batches gets that one list (so its delta is encoded once), equal to coalescing them."""
    from pyheadscale.state.changes import coalesce

    bus = ChangeBus(batch_delay=0)
    a, b, c = bus.subscribe(1), bus.subscribe(2), bus.subscribe(3)
    first = [Change(ChangeKind.NODE_ADDED, 4), Change(ChangeKind.NODE_PATCH, 5,
                                                      frozenset({Field.ENDPOINTS}))]
    second = [Change(ChangeKind.NODE_PATCH, 5, frozenset({Field.HOME_DERP})),
              Change(ChangeKind.NODE_ADDED, 6)]
    bus.publish(*first)
    got_c = await asyncio.wait_for(c.__anext__(), 1)  # c keeps up, a and b fall behind
    bus.publish(*second)
    got_a = await asyncio.wait_for(a.__anext__(), 1)
    got_b = await asyncio.wait_for(b.__anext__(), 1)
    assert got_a is got_b
    assert got_a == coalesce([*first, *second])
    assert got_c == coalesce(first)
    assert await asyncio.wait_for(c.__anext__(), 1) == second
    bus.publish(Change(ChangeKind.NODE_ADDED, 7))
    bus.publish(Change(ChangeKind.DNS))
    got_a2 = await asyncio.wait_for(a.__anext__(), 1)
    got_c2 = await asyncio.wait_for(c.__anext__(), 1)
    assert got_a2 is got_c2 and got_a2 is not got_a
    assert got_a2 == [Change(ChangeKind.NODE_ADDED, 7), Change(ChangeKind.DNS)]


async def test_a_session_opened_during_a_window_gets_only_what_came_after() -> None:
    """What the open window held when a session subscribed is already in the snapshot its
    first map is built from: it gets only what was published after (its own NODE_ADDED
    would otherwise make it reconcile every peer), the older sessions get everything."""
    bus = ChangeBus(batch_delay=0.05)
    old = bus.subscribe(1)
    bus.publish(Change(ChangeKind.NODE_ADDED, 2), Change(ChangeKind.SELF, 2, target=2))
    new = bus.subscribe(2)
    assert new.pending() == 0 and old.pending() == 1
    bus.publish(Change(ChangeKind.NODE_ONLINE, 2, frozenset({Field.ONLINE})))
    assert new.pending() == 1
    got_old = await asyncio.wait_for(old.__anext__(), 1)
    got_new = await asyncio.wait_for(new.__anext__(), 1)
    assert [c.kind for c in got_old] == [ChangeKind.NODE_ADDED, ChangeKind.NODE_ONLINE]
    assert got_new == [Change(ChangeKind.NODE_ONLINE, 2, frozenset({Field.ONLINE}))]
    # Nothing after it: the new session gets no batch from that window at all.
    bus.publish(Change(ChangeKind.NODE_ADDED, 3))
    third = bus.subscribe(3)
    assert await asyncio.wait_for(old.__anext__(), 1) == [Change(ChangeKind.NODE_ADDED, 3)]
    assert await asyncio.wait_for(new.__anext__(), 1) == [Change(ChangeKind.NODE_ADDED, 3)]
    assert third.pending() == 0
    # From the next window on, every session gets every change.
    bus.publish(Change(ChangeKind.DNS))
    assert await asyncio.wait_for(third.__anext__(), 1) == [Change(ChangeKind.DNS)]
    assert await asyncio.wait_for(new.__anext__(), 1) == [Change(ChangeKind.DNS)]


async def test_a_change_after_a_quiet_spell_is_not_held_by_a_long_last_fanout() -> None:
    bus = ChangeBus(batch_delay=0.02)
    a = bus.subscribe(1)
    bus.publish(Change(ChangeKind.NODE_ADDED, 3))
    await asyncio.wait_for(a.__anext__(), 1)
    nxt = asyncio.ensure_future(a.__anext__())  # a is done with its batch: fan-out over
    await asyncio.sleep(0)
    bus.last_fanout_s = 5.0  # a storm's fan-out: a storm window after it would be 2 s
    await asyncio.sleep(0.1)  # quiet, longer than the delay
    t0 = asyncio.get_running_loop().time()
    bus.publish(Change(ChangeKind.NODE_ADDED, 4))
    await asyncio.wait_for(nxt, 1)
    assert asyncio.get_running_loop().time() - t0 < 0.5


async def test_a_parked_session_takes_its_batch_inside_the_fanout() -> None:
    bus = ChangeBus(batch_delay=0.01)
    took: list[tuple[list[Change], float]] = []
    subs = [bus.subscribe(i) for i in (1, 2)]
    subs[0].direct = lambda batch, since: took.append((batch, since)) is None
    waits = [asyncio.ensure_future(s.__anext__()) for s in subs]
    await asyncio.sleep(0)  # both parked
    before = time.monotonic()
    bus.publish(Change(ChangeKind.NODE_ADDED, 9))
    await asyncio.wait_for(waits[1], 1)
    # Session 1 took it in the loop and was not woken; session 2 (no direct) was.
    assert [b for b, _ in took] == [[Change(ChangeKind.NODE_ADDED, 9)]]
    assert took[0][1] <= before + 0.001 and not waits[0].done()
    assert bus._outstanding == 1  # only the woken session owes its answer
    waits[1] = asyncio.ensure_future(subs[1].__anext__())  # session 2 answers: parked again
    # It stays parked: the next batch goes the same way.
    bus.publish(Change(ChangeKind.NODE_ADDED, 10))
    await asyncio.sleep(0.05)
    assert len(took) == 2 and not waits[0].done()
    assert await asyncio.wait_for(waits[1], 1) == [Change(ChangeKind.NODE_ADDED, 10)]
    waits[0].cancel()


async def test_a_session_that_declines_gets_its_batch_as_before() -> None:
    bus = ChangeBus(batch_delay=0.01)
    sub = bus.subscribe(1)
    sub.direct = lambda batch, since: False
    wait = asyncio.ensure_future(sub.__anext__())
    await asyncio.sleep(0)
    bus.publish(Change(ChangeKind.DNS))
    assert await asyncio.wait_for(wait, 1) == [Change(ChangeKind.DNS)]


async def test_direct_is_not_offered_inside_publish_or_when_the_session_is_busy() -> None:
    offered: list[list[Change]] = []

    def take(batch: list[Change], since: float) -> bool:
        offered.append(batch)
        return True

    bus = ChangeBus(batch_delay=0)  # publish() itself hands the batch out
    sub = bus.subscribe(1)
    sub.direct = take
    wait = asyncio.ensure_future(sub.__anext__())
    await asyncio.sleep(0)
    bus.publish(Change(ChangeKind.DNS))
    assert await asyncio.wait_for(wait, 1) == [Change(ChangeKind.DNS)] and offered == []
    timed = ChangeBus(batch_delay=0.01)
    busy = timed.subscribe(1)
    busy.direct = take
    timed.publish(Change(ChangeKind.DERP))
    await asyncio.sleep(0.05)  # the window closes while the session is not parked (writing)
    assert await asyncio.wait_for(busy.__anext__(), 1) == [Change(ChangeKind.DERP)]
    assert offered == []


async def test_a_nudge_wakes_the_parked_session_with_an_empty_batch_before_any_other() -> None:
    bus = ChangeBus(batch_delay=0.01)
    sub = bus.subscribe(1)

    def hold(batch: list[Change], since: float) -> bool:
        sub.nudge()  # its frame could not be written at once: the task writes it
        return True

    sub.direct = hold
    wait = asyncio.ensure_future(sub.__anext__())
    await asyncio.sleep(0)
    bus.publish(Change(ChangeKind.DNS))
    assert await asyncio.wait_for(wait, 1) == []
    sub.direct = None
    bus.publish(Change(ChangeKind.DERP))
    assert await asyncio.wait_for(sub.__anext__(), 1) == [Change(ChangeKind.DERP)]


async def test_a_fanout_taken_whole_in_the_loop_counts_its_duration() -> None:
    bus = ChangeBus(batch_delay=0.01)
    sub = bus.subscribe(1)

    def slow(batch: list[Change], since: float) -> bool:
        time.sleep(0.03)  # the frames' building and writing, done inside the fan-out
        return True

    sub.direct = slow
    wait = asyncio.ensure_future(sub.__anext__())
    await asyncio.sleep(0)
    bus.publish(Change(ChangeKind.DNS))
    await asyncio.sleep(0.08)
    assert bus.last_fanout_s >= 0.03 and bus._outstanding == 0
    wait.cancel()


async def test_prepare_soon_runs_once_in_a_window_opened_after_a_quiet_spell() -> None:
    """Work the window's frames share is done while the window waits, before its batch."""
    bus = ChangeBus(batch_delay=0.05)
    sub = bus.subscribe(1)
    ran: list[str] = []
    bus.publish(Change(ChangeKind.POLICY))
    bus.prepare_soon(lambda: ran.append("prepared"))
    bus.prepare_soon(lambda: ran.append("again"))  # once per window
    assert ran == []  # not inside the publisher's step
    nxt = asyncio.ensure_future(sub.__anext__())
    await asyncio.sleep(0)
    assert ran == ["prepared"] and not nxt.done()
    assert await asyncio.wait_for(nxt, 1) == [Change(ChangeKind.POLICY)]
    bus.close()


async def test_prepare_soon_does_nothing_in_a_storm_or_without_a_window() -> None:
    ran: list[int] = []
    bus, nxt = await _storm_bus(0.05)
    bus.publish(Change(ChangeKind.NODE_ADDED, 3))  # opened right after a long fan-out
    bus.prepare_soon(lambda: ran.append(1))
    await asyncio.wait_for(nxt, 3)
    bus.close()
    immediate = ChangeBus(batch_delay=0)  # every publish is handed out at once
    immediate.subscribe(1)
    immediate.publish(Change(ChangeKind.POLICY))
    immediate.prepare_soon(lambda: ran.append(2))
    idle = ChangeBus(batch_delay=0.05)  # no open window
    idle.subscribe(1)
    idle.prepare_soon(lambda: ran.append(3))
    alone = ChangeBus(batch_delay=0.05)  # a window, but no session to build a frame for
    alone.publish(Change(ChangeKind.POLICY))
    alone.prepare_soon(lambda: ran.append(4))
    await asyncio.sleep(0.01)
    assert ran == []
    alone.close()
