"""Tailscale-compatible `/api/v2` (Headscale 0.30's), with OAuth client credentials.

Routes, scopes and shapes follow Headscale's development line; the few Tailscale operations it
has not ported, which Tailscale's own tools call, are marked as extensions in routes.py. The
handlers receive only V2Deps (deps.py) and share every write with /api/v1 through the state
layer.
"""

from __future__ import annotations

from aiohttp import web

from pyheadscale.api.v2 import openapi, token
from pyheadscale.api.v2.common import error_response
from pyheadscale.api.v2.deps import Settings, V2Deps
from pyheadscale.api.v2.routes import ROUTES, guard

__all__ = ["ROUTES", "Settings", "V2Deps", "add_v2_routes"]


def add_v2_routes(app: web.Application, deps: V2Deps, *, trusted: bool) -> None:
    """Mount /api/v2 on `app`; trusted=True (the unix socket) skips authentication."""
    for r in ROUTES:
        app.router.add_route(r.method, r.path, guard(r, deps, trusted=trusted))

    async def oauth_token(request: web.Request) -> web.Response:
        return await token.token(deps, request)

    async def not_found(request: web.Request) -> web.Response:
        return error_response(404, "not found")

    app.router.add_post("/api/v2/oauth/token", oauth_token)
    app.router.add_get("/api/v2/openapi", openapi.openapi_json)
    app.router.add_get("/api/v2/openapi.json", openapi.openapi_json)
    app.router.add_get("/api/v2/openapi.yaml", openapi.openapi_yaml)
    app.router.add_get("/api/v2/docs", openapi.docs)
    app.router.add_route("*", "/api/v2/{tail:.*}", not_found)
