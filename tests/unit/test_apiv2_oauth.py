"""OAuth rules of /api/v2 that Headscale 0.30's apiv2_oauth_test.go pins: client management
within the creating token's grant, tags held or owned through tagOwners, no oracle for client
ids, device tags within the grant, undefined tags, and the keys multiplex kept apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.unit._apiv2fix import V2Env, v2_env

KEYS = "/api/v2/tailnet/-/keys"


async def tagged_key(e: V2Env, cred: str, *tags: str) -> int:
    status, _ = await e.call("POST", KEYS, cred, json={
        "capabilities": {"devices": {"create": {"tags": list(tags)}}}})
    return status


async def new_client(e: V2Env, cred: str, scopes: list[str], tags: list[str]) -> tuple[int, Any]:
    return await e.call("POST", KEYS, cred, json={"keyType": "client", "scopes": scopes,
                                                  "tags": tags})


async def test_clients_made_by_tokens_stay_within_the_token(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        tok = await e.token(["oauth_keys"], ["tag:ci"])
        assert (await new_client(e, tok, ["oauth_keys:read"], []))[0] == 200
        status, body = await new_client(e, tok, ["auth_keys"], ["tag:ci"])
        assert status == 403 and "beyond the creating token" in body["message"]
        assert (await new_client(e, await e.token(["auth_keys"], ["tag:ci"]),
                                 ["auth_keys"], ["tag:ci"]))[0] == 403
        every = await e.token(["all"], ["tag:ci"])
        assert (await new_client(e, every, ["auth_keys"], ["tag:ci"]))[0] == 200
        assert (await new_client(e, every, ["auth_keys"], ["tag:prod"]))[0] == 403
        # A client's own tags are checked against the policy for tokens (400), not for admins.
        assert (await new_client(e, every, ["auth_keys"], ["tag:undefined"]))[0] == 400
        assert (await new_client(e, e.admin, ["auth_keys"], ["tag:undefined"]))[0] == 200


async def test_tags_held_or_owned(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        tok = await e.token(["auth_keys"], ["tag:k8s-operator"])
        assert await tagged_key(e, tok, "tag:k8s-operator") == 200  # held
        assert await tagged_key(e, tok, "tag:k8s") == 200  # owned via tagOwners
        assert await tagged_key(e, tok, "tag:a") == 403  # exists, owned by nobody
        assert await tagged_key(e, tok, "tag:k8s", "tag:a") == 403  # all or nothing
        assert await tagged_key(e, tok, "tag:undefined") == 400
        assert await tagged_key(e, e.admin, "tag:adminhistorical") == 200  # syntax only
        # A token narrowed to a read scope at mint time cannot write.
        secret = await e.client_secret(["all"], ["tag:ci"])
        resp = await e.client.post("/api/v2/oauth/token", data={
            "client_secret": secret, "scope": "auth_keys:read"})
        narrowed = (await resp.json())["access_token"]
        assert await tagged_key(e, narrowed, "tag:ci") == 403


async def test_tag_ownership_is_transitive_and_cycle_safe(tmp_path: Path) -> None:
    policy = ('{"tagOwners": {"tag:root": [], "tag:mid": ["tag:root"], "tag:leaf": ["tag:mid"],'
              ' "tag:x": ["tag:y"], "tag:y": ["tag:x"]}, "acls": []}')
    async with v2_env(tmp_path, policy=policy) as e:
        pol = e.deps.policy
        assert pol.tag_owned_by_tags("tag:leaf", ["tag:root"])
        assert not pol.tag_owned_by_tags("tag:root", ["tag:leaf"])
        assert not pol.tag_owned_by_tags("tag:x", ["tag:root"])  # a cycle ends
        assert pol.tag_owned_by_tags("tag:x", ["tag:y"])
        assert pol.tag_owned_by_tags("tag:nowhere", ["tag:nowhere"])  # held needs no policy


async def test_no_oracle_for_client_ids(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        secret = await e.client_secret(["oauth_keys"], ["tag:ci"])
        client_id = secret.split("-")[2]
        tok = await e.token(["auth_keys:read"], ["tag:ci"])
        real = await e.call("GET", f"{KEYS}/{client_id}", tok)
        missing = await e.call("GET", f"{KEYS}/deadbeefdead", tok)
        assert real == missing and real[0] == 404
        reader = await e.token(["oauth_keys:read"], ["tag:ci"])
        assert (await e.call("GET", f"{KEYS}/{client_id}", reader))[0] == 200
        # An auth_keys token cannot delete a client; an oauth_keys one can.
        writer = await e.token(["auth_keys"], ["tag:ci"])
        assert (await e.call("DELETE", f"{KEYS}/{client_id}", writer))[0] == 404
        assert client_id in e.deps.oauth.clients
        manager = await e.token(["oauth_keys"], ["tag:ci"])
        assert (await e.call("DELETE", f"{KEYS}/{client_id}", manager))[0] == 200
        assert client_id not in e.deps.oauth.clients


async def test_device_tags_within_the_token_grant(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        nid = await e.node(1, "dut")
        url = f"/api/v2/device/{nid}/tags"
        tok = await e.token(["devices:core"], ["tag:ci"])
        assert (await e.call("POST", url, tok, json={"tags": ["tag:ci"]}))[0] == 200
        status, body = await e.call("POST", url, tok, json={"tags": ["tag:prod"]})
        assert (status, body["message"]) == (403, "token may not assign tag tag:prod")
        assert e.deps.tailnet.nodes[nid].tags == ("tag:ci",)
        assert (await e.call("POST", url, e.admin, json={"tags": ["tag:prod"]}))[0] == 200


async def test_credentials_of_the_wrong_kind_are_unauthorized(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        secret = await e.client_secret(["all"], ["tag:ci"])
        for bearer in (secret, "hskey-oauthtok-deadbeefdead-" + "0" * 64,
                       "hskey-oauthtok-garbage", "totally-bogus"):
            assert (await e.call("GET", KEYS, bearer))[0] == 401, bearer
        # A token is not an API key for /api/v1 either.
        tok = await e.token(["all"], ["tag:ci"])
        resp = await e.client.get("/api/v1/node", headers={"Authorization": f"Bearer {tok}"})
        assert resp.status == 401
