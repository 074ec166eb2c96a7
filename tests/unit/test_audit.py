"""Exactly one audit line per admin action, naming who did it, whichever way it came: REST v1
with an API key, the CLI over its unix socket (the real `headscale` command), /api/v2 with an
API key or an OAuth client's token. Failed and read-only calls leave none; no secret is ever
written."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pyheadscale.app import Server
from tests.inproc import running_server, server_config

POLICY = json.dumps({"tagOwners": {"tag:ci": ["alice@"]},
                     "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]})
V2 = "/api/v2/tailnet/-"


@dataclass
class Env:
    srv: Server
    http: aiohttp.ClientSession
    sock: aiohttp.ClientSession  # the CLI's unix socket
    key: str  # an API key
    prefix: str
    caplog: pytest.LogCaptureFixture

    @property
    def base(self) -> str:
        return str(self.srv.cfg.server_url)

    def lines(self) -> list[dict[str, Any]]:
        return [{"action": r.fields["action"], "actor": r.fields["actor"],  # type: ignore[attr-defined]
                 "target": r.fields["target"], **r.fields,  # type: ignore[attr-defined]
                 "_text": r.getMessage()}
                for r in self.caplog.records if r.name == "pyheadscale.audit"]

    async def call(self, method: str, path: str, *, via: str = "key", token: str = "",
                   **kw: Any) -> tuple[int, Any]:
        if via == "socket":
            session, url, headers = self.sock, "http://local" + path, {}
        else:
            session, url = self.http, self.base + path
            headers = {"Authorization": f"Bearer {token or self.key}"}
        async with session.request(method, url, headers=headers, **kw) as r:
            raw = await r.read()
            try:
                return r.status, (json.loads(raw) if raw.strip() else None)
            except ValueError:
                return r.status, raw.decode(errors="replace")  # the plain-text 401

    async def once(self, action: str, actor: str, method: str, path: str, *,
                   status: int = 200, **kw: Any) -> dict[str, Any]:
        """Run one call; exactly one new audit line, for `action` by `actor`."""
        before = len(self.lines())
        got, body = await self.call(method, path, **kw)
        assert got == status, (method, path, got, body)
        new = self.lines()[before:]
        assert len(new) == 1, (method, path, new)
        assert (new[0]["action"], new[0]["actor"]) == (action, actor), new[0]
        return {**new[0], "_body": body}

    async def none(self, method: str, path: str, **kw: Any) -> int:
        before = len(self.lines())
        got, _ = await self.call(method, path, **kw)
        assert self.lines()[before:] == [], (method, path)
        return got


@pytest.fixture
async def env(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Env]:
    caplog.set_level(logging.INFO, logger="pyheadscale.audit")
    cfg = server_config(tmp_path, overrides={"policy": {"mode": "database"}})
    async with running_server(cfg) as srv:
        _, key = await srv.tailnet.create_api_key()
        prefix = key.split("-")[2]
        sock = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=srv.cfg.unix_socket))
        async with aiohttp.ClientSession() as http, sock:
            yield Env(srv, http, sock, key, prefix, caplog)


async def node_of(e: Env, user_id: int, name: str) -> int:
    _, pak = await e.srv.tailnet.create_preauth_key(user_id, reusable=True)
    n = await e.srv.tailnet.register_with_authkey(
        name.encode().ljust(32, b"m"), name.encode().ljust(32, b"n"), None,
        {"Hostname": name, "RoutableIPs": ["10.7.0.0/24"]}, key=pak)
    return n.id


async def test_v1_actions_with_an_api_key(env: Env) -> None:
    actor = f"api_key:{env.prefix}"
    line = await env.once("user.create", actor, "POST", "/api/v1/user", json={"name": "alice"})
    uid = int(line["_body"]["user"]["id"])
    assert line["target"] == f"user {uid}" and line["name"] == "alice"
    await env.once("user.rename", actor, "POST", f"/api/v1/user/{uid}/rename/alicia")
    assert await env.none("POST", "/api/v1/user", json={"name": "alicia"}) != 200  # taken
    assert await env.none("GET", "/api/v1/user") == 200  # reads are not actions

    line = await env.once("preauthkey.create", actor, "POST", "/api/v1/preauthkey",
                          json={"user": str(uid), "reusable": True})
    kid = line["_body"]["preAuthKey"]["id"]
    assert line["target"] == f"preauthkey {kid}"
    assert line["_body"]["preAuthKey"]["key"] not in json.dumps(env.lines())
    await env.once("preauthkey.expire", actor, "POST", "/api/v1/preauthkey/expire",
                   json={"id": kid})
    await env.once("preauthkey.delete", actor, "DELETE", f"/api/v1/preauthkey?id={kid}")

    nid = await node_of(env, uid, "box")
    await env.once("node.rename", actor, "POST", f"/api/v1/node/{nid}/rename/server1")
    line = await env.once("node.routes.approve", actor, "POST",
                          f"/api/v1/node/{nid}/approve_routes", json={"routes": ["10.7.0.0/24"]})
    assert line["target"] == f"node {nid}" and line["routes"] == ["10.7.0.0/24"]
    await env.once("node.expire", actor, "POST", f"/api/v1/node/{nid}/expire")
    await env.once("node.delete", actor, "DELETE", f"/api/v1/node/{nid}")
    assert await env.none("DELETE", f"/api/v1/node/{nid}") == 404  # already gone

    line = await env.once("policy.set", actor, "PUT", "/api/v1/policy", json={"policy": POLICY})
    assert line["policy_sha256"] and line["bytes"] == len(POLICY)
    assert await env.none("POST", "/api/v1/policy/check", json={"policy": POLICY}) == 200

    line = await env.once("apikey.create", actor, "POST", "/api/v1/apikey", json={})
    new_key = line["_body"]["apiKey"]
    new_prefix = new_key.split("-")[2]
    assert line["target"] == f"apikey {new_prefix}" and new_key not in json.dumps(env.lines())
    await env.once("apikey.expire", actor, "POST", "/api/v1/apikey/expire",
                   json={"prefix": new_prefix})
    await env.once("apikey.delete", actor, "DELETE", f"/api/v1/apikey/{new_prefix}")
    await env.once("user.delete", actor, "DELETE", f"/api/v1/user/{uid}")
    assert await env.none("GET", "/api/v1/node", token="hskey-api-bogus-nope") == 401


async def test_cli_socket_is_the_actor(env: Env) -> None:
    """The same API over the CLI's socket, then the real `headscale` command."""
    await env.once("user.create", "cli_socket", "POST", "/api/v1/user", via="socket",
                   json={"name": "bob"})
    before = len(env.lines())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyheadscale", "-c", str(env.srv.cfg.config_file), "users",
        "create", "carol", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    new = env.lines()[before:]
    assert [(x["action"], x["actor"], x["name"]) for x in new] == [
        ("user.create", "cli_socket", "carol")]


