"""/api/v1 behaviour beyond the goldens: Headscale's error substrings that UIs match on,
tag-only keys, tags against policy, routes, expiry, the interactive flow."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from pyheadscale.control.dispatch import ControlPlane
from tests.unit._apicodes import assert_error_body
from tests.unit._statefix import api_client, key, open_control

POLICY = '{"tagOwners": {"tag:server": ["alice@"]}, "acls": [{"action": "accept", ' \
         '"src": ["*"], "dst": ["*:*"]}]}'


async def start(tmp: Path, **cfg_over: Any) -> tuple[TestClient, ControlPlane]:
    cp = await open_control(tmp, **cfg_over)
    return await api_client(cp), cp


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[TestClient, ControlPlane]]:
    client, cp = await start(tmp_path, policy={"mode": "database"})
    try:
        yield client, cp
    finally:
        await client.close()
        await cp.tailnet.close()


async def err(resp: Any, status: int, substring: str) -> None:
    body = await resp.json()
    assert resp.status == status, body
    assert substring in body["message"], body
    assert_error_body(body, status)


async def alice_node(cp: ControlPlane) -> int:
    u = await cp.tailnet.create_user("alice")
    _, full = await cp.tailnet.create_preauth_key(u.id)
    n = await cp.tailnet.register_with_authkey(
        key(1), key(2), None, {"Hostname": "node-a", "RoutableIPs": ["10.1.0.0/24",
                                                                     "0.0.0.0/0", "::/0"]},
        key=full)
    return n.id


async def test_policy_messages(api: tuple[TestClient, ControlPlane]) -> None:
    client, _ = api
    await err(await client.get("/api/v1/policy"), 500, "acl policy not found")
    await err(await client.put("/api/v1/policy", json={"policy": '{"acls": ['}), 400,
              "parsing HuJSON:")
    await err(await client.post("/api/v1/policy/check", json={"policy": '{"acls": ['}), 400,
              "parsing HuJSON:")
    resp = await client.put("/api/v1/policy", json={"policy": POLICY})
    assert resp.status == 200
    got = await (await client.get("/api/v1/policy")).json()
    assert got["policy"] == POLICY
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$", got["updatedAt"])
    # A policy whose embedded tests fail is refused and the old one stays.
    bad = '{"acls": [], "tests": [{"src": "alice@", "accept": ["1.2.3.4:22"]}]}'
    assert (await client.put("/api/v1/policy", json={"policy": bad})).status == 400
    assert (await (await client.get("/api/v1/policy")).json())["policy"] == POLICY


async def test_policy_file_mode_refuses_updates(tmp_path: Path) -> None:
    f = tmp_path / "policy.hujson"
    f.write_text('{"acls": [] // nothing\n}')
    client, cp = await start(tmp_path, policy={"mode": "file", "path": str(f)})
    try:
        await err(await client.put("/api/v1/policy", json={"policy": "{}"}), 400,
                  "update is disabled for modes other than 'database'")
        got = await (await client.get("/api/v1/policy")).json()
        # As Headscale 0.29.2: the file, and no update time (Headplane: read-only editor).
        assert got == {"policy": f.read_text(), "updatedAt": None}
    finally:
        await client.close()
        await cp.tailnet.close()


async def test_tags_follow_policy(api: tuple[TestClient, ControlPlane]) -> None:
    client, cp = api
    nid = await alice_node(cp)
    await err(await client.post(f"/api/v1/node/{nid}/tags", json={"tags": ["tag:server"]}),
              400, "requested tags [tag:server] are invalid or not permitted")
    await err(await client.post(f"/api/v1/node/{nid}/tags", json={"tags": ["server"]}), 400,
              "tag must start with the string 'tag:'")
    await err(await client.post(f"/api/v1/node/{nid}/tags", json={"tags": ["tag:Server"]}),
              400, "tag should be lowercase")
    # Headscale's exact words: no "setting tags:" context (its CLI adds that), 404 unknown.
    for tags, words in ((["tag:server"], "requested tags [tag:server] are invalid or not "
                         "permitted"), (["x"], "tag must start with the string 'tag:'"),
                        ([], "cannot remove all tags from a node - tagged nodes must have at "
                         "least one tag")):
        resp = await client.post(f"/api/v1/node/{nid}/tags", json={"tags": tags})
        assert (resp.status, (await resp.json())["message"]) == (400, words)
    resp = await client.post("/api/v1/node/424242/tags", json={"tags": ["tag:x"]})
    assert (resp.status, (await resp.json())["message"]) == (404, "node not found")
    assert (await client.put("/api/v1/policy", json={"policy": POLICY})).status == 200
    resp = await client.post(f"/api/v1/node/{nid}/tags", json={"tags": ["tag:server"]})
    node = (await resp.json())["node"]
    assert resp.status == 200 and node["tags"] == ["tag:server"] and node["user"] is None
    listed = (await (await client.get("/api/v1/node")).json())["nodes"][0]
    assert listed["user"]["name"] == "tagged-devices"


async def test_routes_and_expiry(api: tuple[TestClient, ControlPlane]) -> None:
    client, cp = api
    nid = await alice_node(cp)
    await err(await client.post(f"/api/v1/node/{nid}/approve_routes",
                                json={"routes": ["10.0.0.0/33"]}), 400, "parsing route")
    resp = await client.post(f"/api/v1/node/{nid}/approve_routes",
                             json={"routes": ["10.1.0.0/24", "0.0.0.0/0"]})
    node = (await resp.json())["node"]
    assert node["approvedRoutes"] == ["0.0.0.0/0", "10.1.0.0/24", "::/0"]
    assert node["availableRoutes"] == ["10.1.0.0/24", "0.0.0.0/0", "::/0"]
    listed = (await (await client.get("/api/v1/node")).json())["nodes"][0]
    assert set(listed["subnetRoutes"]) >= {"0.0.0.0/0", "::/0"}
    resp = await client.post(f"/api/v1/node/{nid}/expire",
                             json={"expiry": "2099-01-02T03:04:05Z"})
    assert (await resp.json())["node"]["expiry"] == "2099-01-02T03:04:05Z"
    resp = await client.post(f"/api/v1/node/{nid}/expire", json={"disableExpiry": True})
    assert (await resp.json())["node"]["expiry"] is None
    await err(await client.post(f"/api/v1/node/{nid}/expire", json={
        "disableExpiry": True, "expiry": "2099-01-02T03:04:05Z"}), 400, "cannot set both")
    resp = await client.post(f"/api/v1/node/{nid}/expire?expiry=2098-01-01T00:00:00Z")
    assert (await resp.json())["node"]["expiry"] == "2098-01-01T00:00:00Z"
    await err(await client.post(f"/api/v1/node/{nid}/rename/Bad_Name!"), 400, "renaming node")
    resp = await client.post(f"/api/v1/node/{nid}/rename/web-1")
    assert (await resp.json())["node"]["givenName"] == "web-1"
    await err(await client.delete("/api/v1/user/1"), 400, "deleting user")


async def test_tag_only_key_and_key_shapes(api: tuple[TestClient, ControlPlane]) -> None:
    client, _ = api
    resp = await client.post("/api/v1/preauthkey", json={
        "aclTags": ["tag:ci"], "ephemeral": True, "expiration": "2099-01-01T00:00:00Z"})
    k = (await resp.json())["preAuthKey"]
    assert resp.status == 200 and k["user"] is None and k["aclTags"] == ["tag:ci"]
    assert re.fullmatch(r"hskey-auth-[0-9a-f]{12}-[0-9a-f]{64}", k["key"])
    listed = (await (await client.get("/api/v1/preauthkey")).json())["preAuthKeys"][0]
    assert listed["key"] == k["key"][:len("hskey-auth-") + 12] + "-***"
    assert listed["expiration"] == "2099-01-01T00:00:00Z"
    resp = await client.post("/api/v1/apikey", json={"expiration": "2099-01-01T00:00:00Z"})
    full = (await resp.json())["apiKey"]
    assert re.fullmatch(r"hskey-api-[0-9a-f]{12}-[0-9a-f]{64}", full)
    listed = (await (await client.get("/api/v1/apikey")).json())["apiKeys"][0]
    assert listed["prefix"] == full[:len("hskey-api-") + 12] + "-***"
    assert listed["expiration"] == "2099-01-01T00:00:00Z"
    await err(await client.post("/api/v1/apikey", json={"expiration": "tomorrow"}), 400,
              "RFC 3339")


async def test_interactive_flow(api: tuple[TestClient, ControlPlane]) -> None:
    client, cp = api
    await cp.tailnet.create_user("alice")
    auth_id = "hskey-authreq-" + "0123456789ab" * 2
    resp = await client.post("/api/v1/debug/node", json={
        "user": "alice", "key": auth_id, "name": "dbg", "routes": ["10.9.0.0/16"]})
    echo = (await resp.json())["node"]
    assert resp.status == 200 and echo["availableRoutes"] == ["10.9.0.0/16"]
    resp = await client.post("/api/v1/auth/register", json={"user": "alice", "authId": auth_id})
    node = (await resp.json())["node"]
    assert resp.status == 200 and node["givenName"] == "dbg"
    assert node["registerMethod"] == "REGISTER_METHOD_CLI" and node["user"]["name"] == "alice"
    await err(await client.post("/api/v1/auth/register",
                                json={"user": "alice", "authId": auth_id}), 404,
              "registering node")
    p = cp.pending.add(machine_key=key(9), node_key=key(10), hostinfo={"Hostname": "x"},
                       expiry=None, ephemeral=False, capver=113)
    assert (await client.post("/api/v1/auth/reject", json={"authId": p.auth_id})).status == 200
    await err(await client.post("/api/v1/auth/reject", json={"authId": p.auth_id}), 404,
              "no pending auth session")
    with pytest.raises(PermissionError):
        p.done.result()


async def test_bad_json_never_crashes(api: tuple[TestClient, ControlPlane]) -> None:
    client, _ = api
    for path in ("/api/v1/user", "/api/v1/preauthkey", "/api/v1/apikey/expire",
                 "/api/v1/auth/register"):
        resp = await client.post(path, data=b"{not json",
                                 headers={"Content-Type": "application/json"})
        assert resp.status == 400
    resp = await client.post("/api/v1/user", json={"name": 5})
    assert resp.status == 400
    resp = await client.post("/api/v1/preauthkey", json=[1, 2])
    assert resp.status == 400
