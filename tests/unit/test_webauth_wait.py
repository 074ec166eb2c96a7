"""A client waiting on its login URL (the Followup register request) while that URL expires."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from pyheadscale import tailcfg
from pyheadscale.control.dispatch import ControlPlane
from pyheadscale.control.types import ControlRequest
from pyheadscale.tailcfg import KeyKind, encode_key
from tests.unit._statefix import key, open_control

EXPIRES_S = 0.3


class Answer:
    """The response side of one register request, kept for the test to read."""

    def __init__(self) -> None:
        self.status = 0
        self.body = b""
        self.closed = False

    async def start(self, status: int, headers: list[tuple[str, str]] | None = None) -> None:
        self.status = status

    async def write(self, data: bytes) -> None:
        self.body += data

    async def end(self, data: bytes = b"") -> None:
        self.body += data
        self.closed = True

    def json(self) -> Any:
        return orjson.loads(self.body)


@pytest.fixture
async def cp(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    cp = await open_control(tmp_path)
    cp.pending.expiration_s = EXPIRES_S
    try:
        yield cp
    finally:
        await cp.tailnet.close()


async def follow_up(cp: ControlPlane, auth_id: str, node_key: bytes) -> Answer:
    rr = tailcfg.parse_register_request({
        "Version": 113, "NodeKey": encode_key(KeyKind.NODE, node_key),
        "Followup": cp.webflow.auth_url(auth_id), "Hostinfo": {"Hostname": "laptop"}})
    req = ControlRequest(method="POST", path="/machine/register", query="", headers={},
                         body=b"", machine_key=key(1), capver=113, conn_id=1)
    resp = Answer()
    await cp.webflow.handle(req, rr, resp)
    return resp


async def test_expiring_while_the_login_is_decided_gets_the_decision(cp: ControlPlane) -> None:
    """The decision (one database write) outlasts the URL: the waiting client still gets its
    node, not a new URL for a login that just went through, nor a refusal."""
    user = await cp.tailnet.create_user("alice")
    p = cp.pending.add(machine_key=key(1), node_key=key(2), hostinfo={"Hostname": "laptop"})
    waiter = asyncio.create_task(follow_up(cp, p.auth_id, key(2)))
    await asyncio.sleep(0.05)
    with cp.pending.deciding(p.auth_id) as newest:
        await asyncio.sleep(2 * EXPIRES_S)  # a slow database: the URL expires meanwhile
        assert not waiter.done()
        # Anything that sweeps expired URLs meanwhile (here a listing) leaves this one.
        assert cp.pending.list() == [newest]
        node = await cp.tailnet.register_for_user(key(1), newest.node_key, user.id,
                                                  newest.hostinfo)
        cp.pending.complete(newest.auth_id, node)
    got = await asyncio.wait_for(waiter, 5)
    assert got.status == 200
    assert got.json()["MachineAuthorized"] is True and got.json()["AuthURL"] == ""
    assert len(cp.pending) == 0


async def test_a_decision_that_settles_nothing_leaves_a_fresh_url(cp: ControlPlane) -> None:
    """The decision failed without answering (the registration raised): once it ended, the
    expired URL's client gets a fresh AuthURL, as for any expired URL."""
    p = cp.pending.add(machine_key=key(1), node_key=key(2), hostinfo={"Hostname": "laptop"})
    waiter = asyncio.create_task(follow_up(cp, p.auth_id, key(2)))
    await asyncio.sleep(0.05)
    with pytest.raises(RuntimeError), cp.pending.deciding(p.auth_id):
        await asyncio.sleep(2 * EXPIRES_S)
        assert not waiter.done()  # answered once the decision ended, not before
        raise RuntimeError("database gone")
    got = await asyncio.wait_for(waiter, 5)
    assert got.status == 200
    fresh = got.json()["AuthURL"]
    assert fresh.startswith(cp.webflow.auth_url("")) and not fresh.endswith(p.auth_id)
    assert [q.auth_id for q in cp.pending.list()] == [fresh.rsplit("/", 1)[1]]
