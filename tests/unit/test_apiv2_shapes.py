"""/api/v2 wire shapes and behaviour, with the expectations of Headscale 0.30's contract tests
(hscontrol/apiv2_*_test.go): keys, devices, users, settings, the policy file with ETag and
If-Match, Tailscale's error body, and the OpenAPI document."""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from pyheadscale.api.v2.policy import DEFAULT_POLICY
from pyheadscale.api.v2.routes import ROUTES
from pyheadscale.state.errors import InvalidAuthKey
from tests.unit._apiv2fix import V2Env, v2_env

KEYS = "/api/v2/tailnet/-/keys"
ALLOW_ALL = '{"acls":[{"action":"accept","src":["*"],"dst":["*:*"]}]}'
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")


def tagged(*tags: str, reusable: bool = True) -> dict[str, Any]:
    return {"devices": {"create": {"reusable": reusable, "preauthorized": True,
                                   "tags": list(tags)}}}


def strip(body: dict[str, Any], *fields: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in fields}


def etag_of(data: str) -> str:
    return '"' + hashlib.sha256(data.encode()).hexdigest() + '"'


async def create(e: V2Env, body: dict[str, Any], cred: str | None = None) -> dict[str, Any]:
    status, out = await e.call("POST", KEYS, cred or e.admin, json=body)
    assert status == 200, out
    return dict(out)


# --- keys ------------------------------------------------------------------------------------


