import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from pyheadscale.state.changes import ChangeKind, Field
from pyheadscale.state.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    InvalidAuthKey,
    PersistError,
)
from pyheadscale.state.tailnet import Tailnet
from tests.unit._statefix import key, make_cfg, new_engine, open_tailnet

MK, NK, NK2 = key(1), key(2), key(3)


async def _setup(tmp_path: Path, **cfg: object) -> tuple[Tailnet, int]:
    tn = await open_tailnet(new_engine(tmp_path), make_cfg(**cfg) if cfg else None)
    u = await tn.create_user("alice")
    return tn, u.id


async def test_register_and_reregister_keep_identity(tmp_path: Path) -> None:
    tn, uid = await _setup(tmp_path)
    _, full = await tn.create_preauth_key(uid)
    sub = tn.bus.subscribe(999)
    n = await tn.register_with_authkey(MK, NK, None, {"Hostname": "Joe's Mac mini"}, key=full)
    assert n.given_name == "joes-mac-mini" and n.user_id == uid
    assert str(n.ipv4) == "100.64.0.1" and str(n.ipv6) == "fd7a:115c:a1e0::1"
    assert n.expiry is None and n.register_method == "authkey"
    assert tn.preauth_keys[n.auth_key_id].used  # type: ignore[index]
    assert (await sub.__anext__())[0].kind is ChangeKind.NODE_ADDED
    # Restart of the same machine with the same (now used) single-use key and node key.
    again = await tn.register_with_authkey(MK, NK, None, {"Hostname": "Joe's Mac mini"}, key=full)
    assert (again.id, again.ipv4, again.given_name) == (n.id, n.ipv4, n.given_name)
    # A cancelled attempt then a fresh node key: same machine may present the key again.
    third = await tn.register_with_authkey(MK, NK2, None, {"Hostname": "Joe's Mac mini"}, key=full)
    assert (third.id, third.ipv6) == (n.id, n.ipv6) and third.node_key == NK2
    assert tn.node_by_node_key(NK) is None and tn.node_by_node_key(NK2) is third
    # Another machine cannot reuse the single-use key.
    with pytest.raises(InvalidAuthKey) as ei:
        await tn.register_with_authkey(key(9), key(10), None, {"Hostname": "x"}, key=full)
    assert str(ei.value) == "authkey already used"
    await tn.close()


