"""Pending interactive registrations are bounded and a flood cannot push out a waiting user."""

from __future__ import annotations

import contextlib

import pytest

from pyheadscale.auth.webflow import PendingRegistrations, RegistrationRefused, UnknownAuthID
from pyheadscale.ratelimit import TokenBuckets, source_key


def mk(i: int) -> bytes:
    return i.to_bytes(32, "big")


def table(**kw: int) -> PendingRegistrations:
    args = {"per_source": 4, "per_machine": 4, "hostinfo_budget": 1 << 20} | kw
    return PendingRegistrations(900, kw.pop("max_entries", 8), per_source=args["per_source"],
                                per_machine=args["per_machine"],
                                hostinfo_budget=args["hostinfo_budget"])


async def test_each_request_gets_its_own_url_and_one_machine_keeps_at_most_n() -> None:
    t = table(per_machine=3, per_source=100, max_entries=100)
    opened = [t.add(machine_key=mk(1), node_key=mk(10 + i), hostinfo={"Hostname": "a" * i},
                    source="s") for i in range(10)]
    assert len({p.auth_id for p in opened}) == 10  # a new URL every time
    # A flood from one machine key holds its newest three, nothing more.
    assert len(t) == 3 and [t.get(p.auth_id) for p in opened[-3:]] == opened[-3:]
    for gone in opened[:-3]:
        with pytest.raises(UnknownAuthID):
            t.get(gone.auth_id)
    assert t.bytes == sum(p.size for p in opened[-3:])
    assert t.newest(opened[-3]) is opened[-1]


async def test_a_machines_oldest_url_goes_even_when_waited_on() -> None:
    t = table(per_machine=2, per_source=100)
    old, mid = (t.add(machine_key=mk(1), node_key=mk(2), hostinfo={}, source="s")
                for _ in range(2))
    with t.waiting(old), t.waiting(mid):
        new = t.add(machine_key=mk(1), node_key=mk(3), hostinfo={}, source="s")
        assert len(t) == 2 and t.get(new.auth_id) is new and t.get(mid.auth_id) is mid
        with pytest.raises(UnknownAuthID):
            old.done.result()  # its waiter is told to start over


async def test_a_flood_from_many_machine_keys_meets_the_table_cap() -> None:
    t = table(per_machine=4, per_source=1000, max_entries=50)
    for i in range(400):
        for _ in range(3):
            t.add(machine_key=mk(i), node_key=mk(1), hostinfo={}, source="flood")
    assert len(t) == 50
    with pytest.raises(RegistrationRefused):  # and all of them waited on: refused
        with contextlib.ExitStack() as held:
            for p in t.list():
                held.enter_context(t.waiting(p))
            t.add(machine_key=mk(9999), node_key=mk(1), hostinfo={}, source="late")


async def test_completing_one_url_answers_and_closes_all_of_the_machines() -> None:
    t = table(per_machine=4, per_source=100)
    first = t.add(machine_key=mk(1), node_key=mk(10), hostinfo={"Hostname": "x"}, source="s")
    second = t.add(machine_key=mk(1), node_key=mk(11), hostinfo={"Hostname": "x"}, source="s")
    other = t.add(machine_key=mk(2), node_key=mk(12), hostinfo={}, source="s")
    with t.deciding(first.auth_id) as p:
        assert p is second  # the machine's newest request is the one registered
        with pytest.raises(UnknownAuthID):  # a second completion meanwhile: already used
            with t.deciding(second.auth_id):
                pass
    assert sorted(t.complete(first.auth_id, "node")) == sorted([first.auth_id, second.auth_id])
    assert first.done.result() == second.done.result() == "node"
    assert t.list() == [other]
    for used in (first, second):
        with pytest.raises(UnknownAuthID):
            t.get(used.auth_id)
    a = t.add(machine_key=mk(3), node_key=mk(1), hostinfo={}, source="s")
    b = t.add(machine_key=mk(3), node_key=mk(2), hostinfo={}, source="s")
    t.reject(b.auth_id, "no")
    for p in (a, b):
        with pytest.raises(PermissionError):
            p.done.result()
    assert t.list() == [other]


