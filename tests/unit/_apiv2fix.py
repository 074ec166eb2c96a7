"""A live /api/v2 (and /api/v1) on a real migrated SQLite database, for the v2 tests."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pyheadscale.api import add_api_routes
from pyheadscale.api.v2 import Settings, V2Deps, add_v2_routes
from pyheadscale.control.dispatch import ControlPlane
from pyheadscale.state.oauth import OAuthStore
from tests.unit._statefix import open_control

POLICY = ('{"tagOwners": {"tag:ci": ["alice@"], "tag:prod": ["alice@"], '
          '"tag:k8s-operator": [], "tag:k8s": ["tag:k8s-operator"], "tag:a": [], "tag:b": []},'
          ' "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}')


@dataclass
class V2Env:
    client: TestClient
    cp: ControlPlane
    deps: V2Deps
    admin: str  # an admin API key owned by alice
    alice: int  # alice's user id
    _keys: dict[tuple[str, ...], str] = field(default_factory=dict)

    async def call(self, method: str, path: str, cred: str | None = None,
                   basic: bool = False, **kw: Any) -> tuple[int, Any]:
        headers = dict(kw.pop("headers", {}))
        if cred:
            headers["Authorization"] = ("Basic " + base64.b64encode(f"{cred}:".encode())
                                        .decode()) if basic else f"Bearer {cred}"
        resp = await self.client.request(method, path, headers=headers, **kw)
        raw = await resp.read()
        try:
            body: Any = await resp.json(content_type=None) if raw.strip() else None
        except ValueError:
            body = raw.decode()
        return resp.status, body

    async def node(self, n: int, hostname: str, tags: list[str] | None = None) -> int:
        """Register node number n (its keys derive from n) with a reusable key."""
        tn = self.deps.tailnet
        wanted = tuple(tags or ())
        if wanted not in self._keys:
            _, self._keys[wanted] = await tn.create_preauth_key(
                None if wanted else self.alice, reusable=True, tags=wanted)
        node = await tn.register_with_authkey(
            n.to_bytes(31, "big") + b"\x02", n.to_bytes(31, "big") + b"\x01", None,
            {"Hostname": hostname, "OS": "linux", "IPNVersion": "1.92.5",
             "RoutableIPs": ["10.1.0.0/24", "0.0.0.0/0", "::/0"]}, key=self._keys[wanted])
        return node.id

    async def client_secret(self, scopes: list[str], tags: list[str] | None = None) -> str:
        status, body = await self.call("POST", "/api/v2/tailnet/-/keys", self.admin, json={
            "keyType": "client", "scopes": scopes, "tags": tags or ["tag:ci"]})
        assert status == 200, body
        return str(body["key"])

    async def token(self, scopes: list[str], tags: list[str] | None = None,
                    **form: str) -> str:
        secret = await self.client_secret(scopes, tags)
        resp = await self.client.post("/api/v2/oauth/token", data={
            "grant_type": "client_credentials", "client_secret": secret, **form})
        body = await resp.json()
        assert resp.status == 200, body
        return str(body["access_token"])


@asynccontextmanager
async def v2_env(tmp: Path, *, trusted: bool = False, policy: str | None = POLICY,
                 **cfg_over: Any) -> AsyncIterator[V2Env]:
    cp = await open_control(tmp, **cfg_over)
    cfg, tn = cp.cfg, cp.tailnet
    if policy is not None:
        await cp.policy.set(policy)
    deps = V2Deps(tailnet=tn, oauth=await OAuthStore.load(tn.engine, tn),
                  policy=cp.policy, settings=Settings.from_config(cfg))
    app = web.Application(client_max_size=2 << 20)
    add_api_routes(app, cp.admin, trusted=trusted)
    add_v2_routes(app, deps, trusted=trusted)
    client = TestClient(TestServer(app))
    await client.start_server()
    alice = await tn.create_user("alice", email="alice@example.com")
    _, admin = await tn.create_api_key(user_id=alice.id)
    try:
        yield V2Env(client, cp, deps, admin, alice.id)
    finally:
        await client.close()
        await tn.close()
