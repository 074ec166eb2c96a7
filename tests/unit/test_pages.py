"""Client setup pages and Headscale's security headers."""

from __future__ import annotations

import plistlib

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pyheadscale.pages import APPLE_PAYLOADS, SECURITY_HEADERS, add_page_routes, security_headers

URL = "https://hs.example.com"


async def client() -> TestClient:
    app = web.Application(middlewares=[security_headers])
    add_page_routes(app, URL)
    c = TestClient(TestServer(app))
    await c.start_server()
    return c


async def test_pages_and_headers() -> None:
    c = await client()
    try:
        r = await c.get("/robots.txt")
        assert r.status == 200 and "Disallow: /" in await r.text()
        for k, v in SECURITY_HEADERS.items():
            assert r.headers[k] == v
        r = await c.get("/windows")
        assert f"tailscale login --login-server {URL}" in await r.text()
        assert r.headers["X-Frame-Options"] == "DENY"
        r = await c.get("/apple")
        page = await r.text()
        assert all(f"/apple/{p}" in page for p in APPLE_PAYLOADS)
        r = await c.get("/nope")
        assert r.status == 404 and r.headers["X-Content-Type-Options"] == "nosniff"
    finally:
        await c.close()


async def test_mobileconfig_presets_the_control_url() -> None:
    c = await client()
    try:
        for platform, payload_type in APPLE_PAYLOADS.items():
            r = await c.get(f"/apple/{platform}")
            assert r.status == 200
            assert r.headers["Content-Type"] == "application/x-apple-aspen-config"
            profile = plistlib.loads(await r.read())
            (content,) = profile["PayloadContent"]
            assert content["PayloadType"] == payload_type
            assert content["ControlURL"] == URL
        r = await c.get("/apple/android")
        assert r.status == 400 and "ios" in await r.text()
    finally:
        await c.close()
