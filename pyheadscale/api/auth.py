"""Bearer API-key check for /api/v1 and the optional CORS allow-list.

Over the unix socket (trusted=True) access to the socket is the trust boundary, as in
Headscale; everywhere else a valid, unexpired `hskey-api-...` key is required and anything
else gets the plain-text 401 that UIs recognise.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from pyheadscale.api.audited import audited, is_audited, set_actor
from pyheadscale.api.errors import APIError, error_response, unauthorized
from pyheadscale.audit import CLI_SOCKET, Actor
from pyheadscale.state.errors import InvalidAPIKey, StateError
from pyheadscale.state.model import ApiKey
from pyheadscale.state.tailnet import Tailnet

log = logging.getLogger("pyheadscale.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CORS_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"


async def authenticate(tailnet: Tailnet, request: web.Request) -> ApiKey | None:
    """The valid, unexpired API key of the request's Bearer header, else None."""
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return None
    token = header[len("Bearer "):].strip()
    if not token:
        return None
    try:
        return await tailnet.validate_api_key(token)
    except (InvalidAPIKey, StateError):
        return None


class CORS:
    def __init__(self, origins: Iterable[str]) -> None:
        self.origins = {o.rstrip("/") for o in origins if o}
        self.any = "*" in self.origins

    def __bool__(self) -> bool:
        return bool(self.origins)

    def allowed(self, origin: str | None) -> str | None:
        if not origin or not self.origins:
            return None
        if self.any or origin.rstrip("/") in self.origins:
            return origin
        return None

    def decorate(self, request: web.Request, resp: web.StreamResponse) -> None:
        origin = self.allowed(request.headers.get("Origin"))
        if origin is not None:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Vary"] = "Origin"

    def preflight(self, request: web.Request) -> web.Response:
        resp = web.Response(status=204)
        origin = self.allowed(request.headers.get("Origin"))
        if origin is not None:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Allow-Methods"] = CORS_METHODS
            resp.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
            resp.headers["Access-Control-Max-Age"] = "600"
            resp.headers["Vary"] = "Origin"
        return resp


def guard(handler: Handler, tailnet: Tailnet, *, trusted: bool, cors: CORS,
          public: bool = False, op_id: str = "") -> Handler:
    """Wrap an API handler: key check, typed-error mapping, CORS headers, and the audit line
    of an admin action (`op_id`, see audited.py) naming the caller."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        resp: web.StreamResponse | None = None
        if trusted:
            set_actor(request, CLI_SOCKET)
        elif not public:
            key = await authenticate(tailnet, request)
            if key is None:
                resp = unauthorized()
            else:
                set_actor(request, Actor("api_key", key.prefix))
        if resp is None:
            try:
                # Read first (aiohttp keeps it for the handler): the audit line names ids
                # that only the body carries.
                body = await request.read() if is_audited(op_id) else None
                resp = await handler(request)
                audited(op_id, request, resp, body)
            except APIError as e:
                resp = e.response()
            except web.HTTPException:
                raise
            except Exception as e:  # bad input must never crash the server
                log.exception("API handler %s failed", request.path)
                resp = error_response(500, f"internal error: {e}")
        if cors:
            cors.decorate(request, resp)
        return resp

    return wrapped
