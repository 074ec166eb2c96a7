"""Headscale 0.29-compatible REST API `/api/v1`: the V1API object and its wiring.

Paths, verbs, status codes and message texts follow Headscale (grpc-gateway paths; the
400/404/409 mapping of its 0.30 rewrite, which the conformance goldens pin). Request bodies
accept protojson's camelCase and the proto snake_case names; uint64 fields accept strings or
numbers. The route table is routes.ROUTES (also what openapi.py documents); the handlers live
in handlers/, one module per resource; request.py reads bodies and fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web

from pyheadscale.api.auth import CORS, guard
from pyheadscale.api.errors import APIError
from pyheadscale.api.handlers import (
    AdminDeps,
    ApiKeyHandlers,
    AuthFlowHandlers,
    NodeHandlers,
    PolicyHandlers,
    PreAuthKeyHandlers,
    UserHandlers,
)
from pyheadscale.api.request import AUTH_ID_LENGTH, auth_id_error
from pyheadscale.api.routes import ROUTES, Route


def version_info() -> dict[str, Any]:
    """GET /version (Headscale VersionInfo). Headplane gates features on `version`."""
    import platform
    import sys

    from pyheadscale import __version__

    return {
        "version": "v0.29.2",
        "commit": f"pyheadscale-{__version__}",
        "buildTime": "",
        "go": {"version": f"python{sys.version.split()[0]}", "os": sys.platform,
               "arch": platform.machine()},
        "dirty": False,
    }


class V1API(UserHandlers, NodeHandlers, AuthFlowHandlers, PreAuthKeyHandlers, ApiKeyHandlers,
            PolicyHandlers):
    """Every /api/v1 handler on one object: ROUTES name them by method name."""

    async def health(self, request: web.Request) -> web.Response:
        try:
            await self.tailnet.ping_db()
        except Exception as e:  # any DB failure is the answer, not a crash
            raise APIError(500, f"pinging database: {e}") from None
        return web.json_response({"databaseConnectivity": True})

    async def not_found(self, request: web.Request) -> web.Response:
        raise APIError(404, "Not Found")


# --- wiring --------------------------------------------------------------------------------------


def add_api_routes(app: web.Application, deps: AdminDeps, *, trusted: bool,
                   cors_origins: Sequence[str] = ()) -> None:
    """Mount /api/v1 (plus the OpenAPI documents) on `app`. trusted=True (the unix-socket
    app) skips the API-key check; `cors_origins` may call it from a browser."""
    from pyheadscale.api import openapi

    cors = CORS(cors_origins)
    api = V1API(deps)
    tn = deps.tailnet
    for r in ROUTES:
        h = guard(getattr(api, r.handler), tn, trusted=trusted, cors=cors, op_id=r.op_id)
        app.router.add_route(r.method, r.path, h)
    for path, handler in openapi.public_routes():
        app.router.add_get(path, guard(handler, tn, trusted=trusted, cors=cors, public=True))
    if cors:
        async def preflight(request: web.Request) -> web.StreamResponse:
            return cors.preflight(request)

        app.router.add_route("OPTIONS", "/api/v1/{tail:.*}", preflight)
    app.router.add_route("*", "/api/v1/{tail:.*}",
                         guard(api.not_found, tn, trusted=trusted, cors=cors))


__all__ = ["AUTH_ID_LENGTH", "ROUTES", "AdminDeps", "Route", "V1API", "add_api_routes", "auth_id_error",
           "version_info"]
