"""Write-behind of what map requests and session starts report (state/online.py): sessions
learn it at once, the database in one batched transaction, and nothing is lost at shutdown."""

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from pyheadscale.auth import preauthkeys as pk
from pyheadscale.state import online
from pyheadscale.state.changes import ChangeKind, Field
from pyheadscale.state.errors import InvalidAuthKey
from pyheadscale.state.tailnet import Tailnet
from tests.unit._statefix import key, new_engine, open_tailnet


def _row(engine: Engine, node_id: int) -> dict[str, Any]:
    with engine.connect() as c:
        r = c.execute(text("SELECT endpoints, host_info, hostname, given_name, last_seen "
                           "FROM nodes WHERE id = :i"), {"i": node_id}).mappings().one()
    return dict(r)


async def _nodes(tn: Tailnet, n: int) -> list[int]:
    u = await tn.create_user("alice")
    _, full = await tn.create_preauth_key(u.id, reusable=True)
    return [(await tn.register_with_authkey(key(10 + 2 * i), key(11 + 2 * i), None,
                                            {"Hostname": f"h{i}"}, key=full)).id
            for i in range(n)]


def _count_commits(tn: Tailnet) -> list[int]:
    calls: list[int] = []
    real = tn._commit

    async def counting(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        return await real(*a, **kw)

    tn._commit = counting  # type: ignore[method-assign]
    return calls


async def test_a_storm_of_map_requests_is_one_transaction(tmp_path: Path) -> None:
    engine = new_engine(tmp_path)
    tn = await open_tailnet(engine)
    ids = await _nodes(tn, 20)
    sub = tn.bus.subscribe(999)
    commits = _count_commits(tn)
    for i, nid in enumerate(ids):
        f = await tn.update_from_map_request(
            nid, endpoints=[f"192.0.2.{i + 1}:41641"],
            hostinfo={"Hostname": f"h{i}", "NetInfo": {"PreferredDERP": 2}})
        assert f == {Field.ENDPOINTS, Field.HOME_DERP}
        assert await tn.set_online(nid, True)
    # Memory and the sessions have it at once; the database not yet.
    assert tn.nodes[ids[3]].endpoints == ("192.0.2.4:41641",)
    kinds = {c.kind for c in await sub.__anext__()}
    assert {ChangeKind.NODE_PATCH, ChangeKind.NODE_ONLINE} <= kinds
    assert commits == []
    assert json.loads(_row(engine, ids[3])["endpoints"] or "[]") == []
    await asyncio.sleep(online.WRITE_BEHIND_S + 0.5)
    assert len(commits) == 1
    row = _row(engine, ids[3])
    assert json.loads(row["endpoints"]) == ["192.0.2.4:41641"]
    assert json.loads(row["host_info"])["NetInfo"] == {"PreferredDERP": 2}
    assert row["last_seen"] is not None
    assert tn.unsaved == {}
    await tn.close()


async def test_a_new_name_is_written_at_once(tmp_path: Path) -> None:
    engine = new_engine(tmp_path)
    tn = await open_tailnet(engine)
    [nid] = await _nodes(tn, 1)
    await tn.update_from_map_request(nid, endpoints=["192.0.2.1:1"])
    assert nid in tn.unsaved
    f = await tn.update_from_map_request(nid, hostinfo={"Hostname": "renamed"})
    assert Field.GIVEN_NAME in f
    row = _row(engine, nid)
    # The whole row went with the name (the endpoints waiting behind included).
    assert (row["hostname"], row["given_name"]) == ("renamed", "renamed")
    assert json.loads(row["endpoints"]) == ["192.0.2.1:1"]
    assert nid not in tn.unsaved
    await tn.close()


async def test_shutdown_writes_what_is_behind(tmp_path: Path) -> None:
    engine = new_engine(tmp_path)
    tn = await open_tailnet(engine)
    ids = await _nodes(tn, 3)
    for nid in ids:
        await tn.update_from_map_request(nid, endpoints=["198.51.100.7:41641"])
        await tn.set_online(nid, True)
        await tn.set_online(nid, False)
    seen = tn.nodes[ids[0]].last_seen
    await tn.close()  # well before WRITE_BEHIND_S
    tn2 = await open_tailnet(engine)
    for nid in ids:
        assert tn2.nodes[nid].endpoints == ("198.51.100.7:41641",)
    assert tn2.nodes[ids[0]].last_seen == seen
    await tn2.close()


async def test_a_storm_on_one_key_runs_bcrypt_once(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    tn = await open_tailnet(new_engine(tmp_path))
    u = await tn.create_user("alice")
    _, full = await tn.create_preauth_key(u.id, reusable=True)
    checks: list[str] = []
    real = pk.check_secret

    def counting(secret: str, hashed: bytes | None) -> bool:
        checks.append(secret)
        return real(secret, hashed)

    monkeypatch.setattr(pk, "check_secret", counting)
    nodes = await asyncio.gather(*(
        tn.register_with_authkey(key(100 + 2 * i), key(101 + 2 * i), None,
                                 {"Hostname": f"s{i}"}, key=full) for i in range(16)))
    assert len({n.id for n in nodes}) == 16
    assert len(checks) == 1
    # A wrong secret on the same prefix is still refused (and checked on its own).
    with pytest.raises(InvalidAuthKey):
        await tn.register_with_authkey(key(200), key(201), None, {"Hostname": "x"},
                                       key=full[:-4] + "zzzz")
    assert len(checks) == 2
    await tn.close()