async def test_a_machines_urls_are_ordered_by_when_they_were_opened() -> None:
    t = table(per_machine=2, per_source=100)
    # Mirrored rows may arrive out of order: the one opened last is the machine's newest.
    late = t.add("hskey-authreq-b", machine_key=mk(1), node_key=mk(3), hostinfo={},
                 opened=200.0)
    early = t.add("hskey-authreq-a", machine_key=mk(1), node_key=mk(2), hostinfo={},
                  opened=100.0)
    assert t.newest(early) is late and t.newest(late) is late
    # Full, a row older than both is the one beyond the bound: refused, nothing closed.
    with pytest.raises(RegistrationRefused):
        t.add("hskey-authreq-c", machine_key=mk(1), node_key=mk(1), hostinfo={}, opened=50.0)
    assert t.list() == [late, early]
    # A newer one closes the oldest opened, not the first added.
    newer = t.add(machine_key=mk(1), node_key=mk(4), hostinfo={}, source="s")
    assert t.list() == [late, newer] and t.newest(late) is newer


async def test_no_url_of_a_machine_closes_while_its_login_is_decided() -> None:
    t = table(per_machine=2, per_source=100)
    first, second = (t.add(machine_key=mk(1), node_key=mk(10 + i), hostinfo={}, source="s")
                     for i in range(2))
    with t.deciding(first.auth_id) as p:
        assert p is second
        with pytest.raises(RegistrationRefused):  # it would close what the decision answers
            t.add(machine_key=mk(1), node_key=mk(12), hostinfo={}, source="s")
        assert t.complete(p.auth_id, "node") == [first.auth_id, second.auth_id]
    assert first.done.result() == second.done.result() == "node" and len(t) == 0


async def test_a_refused_request_closes_none_of_the_machines_urls() -> None:
    """The machine's oldest URL makes room for a newer one only once that one is admitted:
    a request refused by another check costs the machine nothing."""
    t = table(per_machine=2, per_source=2, max_entries=100, hostinfo_budget=1000)
    old, new = (t.add(machine_key=mk(1), node_key=mk(10 + i), hostinfo={}, source="a")
                for i in range(2))
    with pytest.raises(RegistrationRefused):  # too large for the table, whatever goes
        t.add(machine_key=mk(1), node_key=mk(12), hostinfo={"Hostname": "h" * 2000},
              source="a")
    busy = [t.add(machine_key=mk(20 + i), node_key=mk(1), hostinfo={}, source="b")
            for i in range(2)]
    with t.waiting(busy[0]), t.waiting(busy[1]):
        with pytest.raises(RegistrationRefused):  # its address is over quota, all waited on
            t.add(machine_key=mk(1), node_key=mk(12), hostinfo={}, source="b")
    assert t.list() == [old, new, *busy] and not old.done.done()
    newest = t.add(machine_key=mk(1), node_key=mk(12), hostinfo={}, source="a")
    assert t.list() == [new, *busy, newest] and t.newest(new) is newest
    with pytest.raises(UnknownAuthID):
        old.done.result()


async def test_a_source_over_its_quota_loses_its_own_oldest_idle_entry() -> None:
    t = table(per_source=2)
    other = t.add(machine_key=mk(100), node_key=mk(1), hostinfo={}, source="user")
    first = t.add(machine_key=mk(1), node_key=mk(1), hostinfo={}, source="flood")
    t.add(machine_key=mk(2), node_key=mk(1), hostinfo={}, source="flood")
    t.add(machine_key=mk(3), node_key=mk(1), hostinfo={}, source="flood")
    with pytest.raises(UnknownAuthID):
        t.get(first.auth_id)
    assert t.get(other.auth_id) is other and len(t) == 3
    with pytest.raises(UnknownAuthID):
        first.done.result()


async def test_waiting_entries_are_never_evicted_by_newcomers() -> None:
    t = table(max_entries=4, per_source=100)
    user = t.add(machine_key=mk(100), node_key=mk(1), hostinfo={"Hostname": "me"}, source="u")
    with t.waiting(user):
        for i in range(50):
            t.add(machine_key=mk(i), node_key=mk(1), hostinfo={}, source="flood")
        assert t.get(user.auth_id) is user and len(t) == 4
        flood_waiters = [t.add(machine_key=mk(200 + i), node_key=mk(1), hostinfo={},
                               source="flood") for i in range(3)]
        with t.waiting(flood_waiters[0]), t.waiting(flood_waiters[1]), \
                t.waiting(flood_waiters[2]):
            with pytest.raises(RegistrationRefused):
                t.add(machine_key=mk(300), node_key=mk(1), hostinfo={}, source="late")
    assert t.get(user.auth_id) is user


async def test_hostinfo_bytes_are_budgeted() -> None:
    t = table(hostinfo_budget=1000, per_source=100, max_entries=100)
    big = {"Hostname": "h" * 200}
    for i in range(20):
        t.add(machine_key=mk(i), node_key=mk(1), hostinfo=big, source="s")
    assert t.bytes <= 1000 and len(t) == 1000 // 215


