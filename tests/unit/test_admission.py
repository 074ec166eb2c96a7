"""Admission of new map sessions (control/admission.py): a few open at a time, the rest wait
in order, and one that waited too long is answered 503 (tailscaled polls again) without the
server marking its node online or subscribing it."""

from __future__ import annotations

import asyncio

import pytest

from pyheadscale.app import Server
from pyheadscale.control.admission import LIMIT, Admission
from tests.inproc import Machine


async def test_at_most_limit_are_admitted_and_the_others_wait_in_order() -> None:
    gate = Admission(limit=2, max_wait=5)
    a, b = await gate.enter(), await gate.enter()
    assert a is not None and b is not None and gate.opening == 2
    order: list[str] = []

    async def wait(name: str) -> None:
        t = await gate.enter()
        assert t is not None
        order.append(name)

    third = asyncio.create_task(wait("third"))
    await asyncio.sleep(0)  # queued before the fourth
    fourth = asyncio.create_task(wait("fourth"))
    await asyncio.sleep(0.05)
    assert order == [] and gate.waiting == 2
    a.release()
    a.release()  # idempotent: frees one place, not two
    await asyncio.sleep(0.05)
    assert order == ["third"] and gate.waiting == 1
    b.release()
    await asyncio.gather(third, fourth)
    assert order == ["third", "fourth"] and gate.opening == 2 and gate.waiting == 0


async def test_a_request_that_waited_max_wait_is_refused_and_holds_no_place() -> None:
    gate = Admission(limit=1, max_wait=0.05)
    held = await gate.enter()
    assert held is not None
    assert await gate.enter() is None
    assert gate.refused == 1 and gate.waiting == 0
    # A waiter whose client went away (its task cancelled) leaves no place taken either.
    gone = asyncio.create_task(gate.enter())
    await asyncio.sleep(0.01)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    held.release()
    again = await gate.enter()
    assert again is not None and gate.opening == 1


async def test_a_session_whose_first_map_is_not_written_frees_its_place_after_max_hold() -> None:
    # The first map's write waits on the client; one that never reads must not keep the gate.
    gate = Admission(limit=1, max_wait=5, max_hold=0.05)
    stuck = await gate.enter()
    assert stuck is not None
    t0 = asyncio.get_running_loop().time()
    nxt = await gate.enter()
    assert nxt is not None and gate.refused == 0
    assert asyncio.get_running_loop().time() - t0 >= 0.04
    stuck.release()  # the late release of the timed-out ticket frees nothing more
    assert gate.opening == 1
    assert await asyncio.wait_for(gate.enter(), 1) is not None  # nxt timed out in turn


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Admission(limit=0)


async def test_a_poll_beyond_the_limit_is_answered_503_then_served_once_a_place_frees(
        server: Server) -> None:
    gate = server.control.map_poll.admission
    gate.max_wait = 0.2
    user = await server.tailnet.create_user("dora")
    _, key = await server.tailnet.create_preauth_key(user.id)
    async with Machine(str(server.cfg.server_url), "late") as m:
        await m.register(auth_key=key)
        node = server.tailnet.node_by_node_key(m.node_key)
        assert node is not None
        tickets = [await gate.enter() for _ in range(LIMIT)]  # sessions still opening
        st = await m.conn.open_stream("POST", "/machine/map", m.map_request())
        status, _ = await st.response()
        assert status == 503
        # Refused before anything happened: not online, no session, no map built.
        assert not server.tailnet.nodes[node.id].online
        assert not server.tailnet.bus.subscribed(node.id)
        # A lite update builds no map: answered at once however busy the gate is.
        status, _, _ = await m.conn.request(
            "POST", "/machine/map",
            m.map_request(stream=False, OmitPeers=True, Endpoints=["198.51.100.7:41641"]))
        assert status == 200
        # The client polls again on the same connection; a place frees while it waits.
        gate.max_wait = 10
        stream = m.stream_map()
        first = asyncio.create_task(anext(stream))
        await asyncio.sleep(0.1)
        assert not first.done() and gate.waiting == 1
        for t in tickets:
            assert t is not None
            t.release()
        frame = await asyncio.wait_for(first, 10)
        assert frame["Node"]["Name"].startswith("late.")
        assert server.tailnet.nodes[node.id].online
        # Its place is given back once the first map is written, not when the poll ends.
        assert gate.opening == 0
        await stream.aclose()  # type: ignore[attr-defined]
