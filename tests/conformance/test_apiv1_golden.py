"""Replay every Headscale /api/v1 golden against our API (PYHEADSCALE_APIV1_GOLDENS, see
data.py).

Each case gets a fresh server state (empty SQLite DB, database policy mode, no address
ranges, as the goldens were recorded), the seed its index entry describes, then the request.
Status must match exactly; 2xx bodies must equal the golden after replacing RFC 3339 UTC
timestamps and masked keys / key material in *our* body (their format is thereby checked);
error bodies must have the {code, message, details} shape with the gRPC code grpc-gateway
pairs with that status.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from pyheadscale.control.dispatch import ControlPlane
from tests.conformance.data import conformance_dir
from tests.unit._apicodes import assert_error_body
from tests.unit._statefix import api_client, key, open_control

GOLDEN = conformance_dir("PYHEADSCALE_APIV1_GOLDENS", "apiv1")
INDEX = json.loads((GOLDEN / "index.json").read_text())["cases"]
ZERO = datetime(1, 1, 1, tzinfo=UTC)
ALLOW_ALL = '{"acls":[{"action":"accept","src":["*"],"dst":["*:*"]}]}'

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
SECRET = re.compile(r"^(hskey-(auth|api)-[0-9a-f]{12}-\*\*\*|(mkey|nodekey|discokey):[0-9a-f]{64})$")


class NoAddresses:
    """IPAM with no tailnet ranges configured: nodes get no addresses (as in the goldens)."""

    prefix4 = None
    prefix6 = None

    def allocate(self) -> tuple[None, None]:
        return None, None

    def release(self, *a: Any) -> None:
        pass

    def reserve(self, a: Any) -> bool:
        return True


def normalise(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: normalise(x) for k, x in v.items()}
    if isinstance(v, list):
        return [normalise(x) for x in v]
    if isinstance(v, str):
        if TS.match(v):
            return "<timestamp>"
        if SECRET.match(v):
            return "<secret>"
    return v


class Env:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.tn = cp.tailnet
        self.subst: dict[str, str] = {}

    async def user(self, name: str) -> int:
        return (await self.tn.create_user(name)).id

    async def node_via_key(self, user: str, host: str, n: int, tags: tuple[str, ...] = ()
                           ) -> None:
        u = self.tn.user_by_name(user) or await self.tn.create_user(user)
        _, full = await self.tn.create_preauth_key(u.id, tags=tags)
        await self.tn.register_with_authkey(key(n), key(n + 100), None, {"Hostname": host},
                                            key=full)

    async def api_key(self, expiration: datetime | None = None) -> None:
        a, _ = await self.tn.create_api_key(expiration)
        self.subst["<key id>"] = str(a.id)
        self.subst["hskey-api-<prefix>-***"] = f"hskey-api-{a.prefix}-***"

    def pending(self, host: str) -> None:
        p = self.cp.pending.add(machine_key=key(7), node_key=key(8),
                                hostinfo={"Hostname": host}, expiry=None, ephemeral=False,
                                capver=113)
        self.subst["<auth id>"] = p.auth_id

    async def seed(self, seed: str) -> None:
        tn = self.tn
        self.subst["<well-formed auth id>"] = "hskey-authreq-" + "ab" * 12
        match seed:
            case "nothing" | "nothing (database policy mode)" | \
                    "no policy stored (database policy mode)":
                pass
            case "user alice" | "user alice (id 1)" | "user alice; no pending registration":
                await self.user("alice")
            case "user dup":
                await self.user("dup")
            case "users alice, bob":
                await self.user("alice")
                await self.user("bob")
            case "users alice, bob, carol":
                for n in ("alice", "bob", "carol"):
                    await self.user(n)
            case "node-a (alice)" | "user alice, node node-a registered with a single-use " \
                    "pre-auth key of alice":
                await self.node_via_key("alice", "node-a", 1)
            case "node-a (alice); policy has no tagOwners":
                await self.node_via_key("alice", "node-a", 1)
                await self.cp.policy.set(ALLOW_ALL)
            case "node-a (alice) then node-b (bob), each via its user's pre-auth key" | \
                    "node-a (alice), node-b (bob)":
                await self.node_via_key("alice", "node-a", 1)
                await self.node_via_key("bob", "node-b", 2)
            case "user bob, node node-b registered with a pre-auth key of bob carrying " \
                    "tag:initial":
                await self.node_via_key("bob", "node-b", 2, tags=("tag:initial",))
            case "one API key" | "one API key; prefix in the path AND id in the query" | \
                    "one API key; prefix is the masked display form" | \
                    "one API key created without expiration (expiration and lastSeen must " \
                    "be JSON null)":
                await self.api_key()
            case "two API keys created without expiration":
                await self.api_key()
                await self.api_key()
            case "one API key whose expiration is the zero time (must render as " \
                    "0001-01-01T00:00:00Z, not null)":
                await self.api_key(ZERO)
            case 'policy {"acls":[{"action":"accept","src":["*"],"dst":["*:*"]}]} stored':
                await self.cp.policy.set(ALLOW_ALL)
            case "user alice; a pending interactive registration under <auth id> for " \
                    "hostname regnode":
                await self.user("alice")
                self.pending("regnode")
            case "user alice; a pending registration under <auth id> for hostname " \
                    "registered-node":
                await self.user("alice")
                self.pending("registered-node")
            case "user alice; pre-auth key 1: alice, reusable, zero-time expiration; " \
                    "pre-auth key 2: no user, ephemeral, tag:test, zero-time expiration":
                uid = await self.user("alice")
                await tn.create_preauth_key(uid, reusable=True, expiration=ZERO)
                await tn.create_preauth_key(None, ephemeral=True, expiration=ZERO,
                                            tags=["tag:test"])
            case _:
                raise AssertionError(f"no seed for {seed!r}")

    def fill(self, v: Any) -> Any:
        if isinstance(v, str):
            for k, s in self.subst.items():
                v = v.replace(k, s)
            return v
        if isinstance(v, dict):
            return {k: self.fill(x) for k, x in v.items()}
        if isinstance(v, list):
            return [self.fill(x) for x in v]
        return v


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Env, TestClient]]:
    cp = await open_control(tmp_path)
    cp.tailnet.ipam = NoAddresses()  # type: ignore[assignment]
    client = await api_client(cp)
    try:
        yield Env(cp), client
    finally:
        await client.close()
        await cp.tailnet.close()


def test_every_golden_file_is_indexed() -> None:
    files = {p.name for p in GOLDEN.glob("TestAPIV1*.json")}
    assert files == {c["file"] for c in INDEX}
    assert len(files) == 80


@pytest.mark.parametrize("case", INDEX, ids=[c["file"][len("TestAPIV1"):-len(".json")]
                                             for c in INDEX])
async def test_golden(case: dict[str, Any], env: tuple[Env, TestClient]) -> None:
    e, client = env
    golden = json.loads((GOLDEN / case["file"]).read_text())
    assert golden["status"] == case["status"]
    await e.seed(case["seed"])
    kw: dict[str, Any] = {"headers": {"Content-Type": "application/json"}}
    if case["body"] is not None:
        kw["data"] = json.dumps(e.fill(case["body"]))
    resp = await client.request(case["method"], e.fill(case["path"]), **kw)
    text = await resp.text()
    assert resp.status == golden["status"], text
    body = json.loads(text)
    if 200 <= resp.status < 300:
        assert normalise(body) == golden["body"]
    else:
        assert golden["body"] is None
        assert_error_body(body, resp.status)