async def test_complete_and_reject_free_the_slot() -> None:
    t = table(per_source=1)
    p = t.add(machine_key=mk(1), node_key=mk(1), hostinfo={"Hostname": "x"}, source="s")
    t.complete(p.auth_id, "node")
    assert p.done.result() == "node" and len(t) == 0 and t.bytes == 0
    q = t.add(machine_key=mk(2), node_key=mk(1), hostinfo={}, source="s")
    t.reject(q.auth_id, "no")
    assert len(t) == 0
    t.add(machine_key=mk(3), node_key=mk(1), hostinfo={}, source="s")


def test_token_buckets() -> None:
    now = [0.0]
    b = TokenBuckets(rate=2, burst=3, max_keys=2, clock=lambda: now[0])
    assert [b.allow("a") for _ in range(4)] == [True, True, True, False]
    now[0] = 0.5
    assert b.allow("a") and not b.allow("a")
    b.allow("b")
    b.allow("c")  # "a" is forgotten: at most two keys are kept
    assert len(b) == 2 and b.allow("a")


def test_source_keys_group_ipv6_by_64() -> None:
    assert source_key("192.0.2.7") == "192.0.2.7"
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:ffff::9")
    assert source_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_key(None) == ""


async def test_a_url_opened_while_the_login_is_decided_stays_open() -> None:
    """A new `tailscale up` (a new node key) while the decision awaits the database is a
    later login: the decision answers and closes the URLs it started with only."""
    t = table(per_machine=4, per_source=100)
    first = t.add(machine_key=mk(1), node_key=mk(10), hostinfo={}, source="s")
    with t.deciding(first.auth_id) as p:
        later = t.add(machine_key=mk(1), node_key=mk(11), hostinfo={}, source="s")
        assert t.complete(p.auth_id, "node") == [first.auth_id]
    assert first.done.result() == "node"
    assert t.list() == [later] and not later.done.done()
    # Rejected the same way: the refusal reaches only the login it decided.
    with t.deciding(later.auth_id) as p:
        newer = t.add(machine_key=mk(1), node_key=mk(12), hostinfo={}, source="s")
        assert t.reject(p.auth_id, "no") == [later.auth_id]
    assert t.list() == [newer] and not newer.done.done()
    # A newer URL rejected while the older login is decided: the decision keeps its own.
    with t.deciding(newer.auth_id) as p:
        newest = t.add(machine_key=mk(1), node_key=mk(13), hostinfo={}, source="s")
        assert t.reject(newest.auth_id, "no") == [newest.auth_id]
        assert t.complete(p.auth_id, "node") == [newer.auth_id]
    assert newer.done.result() == "node" and len(t) == 0


async def test_making_room_never_evicts_a_url_whose_login_is_decided() -> None:
    t = table(per_machine=4, per_source=100, max_entries=3)
    first, second = (t.add(machine_key=mk(1), node_key=mk(10 + i), hostinfo={}, source="s")
                     for i in range(2))
    other = t.add(machine_key=mk(2), node_key=mk(12), hostinfo={}, source="s")
    with t.deciding(first.auth_id) as p:
        assert p is second
        newcomer = t.add(machine_key=mk(3), node_key=mk(13), hostinfo={}, source="s")
        with t.waiting(newcomer), pytest.raises(RegistrationRefused):
            # Only the decided machine's URLs are idle now.
            t.add(machine_key=mk(4), node_key=mk(14), hostinfo={}, source="s")
        assert t.complete(p.auth_id, "node") == [first.auth_id, second.auth_id]
    assert second.done.result() == "node"
    assert t.list() == [newcomer]
    with pytest.raises(UnknownAuthID):
        other.done.result()  # the idle URL of another machine made the room


async def test_replacing_an_auth_id_closes_it_only_once_the_new_entry_is_admitted() -> None:
    t = table(per_machine=4, per_source=100, hostinfo_budget=1000)
    old = t.add("hskey-authreq-x", machine_key=mk(1), node_key=mk(10), hostinfo={},
                source="s")
    with pytest.raises(RegistrationRefused):
        t.add("hskey-authreq-x", machine_key=mk(1), node_key=mk(11),
              hostinfo={"Hostname": "h" * 2000}, source="s")
    assert t.list() == [old] and not old.done.done()
    new = t.add("hskey-authreq-x", machine_key=mk(1), node_key=mk(11), hostinfo={},
                source="s")
    assert t.list() == [new] and t.bytes == new.size
    with pytest.raises(UnknownAuthID):
        old.done.result()
