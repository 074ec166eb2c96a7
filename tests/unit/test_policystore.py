"""One policy store: the running server, the API and the CLI's bypass agree on the current
policy, a set compiles once, and file mode refuses writes with one exception type."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, update
from sqlmodel import Session, select

from pyheadscale.control import policyctl
from pyheadscale.control.dispatch import ControlPlane
from pyheadscale.db import models as db
from pyheadscale.policy import PolicyError
from pyheadscale.state.policystore import (
    PolicyNotFound,
    PolicyStore,
    PolicyUpdateDisabled,
    insert,
    load_latest,
)
from tests.unit._statefix import api_client, make_cfg, new_engine, open_control, open_tailnet

OLD = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}'
NEW = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:443"]}]}'


def _soft_delete_newest(engine: Engine) -> None:
    with Session(engine) as s, s.begin():
        newest = s.exec(select(func.max(db.Policy.id))).one()
        s.execute(update(db.Policy).where(db.Policy.id == newest)  # type: ignore[arg-type]
                  .values(deleted_at=datetime.now(UTC)))


async def test_server_and_api_agree_when_the_newest_row_is_soft_deleted(
        tmp_path: Path) -> None:
    engine = new_engine(tmp_path)
    insert(engine, OLD)
    insert(engine, NEW)
    _soft_delete_newest(engine)
    cfg = make_cfg(policy={"mode": "database"})
    tn = await open_tailnet(engine, cfg)
    cp = ControlPlane(cfg, tn, engine, None)
    await cp.policy.load()
    assert cp.policy.text == OLD  # what runs
    assert (await cp.policy.get()).data == OLD  # what `policy get` shows
    assert load_latest(engine).data == OLD  # what the CLI's bypass reads
    await tn.close()


async def test_api_set_compiles_once_stores_and_swaps(control: ControlPlane,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    real = policyctl.PolicyManager

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, text: str, *a: Any, **kw: Any) -> None:
            built.append(text)
            super().__init__(text, *a, **kw)

    monkeypatch.setattr(policyctl, "PolicyManager", Counting)
    async with await api_client(control) as client:
        resp = await client.put("/api/v1/policy", json={"policy": NEW})
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["policy"] == NEW
        assert built == [NEW]
        assert control.policy.text == NEW and control.policy.manager is not None
        got = await (await client.get("/api/v1/policy")).json()
        assert got["policy"] == NEW and got["updatedAt"]


async def test_rejected_policy_is_neither_stored_nor_run(control: ControlPlane) -> None:
    await control.policy.set(OLD)
    running = control.policy.manager
    with pytest.raises(PolicyError):
        await control.policy.set('{"acls": [{"action": "accept", "src": ["group:nope"], '
                                 '"dst": ["*:*"]}]}')
    assert control.policy.manager is running and control.policy.text == OLD
    assert load_latest(control.tailnet.engine).data == OLD


async def test_file_mode_refuses_writes_with_the_one_exception(tmp_path: Path) -> None:
    path = tmp_path / "policy.hujson"
    path.write_text(OLD)
    cp = await open_control(tmp_path, policy={"mode": "file", "path": str(path)})
    try:
        with pytest.raises(PolicyUpdateDisabled,
                           match="update is disabled for modes other than 'database'"):
            await cp.policy.set(NEW)
        with pytest.raises(PolicyUpdateDisabled):
            PolicyStore(cp.cfg.policy, cp.tailnet.engine).put(NEW)
        assert (await cp.policy.get()).data == OLD
        assert cp.policy.text == OLD
    finally:
        await cp.tailnet.close()


def test_empty_store_means_no_policy(tmp_path: Path) -> None:
    engine = new_engine(tmp_path)
    store = PolicyStore(make_cfg(policy={"mode": "database"}).policy, engine)
    assert store.current() is None
    with pytest.raises(PolicyNotFound):
        store.get()
    assert PolicyStore(make_cfg().policy, engine).current() is None  # file mode, no path


async def test_a_new_policy_is_prepared_while_the_window_waits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluation index every session's frame reads is built in the batching window's
    idle wait, not by the first session once the window closed."""
    from pyheadscale.policy import PolicyManager

    prepared: list[PolicyManager] = []
    monkeypatch.setattr(PolicyManager, "prepare", lambda self: prepared.append(self))
    cp = await open_control(tmp_path, tuning={"batch_change_delay": "100ms"})
    try:
        bus = cp.tailnet.bus
        before = bus.flushes
        await cp.policy.set(OLD)
        await asyncio.sleep(0)
        assert prepared == []  # no map session: no frame would read it
        bus.subscribe(1)
        async with asyncio.timeout(10):  # that window is over (however late its timer ran)
            while bus.flushes == before:  # noqa: ASYNC110 (polls state)
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.25)  # and a quiet spell after it, longer than the window
        flushes = bus.flushes
        await cp.policy.set(NEW)
        assert prepared == []  # not inside the write
        await asyncio.sleep(0)
        assert prepared == [cp.policy.manager] and bus.flushes == flushes
    finally:
        await cp.tailnet.close()