async def test_create_tagged_key_shape(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        got = await create(e, {"description": "dev access", "expirySeconds": 86400,
                               "capabilities": tagged("tag:ci")})
        assert strip(got, "id", "key", "created", "expires") == {
            "keyType": "auth", "description": "dev access", "expirySeconds": 86400,
            "invalid": False, "tags": ["tag:ci"], "capabilities": {"devices": {"create": {
                "reusable": True, "ephemeral": False, "preauthorized": True,
                "tags": ["tag:ci"]}}}}
        assert got["key"].startswith("hskey-auth-") and TS.match(got["created"])
        k = e.deps.tailnet.preauth_keys[int(got["id"])]
        assert (k.reusable, k.ephemeral, k.tags, k.user_id, k.description) == (
            True, False, ("tag:ci",), None, "dev access")
        assert k.expiration is not None
        assert abs((k.expiration - k.created_at).total_seconds() - 86400) < 2
        status, read = await e.call("GET", f"{KEYS}/{got['id']}", e.admin)
        assert status == 200 and "key" not in read
        assert strip(read, "created", "expires") == strip(got, "key", "created", "expires")


async def test_create_key_permutations_and_default_expiry(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        cases = [({"capabilities": {"devices": {"create": {"tags": ["tag:ci"]}}}},
                  (False, False, "", 7776000)),
                 ({"capabilities": tagged("tag:ci")}, (True, False, "", 7776000)),
                 ({"capabilities": {"devices": {"create": {"ephemeral": True,
                                                           "tags": ["tag:ci"]}}}},
                  (False, True, "", 7776000)),
                 ({"description": "ci", "capabilities": tagged("tag:ci")},
                  (True, False, "ci", 7776000)),
                 ({"expirySeconds": 3600, "capabilities": tagged("tag:ci")},
                  (True, False, "", 3600))]
        for body, (reusable, ephemeral, desc, seconds) in cases:
            got = await create(e, body)
            caps = got["capabilities"]["devices"]["create"]
            assert (caps["reusable"], caps["ephemeral"], got.get("description", "")) == (
                reusable, ephemeral, desc)
            assert abs(got["expirySeconds"] - seconds) <= 2, got


async def test_user_owned_key_needs_an_owned_api_key(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        got = await create(e, {"capabilities": {"devices": {"create": {"reusable": True}}}})
        assert got["userId"] == str(e.alice) and "tags" not in got
        _, ownerless = await e.deps.tailnet.create_api_key()
        before = len(e.deps.tailnet.preauth_keys)
        status, body = await e.call("POST", KEYS, ownerless, json={"capabilities": {}})
        assert (status, body["message"]) == (
            400, "an auth key without tags must be created with a user-owned API key")
        assert len(e.deps.tailnet.preauth_keys) == before  # nothing half-made


async def test_delete_soft_revokes_then_reaper_removes(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        got = await create(e, {"capabilities": tagged("tag:ci")})
        assert (await e.call("DELETE", f"{KEYS}/{got['id']}", e.admin))[0] == 200
        status, read = await e.call("GET", f"{KEYS}/{got['id']}", e.admin)
        assert status == 200 and read["invalid"] is True and TS.match(read["revoked"])
        _, listed = await e.call("GET", KEYS, e.admin)
        assert got["id"] in {k["id"] for k in listed["keys"]}
        assert (await e.call("DELETE", f"{KEYS}/{got['id']}", e.admin))[0] == 404
        tn = e.deps.tailnet
        with pytest.raises(InvalidAuthKey, match="revoked"):  # it registers nothing
            await tn.validate_preauth_key(got["key"])
        k = tn.preauth_keys[int(got["id"])]
        assert k.revoked is not None
        assert await tn.reap_revoked_preauth_keys(k.revoked) == 0  # retention not yet over
        assert await tn.reap_revoked_preauth_keys(k.revoked + timedelta(seconds=1)) == 1
        assert (await e.call("GET", f"{KEYS}/{got['id']}", e.admin))[0] == 404


async def test_oauth_client_key_shape_and_secret_once(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        got = await create(e, {"keyType": "client", "scopes": ["devices:core", "all:read"],
                               "tags": ["tag:ci"], "description": "operator"})
        assert re.fullmatch(r"hskey-client-[0-9a-f]{12}-[0-9a-f]{64}", got["key"])
        assert got["key"].split("-")[2] == got["id"]
        assert strip(got, "key", "created") == {
            "id": got["id"], "keyType": "client", "description": "operator", "invalid": False,
            "capabilities": {"devices": {"create": {"reusable": False, "ephemeral": False,
                                                    "preauthorized": False, "tags": []}}},
            "scopes": ["all:read", "devices:core"], "tags": ["tag:ci"], "userId": str(e.alice)}
        _, read = await e.call("GET", f"{KEYS}/{got['id']}", e.admin)
        assert "key" not in read and read["scopes"] == got["scopes"]
        stored = e.deps.oauth.clients[got["id"]].secret_hash
        assert stored.startswith(b"$argon2id$v=19$m=19456,t=2,p=1$")
        assert got["key"].encode() not in stored


# --- devices ---------------------------------------------------------------------------------


async def test_device_shape_and_lookups(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        nid = await e.node(1, "contract-dut")
        status, dev = await e.call("GET", f"/api/v2/device/{nid}?fields=all", e.admin)
        n = e.deps.tailnet.nodes[nid]
        assert status == 200
        assert dev == {
            "addresses": [str(a) for a in n.addresses], "name": "contract-dut",
            "id": str(nid), "nodeId": str(nid), "authorized": True,
            "user": "alice@example.com", "tags": [], "keyExpiryDisabled": True,
            "created": dev["created"], "hostname": "contract-dut", "isEphemeral": False,
            "lastSeen": dev["lastSeen"], "machineKey": "mkey:" + n.machine_key.hex(),
            "nodeKey": "nodekey:" + n.node_key.hex(), "os": "linux", "clientVersion": "1.92.5",
            "updateAvailable": False, "connectedToControl": False, "advertisedRoutes": ["10.1.0.0/24", "0.0.0.0/0", "::/0"],
            "enabledRoutes": []}
        _, plain = await e.call("GET", f"/api/v2/device/{nid}", e.admin)
        assert "advertisedRoutes" not in plain and "enabledRoutes" not in plain
        for bad in ("999999", "not-a-number", "-1", "1" * 40):
            status, body = await e.call("GET", f"/api/v2/device/{bad}", e.admin)
            assert (status, body) == (404, {"message": "device not found", "status": 404})
        status, body = await e.call("GET", "/api/v2/tailnet/example.com/devices", e.admin)
        assert (status, body) == (404, {"message": "tailnet not found", "status": 404})


async def test_device_writes(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        nid = await e.node(1, "dut")
        dev = f"/api/v2/device/{nid}"
        tn = e.deps.tailnet

        async def post(sub: str, body: Any) -> tuple[int, Any]:
            return await e.call("POST", dev + sub, e.admin, json=body)

        assert (await post("/name", {"name": "renamed-dut"}))[0] == 200
        assert tn.nodes[nid].given_name == "renamed-dut"
        status, body = await post("/name", {"name": "Invalid_Name!"})
        assert status == 400 and body["status"] == 400 and body["message"]
        assert tn.nodes[nid].given_name == "renamed-dut"
        assert (await post("/tags", {"tags": ["tag:ci"]}))[0] == 200
        assert tn.nodes[nid].tags == ("tag:ci",) and tn.nodes[nid].user_id is None
        assert (await e.call("GET", dev, e.admin))[1]["user"] == "tagged-devices"
        assert (await post("/tags", {"tags": ["tag:prod", "tag:ci"]}))[0] == 200
        assert tn.nodes[nid].tags == ("tag:ci", "tag:prod")
        for empty in ({"tags": []}, {"tags": None}, {}):
            assert (await post("/tags", empty))[0] == 200
        assert tn.nodes[nid].tags == ("tag:ci", "tag:prod")
        status, body = await post("/tags", {"tags": ["tag:nope"]})
        assert status == 400 and "invalid or not permitted" in body["message"]
        assert tn.nodes[nid].tags == ("tag:ci", "tag:prod")
        status, body = await post("/routes", {"routes": ["10.1.0.0/24", "::/0"]})
        assert (status, body) == (200, {"advertisedRoutes": ["10.1.0.0/24", "0.0.0.0/0", "::/0"],
                                        "enabledRoutes": ["0.0.0.0/0", "10.1.0.0/24", "::/0"]})
        assert (await post("/routes", {"routes": ["not-a-cidr"]}))[0] == 400
        assert len(tn.nodes[nid].approved_routes) == 3
        assert (await post("/routes", {"routes": []}))[1]["enabledRoutes"] == []
        await tn.set_expiry(nid, tn.nodes[nid].created_at + timedelta(days=1))
        assert (await post("/key", {"keyExpiryDisabled": False}))[0] == 200
        assert tn.nodes[nid].expiry is not None  # re-enabling is a no-op
        assert (await post("/key", {"keyExpiryDisabled": True}))[0] == 200
        assert tn.nodes[nid].expiry is None
        assert (await post("/authorized", {"authorized": True}))[0] == 200
        status, body = await post("/authorized", {"authorized": False})
        assert status == 400 and "de-authorizing" in body["message"]
        assert (await e.call("DELETE", dev, e.admin))[0] == 200
        assert nid not in tn.nodes
        assert (await e.call("DELETE", dev, e.admin))[0] == 404


# --- users and settings ----------------------------------------------------------------------


async def test_users(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        bob = await e.deps.tailnet.create_user("bob", display_name="Bob B")
        for i in range(3):
            await e.node(i + 1, f"dut-{i}")
        status, alice = await e.call("GET", f"/api/v2/users/{e.alice}", e.admin)
        assert status == 200 and strip(alice, "created", "lastSeen") == {
            "id": str(e.alice), "displayName": "alice", "loginName": "alice@example.com",
            "profilePicUrl": "", "tailnetId": "1", "type": "member", "role": "member",
            "status": "active", "deviceCount": 3, "currentlyConnected": False}
        _, b = await e.call("GET", f"/api/v2/users/{bob.id}", e.admin)
        assert (b["displayName"], b["deviceCount"], b["lastSeen"]) == (
            "Bob B", 0, "0001-01-01T00:00:00Z")
        for bad in ("999999", "not-a-number", "2147455555"):
            assert (await e.call("GET", f"/api/v2/users/{bad}", e.admin))[0] == 404
        for query, count in [("", 2), ("?type=member", 2), ("?role=member", 2),
                             ("?type=member&role=member", 2), ("?type=shared", 0),
                             ("?role=admin", 0)]:
            status, body = await e.call("GET", "/api/v2/tailnet/-/users" + query, e.admin)
            assert status == 200 and len(body["users"]) == count, query


async def test_settings(tmp_path: Path) -> None:
    async with v2_env(tmp_path, node={"expiry": "36h"},
                      tls_cert_path=str(tmp_path / "c.pem")) as e:
        status, got = await e.call("GET", "/api/v2/tailnet/-/settings", e.admin)
        assert status == 200 and got == {
            "aclsExternallyManagedOn": False, "aclsExternalLink": "", "devicesApprovalOn": False,
            "devicesAutoUpdatesOn": False, "devicesKeyDurationDays": 1,
            "usersApprovalOn": False, "usersRoleAllowedToJoinExternalTailnets": "none",
            "networkFlowLoggingOn": False, "regionalRoutingOn": False,
            "postureIdentityCollectionOn": False, "httpsEnabled": True}
        status, body = await e.call("PATCH", "/api/v2/tailnet/-/settings", e.admin,
                                    json={"devicesApprovalOn": True})
        assert status == 501 and "not supported" in body["message"]
        assert (await e.call("PATCH", "/api/v2/tailnet/x/settings", e.admin, json={}))[0] == 404


# --- policy file -----------------------------------------------------------------------------


async def set_acl(e: V2Env, body: str, ctype: str = "application/json",
                  **headers: str) -> tuple[int, Any, str]:
    resp = await e.client.post("/api/v2/tailnet/-/acl", data=body.encode(), headers={
        "Authorization": f"Bearer {e.admin}", "Content-Type": ctype, **headers})
    return resp.status, await resp.text(), resp.headers.get("ETag", "")


async def get_acl(e: V2Env, accept: str = "") -> tuple[str, str, str]:
    resp = await e.client.get("/api/v2/tailnet/-/acl", headers={
        "Authorization": f"Bearer {e.admin}", **({"Accept": accept} if accept else {})})
    assert resp.status == 200
    return await resp.text(), resp.headers["ETag"], resp.headers["Content-Type"]


async def test_acl_default_negotiation_and_etag(tmp_path: Path) -> None:
    async with v2_env(tmp_path, policy=None) as e:
        text, tag, ctype = await get_acl(e)
        assert text == DEFAULT_POLICY and tag == etag_of(DEFAULT_POLICY)
        assert ctype.startswith("application/json")
        hu_text, hu_tag, hu_type = await get_acl(e, "application/hujson")
        assert (hu_text, hu_tag, hu_type.split(";")[0]) == (text, tag, "application/hujson")
        # If-Match "ts-default" holds while the default runs, then no more.
        status, _, set_tag = await set_acl(e, ALLOW_ALL, **{"If-Match": '"ts-default"'})
        assert status == 200 and set_tag == etag_of(ALLOW_ALL)
        assert (await set_acl(e, ALLOW_ALL, **{"If-Match": '"ts-default"'}))[0] == 412


async def test_acl_if_match_hujson_and_atomicity(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        _, tag, _ = await get_acl(e)
        p2 = '{"hosts":{"h":"100.64.0.1"},"acls":[{"action":"accept","src":["*"],"dst":["*:*"]}]}'
        status, _, tag2 = await set_acl(e, p2, **{"If-Match": tag})
        assert status == 200 and tag2 == etag_of(p2) and tag2 != tag
        assert (await set_acl(e, p2))[2] == tag2  # unchanged text, unchanged ETag
        status, body, _ = await set_acl(e, ALLOW_ALL, **{"If-Match": '"deadbeef"'})
        assert status == 412 and "precondition failed" in body
        assert (await e.deps.policy.get()).data == p2
        hujson = "{\n  // allow all\n  \"acls\": [{\"action\":\"accept\",\"src\":[\"*\"]," \
                 "\"dst\":[\"*:*\"]}],\n}"
        assert (await set_acl(e, hujson, "application/hujson"))[0] == 200
        assert (await get_acl(e, "application/hujson"))[:2] == (hujson, etag_of(hujson))
        status, body, _ = await set_acl(e, "{ this is not valid")
        assert status == 400 and '"message"' in body
        assert (await get_acl(e))[0] == hujson
        assert (await set_acl(e, ""))[0] == 200  # an empty policy resets to the default
        assert (await get_acl(e))[0] == DEFAULT_POLICY


async def test_acl_file_mode_is_read_only(tmp_path: Path) -> None:
    path = tmp_path / "acl.hujson"
    path.write_text("{\n  // file-managed\n  \"acls\": [],\n}")
    async with v2_env(tmp_path, policy=None) as e:
        object.__setattr__(e.deps.settings, "policy_mode", "file")
        e.cp.cfg.policy.mode = "file"
        e.cp.cfg.policy.path = path
        text, tag, _ = await get_acl(e)
        assert text == path.read_text() and tag == etag_of(text)
        status, body, _ = await set_acl(e, ALLOW_ALL)
        assert status == 400 and "database" in body
        assert path.read_text() == text
        _, settings = await e.call("GET", "/api/v2/tailnet/-/settings", e.admin)
        assert settings["aclsExternallyManagedOn"] is True


async def test_acl_validate(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        url = "/api/v2/tailnet/-/acl/validate"
        resp = await e.client.post(url, data=ALLOW_ALL, headers={
            "Authorization": f"Bearer {e.admin}"})
        assert resp.status == 200 and await resp.read() == b""
        bad = '{"acls": [], "tests": [{"src": "alice@", "accept": ["1.2.3.4:22"]}]}'
        status, body = await e.call("POST", url, e.admin, data=bad)
        assert status == 400 and body["message"]
        assert (await e.deps.policy.get()).data != bad  # nothing stored


# --- the document ----------------------------------------------------------------------------


async def test_openapi_names_every_route_and_its_scope(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        status, doc = await e.call("GET", "/api/v2/openapi.json")  # public
        assert status == 200 and doc["openapi"].startswith("3.1")
        validate(doc)  # a valid OpenAPI 3.1 document
        for r in ROUTES:
            op = doc["paths"][r.path][r.method.lower()]
            assert op["operationId"] == r.op_id and op["x-required-scope"], r
            assert "OAuth scope" in op["description"]
        assert "/api/v2/oauth/token" in doc["paths"]
        assert doc["paths"]["/api/v2/device/{id}"]["get"]["x-required-scope"] == \
            "devices:core:read"
        assert "auth_keys" in doc["paths"]["/api/v2/tailnet/{tailnet}/keys"]["post"][
            "x-required-scope"]
        status, page = await e.call("GET", "/api/v2/docs")
        assert status == 200 and "devices:core:read" in page
        assert (await e.call("GET", "/api/v2/openapi.yaml"))[0] == 200
