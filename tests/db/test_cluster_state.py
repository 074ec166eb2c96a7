"""Two tailnets on one PostgreSQL database, as two instances would run them: what one commits
reaches the other through the change log, uniqueness holds across them, and presence says
which instance holds a node's session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import Engine, text

from pyheadscale.auth.webflow import Pending, UnknownAuthID
from pyheadscale.cluster.member import DEAD_AFTER_S, TICK_S, ClusterMember
from pyheadscale.control import sharedreg
from pyheadscale.control.sharedreg import SharedPending
from pyheadscale.db.cluster import ClusterRegistration
from pyheadscale.db.engine import make_engine, migrate
from pyheadscale.state import InvalidAuthKey, persist
from pyheadscale.state.changelog import ChangeLog
from pyheadscale.state.changes import ChangeKind, Field
from pyheadscale.state.tailnet import Tailnet
from tests.pgserver import PostgresServer
from tests.unit._statefix import key, make_cfg


def _engine(params: dict[str, Any]) -> Engine:
    return make_engine("postgres", pg_host=params["host"], pg_port=params["port"],
                       pg_name=params["name"], pg_user=params["user"],
                       pg_password=params["password"], pg_pool_size=4)


@pytest.fixture
async def pair(pg_server: PostgresServer) -> AsyncIterator[tuple[Tailnet, Tailnet]]:
    params = pg_server.create_database()
    engines = [_engine(params), _engine(params)]
    migrate(engines[0])
    cfg = make_cfg()
    a = await Tailnet.load(engines[0], cfg, changelog=ChangeLog("inst-a"))
    b = await Tailnet.load(engines[1], cfg, changelog=ChangeLog("inst-b"))
    yield a, b
    for tn in (a, b):
        await tn.close()
    for e in engines:
        e.dispose()
    pg_server.drop_database(params["name"])


async def _user_and_key(tn: Tailnet, *, reusable: bool = True, ephemeral: bool = False
                        ) -> tuple[int, str]:
    u = await tn.create_user("alice")
    _, full = await tn.create_preauth_key(u.id, reusable=reusable, ephemeral=ephemeral)
    return u.id, full


async def test_writes_reach_the_other_instance(pair: tuple[Tailnet, Tailnet]) -> None:
    a, b = pair
    uid, full = await _user_and_key(a)
    assert await b.catch_up() == 2
    assert b.get_user(uid).name == "alice" and len(b.list_preauth_keys()) == 1
    sub = a.bus.subscribe(999)
    n = await b.register_with_authkey(key(1), key(2), None, {"Hostname": "web"}, key=full)
    await a.catch_up()
    seen = a.get_node(n.id)
    assert (seen.ipv4, seen.ipv6, seen.given_name) == (n.ipv4, n.ipv6, "web")
    # The other instance's sessions hear of it as they would of a local write.
    batch = await asyncio.wait_for(sub.__anext__(), 5)
    assert [(c.kind, c.node_id) for c in batch] == [(ChangeKind.NODE_ADDED, n.id)]
    await b.rename_node(n.id, "www")
    await a.catch_up()
    batch = await asyncio.wait_for(sub.__anext__(), 5)
    assert [(c.kind, c.fields) for c in batch] == [
        (ChangeKind.NODE_CHANGED, frozenset({Field.GIVEN_NAME}))]
    assert a.get_node(n.id).given_name == "www" and a.node_by_given_name("www") is not None
    # Re-registering through the other instance keeps the node's identity and addresses.
    again = await a.register_with_authkey(key(1), key(3), key(2), {"Hostname": "web"}, key=full)
    assert (again.id, again.ipv4, again.ipv6) == (n.id, n.ipv4, n.ipv6)
    await b.catch_up()
    assert b.get_node(n.id).node_key == key(3)
    await a.delete_node(n.id)
    await b.catch_up()
    assert n.id not in b.nodes and not b.ipam.in_use(n.ipv4)  # type: ignore[arg-type]


async def test_concurrent_registrations_get_distinct_addresses_and_names(
        pair: tuple[Tailnet, Tailnet]) -> None:
    a, b = pair
    _, full = await _user_and_key(a)
    await b.catch_up()
    # Neither catches up in between: a write that finds the other's change is run again,
    # holding the append lock, after catching up.
    held = 0
    for tn in (a, b):
        plain = tn._write_holding_lock

        async def counting(*args: Any, plain: Any = plain) -> Any:
            nonlocal held
            held += 1
            return await plain(*args)

        tn._write_holding_lock = counting  # type: ignore[method-assign]
    regs = [tn.register_with_authkey(key(10 + i), key(100 + i), None, {"Hostname": "host"},
                                     key=full)
            for i in range(60) for tn in ((a, b)[i % 2],)]
    nodes = await asyncio.gather(*regs)
    assert len({n.id for n in nodes}) == 60
    assert len({n.ipv4 for n in nodes}) == 60 and len({n.ipv6 for n in nodes}) == 60
    assert len({n.given_name for n in nodes}) == 60
    assert held > 0
    await a.catch_up()
    await b.catch_up()
    assert {n.id: (n.ipv4, n.given_name) for n in a.nodes.values()} == {
        n.id: (n.ipv4, n.given_name) for n in b.nodes.values()}


async def test_single_use_key_holds_across_instances(pair: tuple[Tailnet, Tailnet]) -> None:
    a, b = pair
    _, full = await _user_and_key(a, reusable=False)
    await b.catch_up()
    await a.register_with_authkey(key(1), key(2), None, {"Hostname": "one"}, key=full)
    # b has not seen the key used: its write is re-run on fresh memory and refused.
    with pytest.raises(InvalidAuthKey):
        await b.register_with_authkey(key(3), key(4), None, {"Hostname": "two"}, key=full)
    assert len(b.nodes) == 1



async def test_reregistering_on_another_instance_keeps_id_and_addresses(
        pair: tuple[Tailnet, Tailnet]) -> None:
    a, b = pair
    _, full = await _user_and_key(a)
    first = await a.register_with_authkey(key(1), key(2), None, {"Hostname": "roam"}, key=full)
    # The same machine registers again (a new node key, as after `tailscale up
    # --force-reauth`) through the other instance, which has not caught up explicitly.
    again = await b.register_with_authkey(key(1), key(5), key(2), {"Hostname": "roam"},
                                          key=full)
    assert (again.id, again.ipv4, again.ipv6, again.given_name) == (
        first.id, first.ipv4, first.ipv6, first.given_name)
    assert again.node_key == key(5) and len(b.nodes) == 1
    await a.catch_up()
    assert a.nodes[first.id].node_key == key(5) and len(a.nodes) == 1

async def test_presence_follows_the_session(pair: tuple[Tailnet, Tailnet]) -> None:
    a, b = pair
    _, full = await _user_and_key(a)
    n = await a.register_with_authkey(key(1), key(2), None, {"Hostname": "h"}, key=full)
    await b.catch_up()
    sub = b.bus.subscribe(999)
    assert await a.set_online(n.id, True)
    await b.catch_up()
    assert b.get_node(n.id).online and b.presence[n.id] == "inst-a"
    batch = await asyncio.wait_for(sub.__anext__(), 5)
    assert [(c.kind, c.fields) for c in batch] == [
        (ChangeKind.NODE_ONLINE, frozenset({Field.ONLINE}))]
    # The client moves to b; a's old session ending afterwards must not take it offline.
    await b.set_online(n.id, True)
    await a.catch_up()
    assert a.presence[n.id] == "inst-b"
    assert not await a.set_online(n.id, False)
    await b.catch_up()
    assert b.get_node(n.id).online and a.get_node(n.id).online
    assert await b.set_online(n.id, False)
    await a.catch_up()
    assert not a.get_node(n.id).online and n.id not in a.presence


async def test_presence_reasserted_and_resync(pair: tuple[Tailnet, Tailnet]) -> None:
    a, b = pair
    _, full = await _user_and_key(a)
    n1 = await a.register_with_authkey(key(1), key(2), None, {"Hostname": "h1"}, key=full)
    n2 = await a.register_with_authkey(key(3), key(4), None, {"Hostname": "h2"}, key=full)
    await a.set_online(n1.id, True)
    await b.catch_up()
    # What a holds after an outage: n2, not n1.
    await a.reassert_presence([n2.id])
    await b.catch_up()
    assert not b.get_node(n1.id).online and b.get_node(n2.id).online
    # A change the log no longer holds: b reloads everything.
    await a.rename_node(n1.id, "renamed")
    with a.engine.begin() as c:
        c.execute(text("DELETE FROM cluster_changes"))
    await b.resync()
    assert b.get_node(n1.id).given_name == "renamed"


async def _settle(*pendings: SharedPending) -> None:
    for p in pendings:
        while p._tasks:
            await asyncio.gather(*list(p._tasks))


async def _share(p: Pending, src: SharedPending, dst: SharedPending) -> None:
    """Publish `p` from the instance it was opened on; the other mirrors it."""
    await src.publish(p)
    await dst.tailnet.catch_up()
    await _settle(dst)


async def test_pending_registration_completed_on_another_instance(
        pair: tuple[Tailnet, Tailnet]) -> None:
    a, b = pair
    uid, _ = await _user_and_key(a)
    pa, pb = SharedPending(60, 100, a), SharedPending(60, 100, b)
    # Opened on a (the client's register request); its Followup waits there.
    p = pa.add(machine_key=key(1), node_key=key(2), hostinfo={"Hostname": "web"})
    await _share(p, pa, pb)
    mirrored = pb.get(p.auth_id)  # b mirrors it: a Followup or the admin may land there
    assert (mirrored.machine_key, mirrored.hostinfo) == (key(1), {"Hostname": "web"})
    # The admin approves on b; the client waiting on a gets its node.
    node = await b.register_for_user(key(1), key(2), uid, mirrored.hostinfo)
    pb.complete(p.auth_id, node)
    await _settle(pb)
    await a.catch_up()
    await _settle(pa)
    got = await asyncio.wait_for(asyncio.shield(p.done), 5)
    assert got.id == node.id and got.ipv4 == node.ipv4
    # One opened on b and rejected on a: b's waiter hears the refusal.
    q = pb.add(machine_key=key(3), node_key=key(4), hostinfo={})
    await _share(q, pb, pa)
    pa.reject(q.auth_id, "auth request rejected")
    await _settle(pa)
    await b.catch_up()
    await _settle(pb)
    with pytest.raises(PermissionError):
        await asyncio.wait_for(asyncio.shield(q.done), 5)
    # A Followup reaching an instance before the change log did reads the database.
    r = pa.add(machine_key=key(5), node_key=key(6), hostinfo={})
    await pa.publish(r)
    assert (await pb.fetch(r.auth_id)).machine_key == key(5)


async def _until(what: str, check: Any, within: float) -> float:
    t0 = asyncio.get_running_loop().time()
    while not check():
        if asyncio.get_running_loop().time() - t0 > within:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)
    return asyncio.get_running_loop().time() - t0


async def test_a_dead_leader_is_replaced_and_swept(pair: tuple[Tailnet, Tailnet]) -> None:
    a, b = pair
    ma, mb = ClusterMember(a), ClusterMember(b)
    await ma.start()
    try:
        await _until("a to lead", lambda: a.membership.is_leader, 5)
        await mb.start()
        try:
            await _until("a and b to know each other", lambda: set(mb.instances) == {
                "inst-a", "inst-b"}, 10)
            await asyncio.sleep(2 * TICK_S)
            assert a.membership.is_leader and not b.membership.is_leader  # one leader
            # a dies as a killed process does: its loop stops, its connection closes (with
            # its locks), nothing says goodbye.
            assert ma._task is not None and ma._conn is not None
            ma._task.cancel()
            await ma._conn.close()
            took = await _until("b to lead", lambda: b.membership.is_leader, 5)
            print(f"leader taken over {took:.2f} s after the leader's connection closed")
            assert took <= 3 * TICK_S
            # Once its liveness lock has been gone long enough, the new leader drops it.
            await _until("a to be swept", lambda: set(mb.instances) == {"inst-b"},
                         DEAD_AFTER_S + 5)
            with b.engine.connect() as c:
                rows = c.execute(text("SELECT id FROM cluster_instances")).scalars().all()
            assert rows == ["inst-b"]
        finally:
            await mb.stop()
    finally:
        ma._closed = True
        await ma._close_conn()


async def test_completing_one_url_answers_the_machines_other_url_on_another_instance(
        pair: tuple[Tailnet, Tailnet]) -> None:
    a, b = pair
    uid, _ = await _user_and_key(a)
    pa, pb = SharedPending(60, 100, a), SharedPending(60, 100, b)
    # Two `tailscale up` runs on a: two URLs; the client now waits on the second.
    first = pa.add(machine_key=key(7), node_key=key(8), hostinfo={"Hostname": "tabs"})
    second = pa.add(machine_key=key(7), node_key=key(9), hostinfo={"Hostname": "tabs"})
    for p in (first, second):
        await pa.publish(p)
    # The Followup on the second URL reaches b before the change log: b reads that row
    # first, and the first one after; the order they were opened in still holds there.
    await pb.fetch(second.auth_id)
    await b.catch_up()
    await _settle(pb)
    assert pb.newest(pb.get(first.auth_id)).auth_id == second.auth_id
    # The first tab is completed on b: the machine's newest request is what registers.
    with pb.deciding(first.auth_id) as newest:
        assert newest.auth_id == second.auth_id and newest.node_key == key(9)
        node = await b.register_for_user(key(7), newest.node_key, uid, newest.hostinfo)
    assert sorted(pb.complete(first.auth_id, node)) == sorted([first.auth_id, second.auth_id])
    await _settle(pb)
    await a.catch_up()
    await _settle(pa)
    got = await asyncio.wait_for(asyncio.shield(second.done), 5)
    assert got.id == node.id and got.node_key == key(9)
    assert len(pa) == len(pb) == 0


async def test_a_completion_mirrored_elsewhere_leaves_newer_urls_open(
        pair: tuple[Tailnet, Tailnet]) -> None:
    a, b = pair
    uid, _ = await _user_and_key(a)
    pa, pb = SharedPending(60, 100, a), SharedPending(60, 100, b)
    first = pa.add(machine_key=key(7), node_key=key(8), hostinfo={"Hostname": "tabs"})
    await _share(first, pa, pb)
    with pa.deciding(first.auth_id) as newest:
        node = await a.register_for_user(key(7), newest.node_key, uid, newest.hostinfo)
        # Meanwhile two more `tailscale up` runs reach b, which a has not seen yet: one
        # stamped by a clock behind a's (it looks older than the first), one not.
        later = [pb.add(machine_key=key(7), node_key=key(9 + i), hostinfo={"Hostname": "tabs"},
                        opened=first.opened + skew) for i, skew in enumerate((-30.0, 1.0))]
        for p in later:
            await pb.publish(p)
    assert pa.complete(first.auth_id, node) == [first.auth_id]
    await _settle(pa)
    await b.catch_up()
    await _settle(pb)
    # b closes the URL a decided, and only that one: the newer ones wait for their login.
    with pytest.raises(UnknownAuthID):
        pb.get(first.auth_id)
    assert [pb.get(p.auth_id) for p in later] == later
    assert not any(p.done.done() for p in later)
    # Once a has seen both, rejecting one refuses the machine's login: a closes both, and
    # so does b (a wrote both rows).
    await a.catch_up()
    await _settle(pa)
    assert sorted(pa.reject(later[1].auth_id, "no")) == sorted(p.auth_id for p in later)
    await _settle(pa)
    await b.catch_up()
    await _settle(pb)
    with pytest.raises(PermissionError):
        later[1].done.result()
    with pytest.raises(PermissionError):
        later[0].done.result()


async def test_a_machines_oldest_url_closes_on_every_instance(
        pair: tuple[Tailnet, Tailnet]) -> None:
    a, b = pair
    pa, pb = SharedPending(60, 100, a, per_machine=2), SharedPending(60, 100, b, per_machine=2)
    opened = []
    for i in range(3):  # three `tailscale up` runs of one machine; at most two stay open
        p = pa.add(machine_key=key(7), node_key=key(20 + i), hostinfo={})
        await pa.publish(p)
        opened.append(p)
    await _settle(pa)
    await b.catch_up()
    await _settle(pb)
    assert [q.auth_id for q in pb.list()] == [q.auth_id for q in opened[1:]]
    for pend in (pa, pb):  # gone from the database too: no instance brings it back
        with pytest.raises(UnknownAuthID):
            await pend.fetch(opened[0].auth_id)
    # A row older than the machine's open ones, reaching b late, is not taken for them.
    stale = pa.add(machine_key=key(8), node_key=key(30), hostinfo={})
    for i in range(2):
        pb.add(machine_key=key(8), node_key=key(31 + i), hostinfo={})
    await pa.publish(stale)
    await b.catch_up()
    await _settle(pb)
    with pytest.raises(UnknownAuthID):
        pb.get(stale.auth_id)
    assert len([q for q in pb.list() if q.machine_key == key(8)]) == 2


async def test_mirrored_registrations_are_decoded_and_charged_where_opened(
        pair: tuple[Tailnet, Tailnet]) -> None:
    a, b = pair
    pa = SharedPending(60, 100, a, per_source=1)
    pb = SharedPending(60, 100, b, per_source=1)
    # Two sources on a, one entry each: b mirrors both though its own quota is 1 per source.
    opened = []
    for i, src in enumerate(("198.51.100.7", "198.51.100.8")):
        p = pa.add(machine_key=key(10 + i), node_key=key(20 + i),
                   hostinfo={"Hostname": f"h{i}"}, source=src)
        await pa.publish(p)
        opened.append(p)
    # A row as a buggy or hostile writer might leave it: wrong types, unknown keys, padding.
    def poison(tx: persist.Tx) -> None:
        row = tx.s.get(ClusterRegistration, opened[1].auth_id)
        assert row is not None
        row.data = dict(row.data or {}, hostinfo={
            "Hostname": "h1", "OS": 7, "Bogus": "x" * 100_000,
            "RoutableIPs": ["not-a-prefix"]})
        tx.touch(sharedreg.TABLE, opened[1].auth_id)

    await a.run_in_tx(poison)
    await b.catch_up()
    await _settle(pb)
    assert pb.get(opened[0].auth_id).hostinfo == {"Hostname": "h0"}
    # Decoded as a stored row is (leniently): the wrong fields and unknown keys dropped.
    assert pb.get(opened[1].auth_id).hostinfo == {"Hostname": "h1"}
    assert len(pb) == 2


async def test_a_discard_elsewhere_leaves_a_url_whose_login_is_being_decided(
        pair: tuple[Tailnet, Tailnet]) -> None:
    """A Followup that timed out on b discards the shared row while a is registering the
    machine: a keeps its URL, so the client waiting on it there gets its node."""
    a, b = pair
    uid, _ = await _user_and_key(a)
    pa, pb = SharedPending(60, 100, a), SharedPending(60, 100, b)
    p = pa.add(machine_key=key(7), node_key=key(8), hostinfo={"Hostname": "web"})
    await _share(p, pa, pb)
    with pa.deciding(p.auth_id) as newest:
        pb.discard(p.auth_id)
        await _settle(pb)
        await a.catch_up()
        await _settle(pa)
        assert pa.get(p.auth_id) is p and not p.done.done()
        node = await a.register_for_user(key(7), newest.node_key, uid, newest.hostinfo)
        assert pa.complete(newest.auth_id, node) == [p.auth_id]
    got = await asyncio.wait_for(asyncio.shield(p.done), 5)
    assert got.id == node.id
    # Not being decided, a discard elsewhere closes it here as before.
    q = pa.add(machine_key=key(9), node_key=key(10), hostinfo={})
    await _share(q, pa, pb)
    pb.discard(q.auth_id)
    await _settle(pb)
    await a.catch_up()
    await _settle(pa)
    with pytest.raises(UnknownAuthID):
        pa.get(q.auth_id)