async def test_key_errors_and_reusable(tmp_path: Path) -> None:
    tn, uid = await _setup(tmp_path)
    _, reusable = await tn.create_preauth_key(uid, reusable=True)
    a = await tn.register_with_authkey(key(1), key(2), None, {"Hostname": "web"}, key=reusable)
    b = await tn.register_with_authkey(key(3), key(4), None, {"Hostname": "web"}, key=reusable)
    assert (a.given_name, b.given_name) == ("web", "web-1")
    assert b.ipv4 != a.ipv4
    _, expired = await tn.create_preauth_key(
        uid, expiration=datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(InvalidAuthKey, match="^authkey expired$"):
        await tn.register_with_authkey(key(5), key(6), None, {}, key=expired)
    with pytest.raises(InvalidAuthKey, match="^invalid pre auth key$"):
        await tn.register_with_authkey(key(5), key(6), None, {}, key="nonsense")
    assert len(tn.nodes) == 2
    await tn.close()


async def test_tagged_key_and_default_expiry(tmp_path: Path) -> None:
    tn, uid = await _setup(tmp_path, node={"expiry": "180d"})
    _, tagged = await tn.create_preauth_key(None, tags=["tag:server"])
    n = await tn.register_with_authkey(key(1), key(2), None, {"Hostname": "srv"}, key=tagged)
    assert n.user_id is None and n.tags == ("tag:server",)
    assert n.expiry is None  # tagged nodes are exempt
    assert tn.user_profile(n)["LoginName"] == "tagged-devices"
    _, owned = await tn.create_preauth_key(uid)
    m = await tn.register_with_authkey(key(3), key(4), None, {"Hostname": "lap"}, key=owned)
    assert m.expiry is not None
    assert timedelta(days=179) < m.expiry - datetime.now(UTC) <= timedelta(days=180)
    await tn.close()


async def test_rotation_logout_and_expiry(tmp_path: Path) -> None:
    tn, uid = await _setup(tmp_path)
    _, full = await tn.create_preauth_key(uid)
    n = await tn.register_with_authkey(MK, NK, None, {"Hostname": "h"}, key=full)
    r = await tn.rotate_node_key(n.id, NK2)
    assert r.id == n.id and r.version > n.version and tn.node_by_node_key(NK2) is r
    out = await tn.logout(n.id, datetime.now(UTC))
    assert out is not None and out.is_expired(datetime.now(UTC) + timedelta(seconds=1))
    # Re-login after logout must present a usable key: this single-use one is spent.
    with pytest.raises(InvalidAuthKey, match="already used"):
        await tn.register_with_authkey(MK, NK2, None, {"Hostname": "h"}, key=full)
    _, fresh = await tn.create_preauth_key(uid)
    back = await tn.register_with_authkey(MK, key(7), NK2, {"Hostname": "h"}, key=fresh)
    assert back.id == n.id and not back.is_expired(datetime.now(UTC))
    await tn.set_expiry(n.id, None)
    assert tn.nodes[n.id].expiry is None
    await tn.close()


async def test_ephemeral_logout_deletes(tmp_path: Path) -> None:
    tn, uid = await _setup(tmp_path)
    _, full = await tn.create_preauth_key(uid, ephemeral=True)
    n = await tn.register_with_authkey(MK, NK, None, {"Hostname": "e"}, key=full)
    assert n.ephemeral
    assert await tn.logout(n.id, datetime.now(UTC)) is None
    assert n.id not in tn.nodes and not tn.ipam.in_use(n.ipv4)  # type: ignore[arg-type]
    await tn.close()


async def test_ephemeral_gc(tmp_path: Path) -> None:
    engine = new_engine(tmp_path)
    tn = await open_tailnet(engine)
    u = await tn.create_user("eph")
    _, full = await tn.create_preauth_key(u.id, ephemeral=True, reusable=True)
    a = await tn.register_with_authkey(key(1), key(2), None, {"Hostname": "a"}, key=full)
    b = await tn.register_with_authkey(key(3), key(4), None, {"Hostname": "b"}, key=full)
    tn.gc.timeout = 0.05
    await tn.set_online(a.id, True)
    await tn.set_online(b.id, True)
    await tn.set_online(a.id, False)
    await tn.set_online(b.id, False)
    await tn.set_online(b.id, True)  # reconnect cancels the deletion
    await asyncio.sleep(0.3)
    assert a.id not in tn.nodes and b.id in tn.nodes
    await tn.close()
    # After a restart offline ephemeral nodes get a fresh timer.
    tn2 = await open_tailnet(engine)
    assert tn2.gc.scheduled() == [b.id]
    await tn2.close()


async def test_failed_db_write_leaves_memory_unchanged(tmp_path: Path) -> None:
    engine = new_engine(tmp_path)
    tn = await open_tailnet(engine)
    u = await tn.create_user("alice")
    _, full = await tn.create_preauth_key(u.id, reusable=True)
    n = await tn.register_with_authkey(MK, NK, None, {"Hostname": "h"}, key=full)
    with engine.begin() as c:
        c.execute(text("CREATE TRIGGER boom_u BEFORE UPDATE ON nodes "
                       "BEGIN SELECT RAISE(ABORT, 'injected'); END"))
        c.execute(text("CREATE TRIGGER boom_i BEFORE INSERT ON nodes "
                       "BEGIN SELECT RAISE(ABORT, 'injected'); END"))
    before = dict(tn.nodes)
    sub = tn.bus.subscribe(n.id)
    with pytest.raises(PersistError):
        await tn.rename_node(n.id, "renamed")
    with pytest.raises(PersistError):
        await tn.rotate_node_key(n.id, NK2)
    free_before = tn.ipam.free_count()
    with pytest.raises(PersistError):
        await tn.register_with_authkey(key(8), key(9), None, {"Hostname": "new"}, key=full)
    assert tn.nodes == before and tn.nodes[n.id] is before[n.id]
    assert tn.node_by_node_key(NK) is before[n.id] and tn.node_by_node_key(NK2) is None
    assert tn.ipam.free_count() == free_before
    assert sub.pending() == 0  # nothing published
    with engine.begin() as c:
        c.execute(text("DROP TRIGGER boom_u"))
        c.execute(text("DROP TRIGGER boom_i"))
    assert (await tn.rename_node(n.id, "renamed")).given_name == "renamed"
    await tn.close()


async def test_state_survives_reload(tmp_path: Path) -> None:
    engine = new_engine(tmp_path)
    tn = await open_tailnet(engine)
    u = await tn.create_user("alice", display_name="Alice", email="alice@example.com")
    _, full = await tn.create_preauth_key(u.id, reusable=True)
    a = await tn.register_with_authkey(key(1), key(2), None,
                                       {"Hostname": "a", "RoutableIPs": ["10.0.0.0/24"]}, key=full)
    b = await tn.register_with_authkey(key(3), key(4), None, {"Hostname": "a"}, key=full)
    await tn.update_from_map_request(a.id, endpoints=["192.0.2.1:41641"], disco_key=key(5),
                                     hostinfo={"Hostname": "a", "NetInfo": {"PreferredDERP": 1}})
    await tn.approve_routes(a.id, ["10.0.0.0/24"])
    await tn.rename_node(b.id, "bee")
    await tn.close()
    tn2 = await open_tailnet(engine)
    a2, b2 = tn2.nodes[a.id], tn2.nodes[b.id]
    assert (a2.ipv4, a2.ipv6, a2.given_name) == (a.ipv4, a.ipv6, "a")
    assert (b2.ipv4, b2.given_name) == (b.ipv4, "bee")
    assert a2.machine_key == key(1) and a2.node_key == key(2) and a2.disco_key == key(5)
    assert a2.endpoints == ("192.0.2.1:41641",)
    assert [str(r) for r in a2.approved_routes] == ["10.0.0.0/24"]
    assert a2.hostinfo["NetInfo"]["PreferredDERP"] == 1
    assert tn2.users[u.id].email == "alice@example.com"
    # New allocations continue past the reloaded addresses.
    c = await tn2.register_with_authkey(key(6), key(7), None, {"Hostname": "a"}, key=full)
    assert c.ipv4 not in (a.ipv4, b.ipv4) and c.given_name == "a-1"
    await tn2.close()


async def test_map_request_updates_report_fields(tmp_path: Path) -> None:
    tn, uid = await _setup(tmp_path)
    _, full = await tn.create_preauth_key(uid)
    n = await tn.register_with_authkey(MK, NK, None, {"Hostname": "laptop"}, key=full)
    sub = tn.bus.subscribe(12345)
    f = await tn.update_from_map_request(n.id, endpoints=["192.0.2.7:1"], disco_key=key(4),
                                         hostinfo={"Hostname": "laptop",
                                                   "NetInfo": {"PreferredDERP": 2}})
    assert f == {Field.ENDPOINTS, Field.DISCO_KEY, Field.HOME_DERP}
    assert (await sub.__anext__())[0].kind is ChangeKind.NODE_PATCH
    # Zero disco key / empty endpoints never overwrite; NetInfo omitted is preserved.
    assert await tn.update_from_map_request(n.id, endpoints=[], disco_key=bytes(32),
                                            hostinfo={"Hostname": "laptop"}) == frozenset()
    f = await tn.update_from_map_request(n.id, hostinfo={"Hostname": "Work Laptop"})
    assert f == {Field.HOSTINFO, Field.HOSTNAME, Field.GIVEN_NAME}
    assert tn.nodes[n.id].given_name == "work-laptop"
    assert tn.nodes[n.id].hostinfo["NetInfo"] == {"PreferredDERP": 2}
    # An admin rename sticks when the hostname changes later.
    await tn.rename_node(n.id, "mine")
    await tn.update_from_map_request(n.id, hostinfo={"Hostname": "other"})
    assert tn.nodes[n.id].given_name == "mine"
    await tn.close()


async def test_online_and_admin_ops(tmp_path: Path) -> None:
    tn, uid = await _setup(tmp_path)
    _, full = await tn.create_preauth_key(uid, reusable=True)
    n = await tn.register_with_authkey(MK, NK, None, {"Hostname": "x"}, key=full)
    m = await tn.register_with_authkey(key(5), key(6), None, {"Hostname": "y"}, key=full)
    sub = tn.bus.subscribe(n.id)
    assert await tn.set_online(n.id, True)
    assert not await tn.set_online(n.id, True)
    batch = await sub.__anext__()
    assert batch[0].kind is ChangeKind.NODE_ONLINE and tn.nodes[n.id].online
    with pytest.raises(AlreadyExists):
        await tn.rename_node(m.id, "x")
    with pytest.raises(InvalidArgument):
        await tn.rename_node(m.id, "Bad_Name")
    t = await tn.set_tags(m.id, ["tag:b", "tag:a"])
    assert t.tags == ("tag:a", "tag:b") and t.user_id is None
    with pytest.raises(InvalidArgument):
        await tn.set_tags(m.id, [])
    r = await tn.approve_routes(n.id, ["0.0.0.0/0"])
    assert [str(p) for p in r.approved_routes] == ["0.0.0.0/0", "::/0"]
    await tn.delete_node(m.id)
    assert m.id not in tn.nodes and tn.node_by_given_name("y") is None
    await tn.close()


async def test_users(tmp_path: Path) -> None:
    tn, uid = await _setup(tmp_path)
    with pytest.raises(AlreadyExists):
        await tn.create_user("alice")
    with pytest.raises(InvalidArgument, match="at least 2"):
        await tn.create_user("a")
    bob = await tn.create_user("bob")
    with pytest.raises(AlreadyExists):
        await tn.rename_user(bob.id, "alice")
    assert (await tn.rename_user(bob.id, "robert")).name == "robert"
    _, full = await tn.create_preauth_key(uid)
    n = await tn.register_with_authkey(MK, NK, None, {"Hostname": "h"}, key=full)
    with pytest.raises(Conflict, match="user not empty"):
        await tn.delete_user(uid)
    await tn.delete_node(n.id)
    await tn.delete_user(uid)
    assert uid not in tn.users and not tn.list_preauth_keys()
    assert [u.name for u in tn.list_users()] == ["robert"]
    await tn.close()


async def test_backfill_node_ips_follows_the_configured_prefixes(tmp_path: Path) -> None:
    engine = new_engine(tmp_path)
    tn = await open_tailnet(engine, make_cfg(prefixes={"v4": "100.64.0.0/10"}))
    u = await tn.create_user("alice")
    _, full = await tn.create_preauth_key(u.id, reusable=True)
    n = await tn.register_with_authkey(MK, NK, None, {"Hostname": "a"}, key=full)
    assert n.ipv6 is None
    assert await tn.backfill_node_ips() == []  # nothing to do under the same prefixes
    await tn.close()

    # v6 added to the config: the node gets an address, persisted across a restart.
    tn = await open_tailnet(engine, make_cfg())
    assert await tn.backfill_node_ips() == [f"assigned IPv6 fd7a:115c:a1e0::1 to Node({n.id}) a"]
    await tn.close()
    tn = await open_tailnet(engine, make_cfg())
    assert str(tn.get_node(n.id).ipv6) == "fd7a:115c:a1e0::1"
    await tn.close()

    # v4 removed: its address goes.
    tn = await open_tailnet(engine, make_cfg(prefixes={"v6": "fd7a:115c:a1e0::/48"}))
    assert await tn.backfill_node_ips() == [f"removing IPv4 100.64.0.1 from Node({n.id}) a"]
    assert tn.get_node(n.id).ipv4 is None
    await tn.close()


async def test_serialized_writes_run_one_at_a_time_and_survive_a_cancelled_caller(
        tmp_path: Path) -> None:
    tn, uid = await _setup(tmp_path)
    gen = tn.generation
    # Many concurrent creations: each commits alone, so names stay unique and every write
    # bumps the generation once.
    made = await asyncio.gather(*(tn.create_user(f"u{i}") for i in range(8)),
                                return_exceptions=True)
    assert all(not isinstance(u, BaseException) for u in made)
    assert tn.generation == gen + 8
    with pytest.raises(AlreadyExists):
        await tn.create_user("u0")
    assert tn.generation == gen + 8  # a refused write changes nothing
    # A caller that gives up mid-write does not stop it: memory and DB stay in step.
    task = asyncio.ensure_future(tn.rename_user(uid, "renamed"))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if tn.users[uid].name == "renamed":
            break
        await asyncio.sleep(0.01)
    assert tn.users[uid].name == "renamed"
    engine = tn.engine
    await tn.close()
    tn2 = await open_tailnet(engine)
    assert tn2.users[uid].name == "renamed"
    await tn2.close()


async def test_tagged_key_of_another_user_makes_a_new_node(tmp_path: Path) -> None:
    """Headscale's findExistingNodeForPAK: a key with an owner finds only that owner's node
    (or a tagged one); only a key without an owner converts the machine's user node."""
    tn, uid = await _setup(tmp_path)
    bob = await tn.create_user("bob")
    _, alices = await tn.create_preauth_key(uid, reusable=True)
    _, bobs_tagged = await tn.create_preauth_key(bob.id, reusable=True, tags=["tag:a"])
    _, ownerless = await tn.create_preauth_key(None, reusable=True, tags=["tag:b"])
    n = await tn.register_with_authkey(MK, NK, None, {"Hostname": "h"}, key=alices)
    m = await tn.register_with_authkey(MK, NK2, None, {"Hostname": "h"}, key=bobs_tagged)
    assert m.id != n.id and m.tags == ("tag:a",) and m.user_id is None
    assert tn.nodes[n.id].user_id == uid and not tn.nodes[n.id].tags
    # The machine now has a tagged node: the ownerless tagged key re-registers that one.
    o = await tn.register_with_authkey(MK, key(7), None, {"Hostname": "h"}, key=ownerless)
    assert o.id == m.id and len(tn.nodes) == 2
    # A machine with only a user node: the ownerless tagged key converts it in place.
    p = await tn.register_with_authkey(key(8), key(9), None, {"Hostname": "p"}, key=alices)
    q = await tn.register_with_authkey(key(8), key(10), None, {"Hostname": "p"}, key=ownerless)
    assert q.id == p.id and q.tags == ("tag:b",) and q.user_id is None
    await tn.close()
