"""Hostile input to /api/v2 and its token endpoint: malformed credentials and headers, wrong
types, oversized and unbounded fields, repeated form parameters. Each gets a precise 4xx in
the right error shape, and nothing is half-written."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import pytest

from tests.unit._apiv2fix import v2_env

KEYS = "/api/v2/tailnet/-/keys"
TOKEN = "/api/v2/oauth/token"


BAD_HEADERS = [
    "", "Bearer", "Bearer ", "Basic", "Basic !!!notbase64", "Basic " + base64.b64encode(
        b"\xff\xfe:").decode(), "Digest abc", "Bearer " + "x" * 5000,
    "Bearer hskey-oauthtok-" + "0" * 12 + "-" + "0" * 64,
    "Bearer hskey-oauthtok-short", "Bearer hskey-api-" + "z" * 12 + "-" + "0" * 64,
]


async def test_bad_credentials_are_401(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        for header in BAD_HEADERS:
            resp = await e.client.get("/api/v2/tailnet/-/devices",
                                      headers={"Authorization": header} if header else {})
            assert resp.status == 401, header
            assert await resp.json() == {"message": "unauthorized", "status": 401}


BAD_KEY_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"capabilities": {"devices": {"create": {"tags": "tag:ci"}}}}, "tags"),
    ({"capabilities": {"devices": {"create": {"reusable": "true", "tags": ["tag:ci"]}}}},
     "reusable"),
    ({"expirySeconds": -5, "capabilities": {"devices": {"create": {"tags": ["tag:ci"]}}}},
     "expirySeconds"),
    ({"expirySeconds": 10**12}, "expirySeconds"),
    ({"expirySeconds": "3600"}, "expirySeconds"),
    ({"description": "x" * 51}, "description"),
    ({"keyType": "federated"}, "keyType"),
    ({"capabilities": {"devices": {"create": {"tags": ["tag:a"] * 65}}}}, "tags"),
    ({"capabilities": {"devices": {"create": {"tags": ["tag:" + "a" * 200]}}}}, "tags"),
    ({"keyType": "client", "scopes": ["s"] * 33}, "scopes"),
    ({"keyType": "client", "scopes": "all"}, "scopes"),
]


async def test_malformed_key_bodies(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        before = (len(e.deps.tailnet.preauth_keys), len(e.deps.oauth.clients))
        for body, fragment in BAD_KEY_BODIES:
            status, out = await e.call("POST", KEYS, e.admin, json=body)
            assert status == 400 and out["status"] == 400, out
            assert out["message"].startswith("invalid request body"), out
            assert fragment in out["message"] and out["data"][0]["errors"], out
        assert (len(e.deps.tailnet.preauth_keys), len(e.deps.oauth.clients)) == before


async def test_not_json_and_oversized_bodies(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        nid = await e.node(1, "dut")
        for raw, status in [(b"{", 400), (b"[]", 400), (b'"x"', 400), (b"\xff\xfe", 400),
                            (b"{" + b" " * (1 << 20) + b"}", 413)]:
            got, body = await e.call("POST", f"/api/v2/device/{nid}/name", e.admin, data=raw)
            assert got == status and body["status"] == status, (raw[:10], body)
        assert e.deps.tailnet.nodes[nid].given_name == "dut"
        status, body = await e.call("POST", f"/api/v2/device/{nid}/routes", e.admin,
                                    json={"routes": ["10.0.0.0/8"] * 1025})
        assert status == 400
        status, body = await e.call("POST", f"/api/v2/device/{nid}/name", e.admin,
                                    json={"name": "n" * 300})
        assert status == 400
        status, _ = await e.call("POST", "/api/v2/tailnet/-/acl", e.admin,
                                 data=b"{" + b" " * (1 << 20) + b"}")
        assert status == 413


async def test_unknown_scopes_and_tags_on_clients(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        for body, msg in [({"scopes": ["root"]}, "unknown scope"),
                          ({"scopes": []}, "at least one scope"),
                          ({"scopes": ["auth_keys"]}, "tags are required"),
                          ({"scopes": ["users"], "tags": ["ci:tag:x"]}, "did not begin with 'tag:'")]:
            status, out = await e.call("POST", KEYS, e.admin, json={"keyType": "client", **body})
            assert status == 400 and msg in out["message"], (body, out)
        assert e.deps.oauth.clients == {}


async def test_token_endpoint_errors(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        secret = await e.client_secret(["users:read"], [])

        async def post(data: Any, **headers: str) -> tuple[int, Any, Any]:
            resp = await e.client.post(TOKEN, data=data, headers=headers)
            return resp.status, await resp.json(), resp.headers

        status, body, headers = await post({"grant_type": "password", "client_secret": secret})
        assert (status, body["error"]) == (400, "unsupported_grant_type")
        assert headers["Cache-Control"] == "no-store"
        assert (await post({}))[:2] == (401, {"error": "invalid_client",
                                              "error_description": "missing client credentials"})
        for bad in ("nope", secret[:-1] + ("0" if secret[-1] != "0" else "1"),
                    "hskey-client-" + "0" * 12 + "-" + "0" * 64, secret + "x"):
            status, body, _ = await post({"client_secret": bad})
            assert (status, body["error"]) == (401, "invalid_client"), bad
        status, body, _ = await post(b"client_secret=a&client_secret=b",
                                     **{"Content-Type": "application/x-www-form-urlencoded"})
        assert (status, body["error"]) == (400, "invalid_request")
        assert (await post(b"x" * 20000))[1]["error"] == "invalid_request"
        assert (await post({"client_secret": secret, "scope": "users"}))[1]["error"] == \
            "invalid_scope"
        assert (await post({"client_secret": secret, "tags": "tag:x"}))[1]["error"] == \
            "invalid_target"
        # HTTP Basic with the client id as user name (what Go's x/oauth2 sends), and
        # Tailscale's "?attr" suffix on a secret.
        basic = base64.b64encode(f"{secret.split('-')[2]}:{secret}".encode()).decode()
        status, body, _ = await post({"grant_type": "client_credentials"},
                                     Authorization=f"Basic {basic}")
        assert status == 200 and body["token_type"] == "Bearer" and body["scope"] == "users:read"
        assert (await post({"client_secret": secret + "?ephemeral=true"}))[0] == 200
        assert (await e.call("GET", "/api/v2/tailnet/-/users", body["access_token"]))[0] == 200


async def test_unknown_routes_and_methods_answer_in_tailscale_shape(tmp_path: Path) -> None:
    async with v2_env(tmp_path) as e:
        for method, path in [("GET", "/api/v2/nothing"), ("PUT", "/api/v2/tailnet/-/devices"),
                             ("GET", "/api/v2/tailnet/-/keys/1/extra")]:
            status, body = await e.call(method, path, e.admin)
            assert status == 404 and body == {"message": "not found", "status": 404}
        for key_id in ("0", "99999999999999999999", "abc", "0123456789ab"):
            status, _ = await e.call("GET", f"{KEYS}/{key_id}", e.admin)
            assert status == 404, key_id


async def test_token_flood_runs_at_most_two_hashes_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each wrong secret for a real client costs one Argon2id check (19 MiB): a burst of them
    is queued, never run all at once."""
    import threading
    import time

    from pyheadscale.auth import oauth as oa

    real = oa.check_secret
    lock = threading.Lock()
    running = peak = 0

    def counting(secret: str, hashed: bytes | None) -> bool:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            time.sleep(0.02)
            return real(secret, hashed)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(oa, "check_secret", counting)
    async with v2_env(tmp_path) as e:
        secret = await e.client_secret(["users:read"], [])
        wrong = [secret[:-4] + f"{i:04x}" for i in range(24)]

        async def attempt(s: str) -> int:
            resp = await e.client.post(TOKEN, data={"client_secret": s})
            return resp.status

        statuses = await asyncio.gather(*(attempt(s) for s in wrong))
        assert set(statuses) == {401} and 1 <= peak <= 2
        assert (await attempt(secret)) == 200