async def test_v2_with_api_key_and_oauth_client(env: Env) -> None:
    actor = f"api_key:{env.prefix}"
    user = await env.srv.tailnet.create_user("alice")
    await env.once("policy.set", actor, "PUT", "/api/v1/policy", json={"policy": POLICY})
    line = await env.once("key.create", actor, "POST", f"{V2}/keys", json={
        "keyType": "client", "scopes": ["all"], "tags": ["tag:ci"]})
    client_id, secret = line["_body"]["id"], line["_body"]["key"]
    assert line["target"] == f"oauthclient {client_id}"
    assert secret not in json.dumps(env.lines())

    async with env.http.post(env.base + "/api/v2/oauth/token", data={
            "grant_type": "client_credentials", "client_secret": secret}) as r:
        token = (await r.json())["access_token"]
    assert not [x for x in env.lines() if x["action"].startswith("token")]

    nid = await node_of(env, user.id, "laptop")
    by_client = f"oauth_client:{client_id}"
    line = await env.once("node.rename", by_client, "POST", f"/api/v2/device/{nid}/name",
                          token=token, json={"name": "renamed"})
    assert line["target"] == f"node {nid}"
    line = await env.once("key.create", by_client, "POST", f"{V2}/keys", token=token, json={
        "keyType": "auth", "capabilities": {"devices": {"create": {"tags": ["tag:ci"]}}}})
    assert line["target"].startswith("authkey ")
    await env.once("node.delete", actor, "DELETE", f"/api/v2/device/{nid}")
    await env.once("key.delete", actor, "DELETE", f"{V2}/keys/{client_id}")
    assert await env.none("GET", f"{V2}/devices") == 200


