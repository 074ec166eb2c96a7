"""Static pages on the main listener: client setup (/apple, /windows), robots.txt, and the
security headers Headscale sends with every response."""

from __future__ import annotations

import html
import plistlib
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

# Headscale's security-header middleware.
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

# /apple/{platform} -> the Tailscale app's MDM payload type.
APPLE_PAYLOADS = {
    "ios": "io.tailscale.ipn.ios",
    "macos-app-store": "io.tailscale.ipn.macos",
    "macos-standalone": "io.tailscale.ipn.macsys",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        resp = await handler(request)
    except web.HTTPException as exc:  # 404s and other raised answers carry them too
        for k, v in SECURITY_HEADERS.items():
            exc.headers.setdefault(k, v)
        raise
    if not resp.prepared:  # a taken-over connection (/ts2021) has sent its headers already
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
    return resp


def mobileconfig(server_url: str, payload_type: str) -> bytes:
    """A configuration profile that presets the Tailscale app's control URL."""
    return plistlib.dumps({
        "PayloadUUID": str(uuid.uuid4()).upper(),
        "PayloadDisplayName": "Headscale",
        "PayloadDescription": f"Configure Tailscale login server to: {server_url}",
        "PayloadIdentifier": "com.github.juanfont.headscale",
        "PayloadRemovalDisallowed": False,
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadContent": [{
            "PayloadType": payload_type,
            "PayloadUUID": str(uuid.uuid4()).upper(),
            "PayloadIdentifier": "com.github.juanfont.headscale",
            "PayloadVersion": 1,
            "PayloadEnabled": True,
            "ControlURL": server_url,
        }],
    })


def _page(title: str, body: str) -> web.Response:
    return web.Response(content_type="text/html", text=(
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"</head><body>{body}</body></html>\n"))


def add_page_routes(app: web.Application, server_url: str) -> None:
    url = html.escape(server_url)

    async def robots(_: web.Request) -> web.Response:
        return web.Response(text="User-agent: *\nDisallow: /\n")

    async def apple(_: web.Request) -> web.Response:
        links = "".join(f'<li><a href="/apple/{p}">{p}</a></li>' for p in APPLE_PAYLOADS)
        return _page("Apple configuration", (
            "<h1>Apple configuration</h1><p>Download the profile for your Tailscale app "
            f"to use <code>{url}</code> as its login server:</p><ul>{links}</ul>"
            "<p>Or, in the macOS standalone app, run <code>tailscale login --login-server "
            f"{url}</code>.</p>"))

    async def apple_platform(request: web.Request) -> web.Response:
        payload = APPLE_PAYLOADS.get(request.match_info["platform"])
        if payload is None:
            return web.Response(status=400, text="unknown platform: use one of "
                                + ", ".join(APPLE_PAYLOADS))
        return web.Response(body=mobileconfig(server_url, payload),
                            content_type="application/x-apple-aspen-config",
                            headers={"Content-Disposition": 'attachment; filename="headscale.mobileconfig"'})

    async def windows(_: web.Request) -> web.Response:
        return _page("Windows configuration", (
            "<h1>Windows configuration</h1><p>Install Tailscale for Windows, then run in a "
            f"terminal:</p><pre><code>tailscale login --login-server {url}</code></pre>"))

    app.router.add_get("/robots.txt", robots)
    app.router.add_get("/apple", apple)
    app.router.add_get("/apple/{platform}", apple_platform)
    app.router.add_get("/windows", windows)
