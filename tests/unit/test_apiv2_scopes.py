"""The OAuth scope matrix of /api/v2: every operation against no credential, a token of every
scope in the vocabulary (so wrong scopes and read scopes on writes), the right scope and an
admin API key; token minting narrowed by scope and by tag; expired and revoked credentials."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from pyheadscale.auth.oauth import KNOWN_SCOPES, Scope, grants
from tests.unit._apiv2fix import POLICY, V2Env, v2_env


@dataclass
class Op:
    name: str
    method: str
    path: str  # {dev} and {key} are filled in per call
    need: Scope
    body: Any = None
    ok: int = 200  # the status with the right scope and a valid request
    text: bool = False  # body is a policy document


OPS = [
    Op("getDevice", "GET", "/api/v2/device/{dev}", Scope.DEVICES_CORE_READ),
    Op("listDevices", "GET", "/api/v2/tailnet/-/devices", Scope.DEVICES_CORE_READ),
    Op("deleteDevice", "DELETE", "/api/v2/device/{dev}", Scope.DEVICES_CORE),
    Op("authorizeDevice", "POST", "/api/v2/device/{dev}/authorized", Scope.DEVICES_CORE,
       {"authorized": True}),
    Op("setDeviceName", "POST", "/api/v2/device/{dev}/name", Scope.DEVICES_CORE,
       {"name": "renamed"}),
    Op("setDeviceTags", "POST", "/api/v2/device/{dev}/tags", Scope.DEVICES_CORE,
       {"tags": ["tag:ci"]}),
    Op("setDeviceKey", "POST", "/api/v2/device/{dev}/key", Scope.DEVICES_CORE,
       {"keyExpiryDisabled": True}),
    Op("getDeviceRoutes", "GET", "/api/v2/device/{dev}/routes", Scope.DEVICES_ROUTES_READ),
    Op("setDeviceRoutes", "POST", "/api/v2/device/{dev}/routes", Scope.DEVICES_ROUTES,
       {"routes": ["10.1.0.0/24"]}),
    Op("getACL", "GET", "/api/v2/tailnet/-/acl", Scope.POLICY_FILE_READ),
    Op("setACL", "POST", "/api/v2/tailnet/-/acl", Scope.POLICY_FILE, None, text=True),
    Op("validateACL", "POST", "/api/v2/tailnet/-/acl/validate", Scope.POLICY_FILE_READ,
       None, text=True),
    Op("getTailnetSettings", "GET", "/api/v2/tailnet/-/settings", Scope.FEATURE_SETTINGS_READ),
    Op("updateTailnetSettings", "PATCH", "/api/v2/tailnet/-/settings", Scope.FEATURE_SETTINGS,
       {"devicesApprovalOn": True}, ok=501),
    Op("getUser", "GET", "/api/v2/users/{user}", Scope.USERS_READ),
    Op("listUsers", "GET", "/api/v2/tailnet/-/users", Scope.USERS_READ),
    Op("createKey(auth)", "POST", "/api/v2/tailnet/-/keys", Scope.AUTH_KEYS,
       {"capabilities": {"devices": {"create": {"tags": ["tag:ci"]}}}}),
    Op("createKey(client)", "POST", "/api/v2/tailnet/-/keys", Scope.OAUTH_KEYS,
       {"keyType": "client", "scopes": ["oauth_keys:read"], "tags": []}),
    Op("getKey(auth)", "GET", "/api/v2/tailnet/-/keys/{key}", Scope.AUTH_KEYS_READ),
    Op("getKey(client)", "GET", "/api/v2/tailnet/-/keys/{client}", Scope.OAUTH_KEYS_READ),
    Op("deleteKey(auth)", "DELETE", "/api/v2/tailnet/-/keys/{key}", Scope.AUTH_KEYS),
    Op("deleteKey(client)", "DELETE", "/api/v2/tailnet/-/keys/{client}", Scope.OAUTH_KEYS),
    Op("setOAuthClient", "PUT", "/api/v2/tailnet/-/keys/{client}", Scope.OAUTH_KEYS,
       {"keyType": "client", "scopes": ["oauth_keys:read"]}),
]


class Fixture:
    """Targets for the calls; a destructive operation gets a fresh one every time."""

    def __init__(self, env: V2Env) -> None:
        self.env = env
        self.n = 10
        self.dev = self.key = 0
        self.client = ""

    async def call(self, op: Op, cred: str | None) -> tuple[int, Any]:
        e = self.env
        if not self.dev or op.name == "deleteDevice":
            self.n += 1
            self.dev = await e.node(self.n, f"node{self.n}")
        if not self.key or op.name == "deleteKey(auth)":
            self.key = (await e.deps.tailnet.create_preauth_key(None, tags=["tag:ci"]))[0].id
        if not self.client or op.name == "deleteKey(client)":
            self.client = (await e.deps.oauth.create_client(["users:read"], []))[0].client_id
        path = op.path.format(dev=self.dev, key=self.key, client=self.client, user=e.alice)
        kw: dict[str, Any] = {}
        if op.text:
            kw["data"] = POLICY.encode()
        elif op.body is not None:
            kw["json"] = op.body
        result = await e.call(op.method, path, cred, **kw)
        if op.method == "DELETE":  # whatever was deleted is replaced for the next call
            self.dev = self.key = 0
            self.client = ""
        return result


def scope_denied(status: int, body: Any) -> bool:
    return status == 403 and "missing the required scope" in str(body)


async def with_matrix(tmp: Path, fn: Callable[[Fixture, dict[str, str]], Awaitable[None]]
                      ) -> None:
    async with v2_env(tmp) as env:
        tokens = {s: await env.token([s], ["tag:ci"]) for s in sorted(KNOWN_SCOPES)}
        await fn(Fixture(env), tokens)


async def test_every_operation_against_every_scope(tmp_path: Path) -> None:
    async def run(fx: Fixture, tokens: dict[str, str]) -> None:
        wrong = []
        for op in OPS:
            for s, tok in tokens.items():
                status, body = await fx.call(op, tok)
                allowed = grants([s], op.need)
                # Key operations check their own scope and answer a token without it the
                # same way as for an id that does not exist, so no id leaks.
                denied = scope_denied(status, body) or (
                    "Key" in op.name and "create" not in op.name and status == 404)
                if allowed == denied or (allowed and status != op.ok):
                    wrong.append((op.name, s, status, body))
        assert wrong == []

    await with_matrix(tmp_path, run)


async def test_no_credential_read_scope_on_write_right_scope_admin(tmp_path: Path) -> None:
    async def run(fx: Fixture, tokens: dict[str, str]) -> None:
        e = fx.env
        for op in OPS:
            status, body = await fx.call(op, None)
            assert (status, body) == (401, {"message": "unauthorized", "status": 401}), op
            status, body = await fx.call(op, "hskey-api-000000000000-" + "0" * 64)
            assert status == 401, op
            if not op.need.is_read:
                status, body = await fx.call(op, tokens[op.need.value + ":read"])
                assert status in (403, 404) and status != op.ok, (op, status, body)
            assert (await fx.call(op, tokens[op.need.value]))[0] == op.ok, op
            status, body = await fx.call(op, e.admin)
            assert status == op.ok, (op, status, body)
            status, body = await fx.call(op, e.admin)  # as Basic, what the Go SDK sends
            assert status == op.ok, (op, status, body)

    await with_matrix(tmp_path, run)


async def test_list_keys_shows_only_kinds_the_token_may_read(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        await e.deps.tailnet.create_preauth_key(None, tags=["tag:ci"])
        for scopes, kinds in [(["devices:core"], set()), (["auth_keys:read"], {"auth"}),
                              (["oauth_keys:read"], {"client"}),
                              (["all:read"], {"auth", "client"})]:
            status, body = await e.call("GET", "/api/v2/tailnet/-/keys",
                                        await e.token(scopes, ["tag:ci"]))
            assert status == 200 and {k["keyType"] for k in body["keys"]} == kinds, scopes


async def test_token_scope_narrowing(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        for held in sorted(KNOWN_SCOPES):
            secret = await e.client_secret([held], ["tag:ci"])
            for want in sorted(KNOWN_SCOPES):
                resp = await e.client.post("/api/v2/oauth/token", data={
                    "client_secret": secret, "scope": want})
                body = await resp.json()
                if grants([held], Scope(want)):
                    assert resp.status == 200 and body["scope"] == want, (held, want, body)
                else:
                    assert (resp.status, body["error"]) == (400, "invalid_scope"), (held, want)


async def test_token_tag_narrowing(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        secret = await e.client_secret(["auth_keys"], ["tag:a", "tag:b"])

        async def mint(secret: str, tags: str) -> tuple[int, Any]:
            resp = await e.client.post("/api/v2/oauth/token", data={
                "client_secret": secret, "tags": tags})
            return resp.status, await resp.json()

        for tags in ("tag:a", "tag:b", "tag:a tag:b"):
            assert (await mint(secret, tags))[0] == 200
        assert await mint(secret, "tag:c") == (400, {
            "error": "invalid_target", "error_description": "tag tag:c is not granted to this client"})
        every = await e.client_secret(["all"], ["tag:a"])
        assert (await mint(every, "tag:anything"))[0] == 200
        assert (await mint(every, "not-a-tag"))[0] == 400
        # A narrowed token carries only those tags into key creation.
        _, body = await mint(secret, "tag:a")
        status, _ = await e.call("POST", "/api/v2/tailnet/-/keys", body["access_token"], json={
            "capabilities": {"devices": {"create": {"tags": ["tag:b"]}}}})
        assert status == 403


async def test_expired_and_revoked_credentials(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        devices = "/api/v2/tailnet/-/devices"
        c, _ = await e.deps.oauth.create_client(["devices:core:read"], ["tag:ci"])
        _, expired = await e.deps.oauth.mint_token(c.client_id, c.scopes, c.tags,
                                                   ttl=timedelta(seconds=-1))
        assert (await e.call("GET", devices, expired))[0] == 401
        _, live = await e.deps.oauth.mint_token(c.client_id, c.scopes, c.tags)
        assert (await e.call("GET", devices, live))[0] == 200
        status, _ = await e.call("DELETE", f"/api/v2/tailnet/-/keys/{c.client_id}", e.admin)
        assert status == 200
        assert (await e.call("GET", devices, live))[0] == 401  # tokens die with the client
        assert await e.deps.oauth.reap() == 0  # deleting the client removed its tokens
        c2, _ = await e.deps.oauth.create_client(["devices:core:read"], ["tag:ci"])
        await e.deps.oauth.mint_token(c2.client_id, c2.scopes, c2.tags, ttl=timedelta(0))
        assert await e.deps.oauth.reap() == 1
        # An expired admin API key is refused too.
        k, key = await e.deps.tailnet.create_api_key()
        await e.deps.tailnet.expire_api_key(k.id)
        assert (await e.call("GET", devices, key))[0] == 401
