"""Every /api/v1 route refuses a missing, malformed, unknown or expired Bearer key with the
plain-text 401 and no data; the unix-socket app (trusted) needs none; docs are public."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from pyheadscale.api import ROUTES
from tests.unit._apicodes import assert_error_body
from tests.unit._statefix import api_client, open_control


async def make_client(tmp: Path, *, trusted: bool, **kw: Any) -> tuple[TestClient, Any]:
    cp = await open_control(tmp)
    app = web.Application()

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "v0.29.2"})

    app.router.add_get("/version", version)
    return await api_client(cp, trusted=trusted, app=app, **kw), cp


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[TestClient, Any]]:
    client, cp = await make_client(tmp_path, trusted=False)
    # Data that must never leak to an unauthenticated caller.
    u = await cp.tailnet.create_user("secretuser")
    await cp.tailnet.create_preauth_key(u.id, reusable=True)
    try:
        yield client, cp
    finally:
        await client.close()
        await cp.tailnet.close()


def concrete(path: str) -> str:
    return re.sub(r"\{\w+\}", "1", path)


async def assert_all_refused(client: TestClient, headers: dict[str, str]) -> None:
    for r in ROUTES:
        resp = await client.request(r.method, concrete(r.path), headers=headers,
                                    data=json.dumps({"name": "x"}))
        text = await resp.text()
        assert resp.status == 401, (r.method, r.path, text)
        assert text == "Unauthorized"
        assert resp.content_type == "text/plain"
    resp = await client.get("/api/v1/nonexistent", headers=headers)
    assert resp.status == 401


async def test_no_key(api: tuple[TestClient, Any]) -> None:
    client, _ = api
    await assert_all_refused(client, {})
    await assert_all_refused(client, {"Authorization": "Basic dXNlcjpwdw=="})
    await assert_all_refused(client, {"Authorization": "Bearer "})


async def test_bad_and_unknown_keys(api: tuple[TestClient, Any]) -> None:
    client, _ = api
    await assert_all_refused(client, {"Authorization": "Bearer garbage"})
    fake = "hskey-api-" + "a" * 12 + "-" + "b" * 64
    await assert_all_refused(client, {"Authorization": f"Bearer {fake}"})


async def test_expired_key(api: tuple[TestClient, Any]) -> None:
    client, cp = api
    _, full = await cp.tailnet.create_api_key(datetime.now(UTC) - timedelta(seconds=1))
    await assert_all_refused(client, {"Authorization": f"Bearer {full}"})
    # A key expired through the API is refused from then on.
    a, full2 = await cp.tailnet.create_api_key(datetime.now(UTC) + timedelta(days=1))
    h = {"Authorization": f"Bearer {full2}"}
    assert (await client.get("/api/v1/user", headers=h)).status == 200
    resp = await client.post("/api/v1/apikey/expire", headers=h, json={"id": str(a.id)})
    assert resp.status == 200
    await assert_all_refused(client, h)


async def test_valid_key_reaches_handlers(api: tuple[TestClient, Any]) -> None:
    client, cp = api
    _, full = await cp.tailnet.create_api_key(datetime.now(UTC) + timedelta(days=1))
    h = {"Authorization": f"Bearer {full}"}
    resp = await client.get("/api/v1/user", headers=h)
    assert resp.status == 200
    assert [u["name"] for u in (await resp.json())["users"]] == ["secretuser"]
    for r in ROUTES:
        resp = await client.request(r.method, concrete(r.path), headers=h)
        assert resp.status != 401, (r.method, r.path)
    resp = await client.get("/api/v1/nonexistent", headers=h)
    assert resp.status == 404
    assert_error_body(await resp.json(), 404)
    # last_seen is recorded for a used key.
    keys = (await (await client.get("/api/v1/apikey", headers=h)).json())["apiKeys"]
    assert any(k["lastSeen"] is not None for k in keys)


async def test_trusted_app_needs_no_key(tmp_path: Path) -> None:
    client, cp = await make_client(tmp_path, trusted=True)
    try:
        resp = await client.post("/api/v1/user", json={"name": "alice"})
        assert resp.status == 200
        assert (await resp.json())["user"]["name"] == "alice"
    finally:
        await client.close()
        await cp.tailnet.close()


async def test_public_documents(api: tuple[TestClient, Any]) -> None:
    client, _ = api
    assert (await client.get("/version")).status == 200
    resp = await client.get("/api/v1/openapi.yaml")
    assert resp.status == 200
    doc = yaml.safe_load(await resp.text())
    assert doc["openapi"].startswith("3.")
    ops = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert ops == {(r.method, r.path) for r in ROUTES}
    assert "Node" in doc["components"]["schemas"]
    v2 = await (await client.get("/swagger/v1/openapiv2.json")).json()
    assert v2["swagger"] == "2.0"
    ids = {op["operationId"] for item in v2["paths"].values() for op in item.values()}
    assert "HeadscaleService_ListNodes" in ids and "HeadscaleService_SetApprovedRoutes" in ids
    refs = re.findall(r'"\$ref": "#/definitions/(\w+)"', json.dumps(v2))
    assert refs and set(refs) <= set(v2["definitions"])


async def test_cors_allow_list(tmp_path: Path) -> None:
    client, cp = await make_client(tmp_path, trusted=False,
                                   cors_origins=["https://ui.example"])
    try:
        resp = await client.options("/api/v1/user", headers={
            "Origin": "https://ui.example", "Access-Control-Request-Method": "GET"})
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "https://ui.example"
        assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
        resp = await client.get("/api/v1/user", headers={"Origin": "https://ui.example"})
        assert resp.status == 401
        assert resp.headers["Access-Control-Allow-Origin"] == "https://ui.example"
        resp = await client.get("/api/v1/user", headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in resp.headers
    finally:
        await client.close()
        await cp.tailnet.close()