async def console_session(e: Env) -> tuple[aiohttp.ClientSession, str]:
    """A console session from a one-time link minted over the socket; its CSRF token."""
    async with e.sock.post("http://local/console/sign-in-link",
                           json={"user": "ann", "role": "admin"}) as r:
        assert r.status == 200, await r.text()
        url = (await r.json())["url"]
    web = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # 127.0.0.1
    async with web.get(url) as r:
        page = await r.text()
    token = re.search(r'name="token" value="([^"]+)"', page)
    pre = re.search(r'name="csrf" value="([^"]+)"', page)
    assert token and pre, page
    async with web.post(e.base + "/admin/sign-in/link",
                        data={"token": token[1], "csrf": pre[1]}) as r:
        page = await r.text()
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf, page
    return web, csrf[1]


async def test_console_leaves_the_lines_the_api_leaves(env: Env) -> None:
    """The console's writes are API operations: each leaves the line its API call leaves,
    naming the console's signed-in user instead of the API key."""
    api = f"api_key:{env.prefix}"
    await env.once("policy.set", api, "PUT", "/api/v1/policy", json={"policy": POLICY})
    uid = (await env.srv.tailnet.create_user("alice")).id
    nid = await node_of(env, uid, "box")
    web, csrf = await console_session(env)

    async def console(action: str, path: str, **form: str) -> dict[str, Any]:
        before = len(env.lines())
        async with web.post(env.base + "/admin" + path, data={**form, "csrf": csrf}) as r:
            assert r.status == 200, (path, await r.text())
        new = env.lines()[before:]
        assert [(x["action"], x["actor"]) for x in new] == [(action, "console:cli:ann")], new
        return new[0]

    def same(a: dict[str, Any], b: dict[str, Any]) -> None:
        drop = {"actor", "_text", "_body"}
        assert {k: v for k, v in a.items() if k not in drop} == \
            {k: v for k, v in b.items() if k not in drop}

    async with web:
        same(await console("node.rename", f"/machines/{nid}/rename", name="web1"),
             await env.once("node.rename", api, "POST", f"/api/v1/node/{nid}/rename/web1"))
        same(await console("node.routes.approve", f"/machines/{nid}/routes",
                           route="10.7.0.0/24"),
             await env.once("node.routes.approve", api, "POST",
                            f"/api/v1/node/{nid}/approve_routes",
                            json={"routes": ["10.7.0.0/24"]}))
        same(await console("node.tags", f"/machines/{nid}/tags", tags="tag:ci"),
             await env.once("node.tags", api, "POST", f"/api/v1/node/{nid}/tags",
                            json={"tags": ["tag:ci"]}))
        same(await console("policy.set", "/policy/apply", policy=POLICY),
             await env.once("policy.set", api, "PUT", "/api/v1/policy",
                            json={"policy": POLICY}))
        line = await console("user.create", "/users", name="carol")
        assert line["target"].startswith("user ") and line["name"] == "carol"
        line = await console("preauthkey.create", "/keys/preauth", user=str(uid), expiry="1h")
        kid = line["target"].split()[1]
        assert line["user"] == "alice" and line["reusable"] is False
        same(await console("preauthkey.expire", f"/keys/preauth/{kid}/expire"),
             await env.once("preauthkey.expire", api, "POST", "/api/v1/preauthkey/expire",
                            json={"id": kid}))
        line = await console("apikey.create", "/keys/api", expiry="1d")
        prefix = line["target"].split()[1]
        assert prefix in {k.prefix for k in env.srv.tailnet.list_api_keys()}
        kid = next(k.id for k in env.srv.tailnet.list_api_keys() if k.prefix == prefix)
        same(await console("apikey.expire", f"/keys/api/{kid}/expire"),
             await env.once("apikey.expire", api, "POST", "/api/v1/apikey/expire",
                            json={"prefix": prefix}))
        same(await console("node.delete", f"/machines/{nid}/delete", confirm="yes"),
             {"action": "node.delete", "target": f"node {nid}"})
        line = await console("node.expire", f"/machines/{await node_of(env, uid, 'two')}"
                             "/expire")
        assert line["expiry"]
        # Failures and checks leave nothing, as in the API.
        before = len(env.lines())
        async with web.post(env.base + "/admin/users", data={"name": "carol", "csrf": csrf}):
            pass
        async with web.post(env.base + "/admin/policy/preview",
                            data={"policy": POLICY, "csrf": csrf}):
            pass
        assert env.lines()[before:] == []
