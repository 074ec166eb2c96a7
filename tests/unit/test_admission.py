"""Admission of new map sessions (control/admission.py): a few open at a time, the rest wait
in order, one per node, and one that waited too long is answered 503 (tailscaled polls again)
without the server marking its node online or subscribing it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import h2.settings
import pytest

from pyheadscale.app import Server
from pyheadscale.config import ConfigError
from pyheadscale.config.schema import TuningConfig
from pyheadscale.control.admission import LIMIT, MAX_WAIT_S, Admission, Refused, Ticket
from tests.inproc import Machine, running_server, server_config


async def test_at_most_limit_are_admitted_and_the_others_wait_in_order() -> None:
    gate = Admission(limit=2, max_wait=5)
    a, b = await gate.enter(1), await gate.enter(2)
    assert isinstance(a, Ticket) and isinstance(b, Ticket) and gate.opening == 2
    order: list[str] = []

    async def wait(name: str) -> None:
        t = await gate.enter(len(name))
        assert isinstance(t, Ticket)
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
    held = await gate.enter(1)
    assert isinstance(held, Ticket)
    assert await gate.enter(2) is Refused.TIMEOUT
    assert gate.refused == 1 and gate.waiting == 0
    # A waiter whose client went away (its task cancelled) leaves no place taken either.
    gone = asyncio.create_task(gate.enter(3))
    await asyncio.sleep(0.01)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert gate.waiting == 0
    held.release()
    again = await gate.enter(4)
    assert isinstance(again, Ticket) and gate.opening == 1


async def test_a_newer_request_of_a_node_takes_the_older_waiting_ones_turn() -> None:
    gate = Admission(limit=1, max_wait=5)
    held = await gate.enter(1)
    assert isinstance(held, Ticket)
    older = asyncio.create_task(gate.enter(7))
    other = asyncio.create_task(gate.enter(8))
    await asyncio.sleep(0.01)
    newer = asyncio.create_task(gate.enter(7))
    # The older one is answered at once (503: poll again), not after max_wait.
    assert await asyncio.wait_for(older, 1) is Refused.DISPLACED
    assert gate.displaced == 1 and gate.waiting == 2 and gate.refused == 0
    # The newer one queues behind the requests that were already waiting.
    held.release()
    t8 = await asyncio.wait_for(other, 1)
    assert isinstance(t8, Ticket) and not newer.done()
    # A node whose request is admitted may still queue one more (its newer session
    # replaces the older one when it opens).
    t8.release()
    t7 = await asyncio.wait_for(newer, 1)
    assert isinstance(t7, Ticket)
    again = asyncio.create_task(gate.enter(7))
    await asyncio.sleep(0.01)
    assert gate.waiting == 1 and gate.displaced == 1
    t7.release()
    assert isinstance(await asyncio.wait_for(again, 1), Ticket)


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Admission(limit=0)


def test_the_tuning_defaults_are_the_gates_own() -> None:
    """The config's defaults repeat admission.LIMIT and MAX_WAIT_S (config does not import
    the control plane): an unset key gives the gate it was designed with."""
    tuning = TuningConfig()
    assert tuning.node_mapsession_open_limit == LIMIT
    assert tuning.node_mapsession_open_timeout.total_seconds() == MAX_WAIT_S


async def test_the_gate_is_sized_by_the_tuning_keys(tmp_path: Path) -> None:
    cfg = server_config(tmp_path, overrides={"tuning": {"node_mapsession_open_limit": 3,
                                                        "node_mapsession_open_timeout": "2s"}})
    async with running_server(cfg) as srv:
        gate = srv.control.map_poll.admission
        assert (gate.limit, gate.max_wait) == (3, 2.0)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("node_mapsession_open_limit", 0, "must be between 1 and 1024, got 0"),
    ("node_mapsession_open_limit", 1025, "must be between 1 and 1024, got 1025"),
    ("node_mapsession_open_timeout", "500ms", "must be between 1s and 1m40s (clients give up "
     "on a map request after 120s without a map), got 500ms"),
    ("node_mapsession_open_timeout", "2m", "must be between 1s and 1m40s (clients give up "
     "on a map request after 120s without a map), got 2m0s"),
])
def test_the_tuning_keys_are_bounded(tmp_path: Path, key: str, value: object,
                                     message: str) -> None:
    with pytest.raises(ConfigError) as e:
        server_config(tmp_path, overrides={"tuning": {key: value}})
    assert str(e.value) == f"config: tuning.{key}: {message}"


async def test_a_poll_beyond_the_limit_is_answered_503_then_served_once_a_place_frees(
        server: Server, caplog: pytest.LogCaptureFixture) -> None:
    gate = server.control.map_poll.admission
    gate.max_wait = 0.2
    user = await server.tailnet.create_user("dora")
    _, key = await server.tailnet.create_preauth_key(user.id)
    async with Machine(str(server.cfg.server_url), "late") as m:
        await m.register(auth_key=key)
        node = server.tailnet.node_by_node_key(m.node_key)
        assert node is not None
        tickets = [await gate.enter(-i) for i in range(1, LIMIT + 1)]  # still opening
        with caplog.at_level(logging.DEBUG, "pyheadscale.poll"):
            st = await m.conn.open_stream("POST", "/machine/map", m.map_request())
            status, _ = await st.response()
        assert status == 503
        # Logged with the node and its connection: which client was refused, and why.
        [refused] = [r for r in caplog.records if r.getMessage() == "map request refused"]
        got = refused.fields  # type: ignore[attr-defined]
        assert {k: got[k] for k in ("node", "reason", "status")} == {
            "node": node.id, "reason": "timeout", "status": 503}
        assert isinstance(got["waited_ms"], int) and isinstance(got["conn"], int)
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
            assert isinstance(t, Ticket)
            t.release()
        frame = await asyncio.wait_for(first, 10)
        assert frame["Node"]["Name"].startswith("late.")
        assert server.tailnet.nodes[node.id].online
        # Its place is given back once the first map is built, not when the poll ends.
        assert gate.opening == 0
        await stream.aclose()  # type: ignore[attr-defined]


async def _join(server: Server, m: Machine) -> int:
    user = await server.tailnet.create_user(m.hostname)
    _, key = await server.tailnet.create_preauth_key(user.id)
    await m.register(auth_key=key)
    node = server.tailnet.node_by_node_key(m.node_key)
    assert node is not None
    return node.id


async def test_a_node_flooding_the_gate_delays_another_nodes_poll_by_one_turn_at_most(
        server: Server) -> None:
    gate = server.control.map_poll.admission
    url = str(server.cfg.server_url)
    async with Machine(url, "flood") as bad, Machine(url, "honest") as good:
        bad_id = await _join(server, bad)
        await _join(server, good)
        tickets = [await gate.enter(-i) for i in range(1, LIMIT + 1)]  # a full gate
        flood = [await bad.conn.open_stream("POST", "/machine/map", bad.map_request())
                 for _ in range(50)]
        # Each newer request takes the older's turn: 49 are answered 503 at once.
        for st in flood[:-1]:
            status, _ = await asyncio.wait_for(st.response(), 5)
            assert status == 503
        assert gate.displaced == 49 and gate.waiting == 1
        stream = good.stream_map()
        first = asyncio.create_task(anext(stream))
        await asyncio.sleep(0.05)
        assert gate.waiting == 2 and not first.done()
        # Two places free: the flooder's one request, then the honest node's.
        tickets[0].release()  # type: ignore[union-attr]
        tickets[1].release()  # type: ignore[union-attr]
        frame = await asyncio.wait_for(first, 10)
        assert frame["Node"]["Name"].startswith("honest.")
        status, _ = await asyncio.wait_for(flood[-1].response(), 5)
        assert status == 200 and server.tailnet.bus.subscribed(bad_id)
        assert gate.refused == 0
        for t in tickets[2:]:
            assert isinstance(t, Ticket)
            t.release()
        await stream.aclose()  # type: ignore[attr-defined]


async def test_a_client_that_never_reads_its_first_map_keeps_no_place(server: Server) -> None:
    gate = server.control.map_poll.admission
    url = str(server.cfg.server_url)
    async with Machine(url, "deaf") as deaf, Machine(url, "next") as nxt:
        await _join(server, deaf)
        await _join(server, nxt)
        tickets = [await gate.enter(-i) for i in range(1, LIMIT)]  # one place left
        # A zero window: not one byte of its first map can be written.
        deaf.conn._h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        deaf.conn._flush()
        st = await deaf.conn.open_stream("POST", "/machine/map", deaf.map_request())
        stream = nxt.stream_map()
        first = asyncio.create_task(anext(stream))
        # Admitted as soon as the deaf client's first map is built, long before any backstop.
        frame = await asyncio.wait_for(first, 2)
        assert frame["Node"]["Name"].startswith("next.")
        assert not st._chunks and not st.done  # the deaf client still has nothing
        assert gate.opening == LIMIT - 1 and gate.refused == 0
        for t in tickets:
            assert isinstance(t, Ticket)
            t.release()
        st.reset()
        await stream.aclose()  # type: ignore[attr-defined]
