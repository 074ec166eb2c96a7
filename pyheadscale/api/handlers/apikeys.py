"""/api/v1/apikey: list, create, expire and delete API keys (by id or by prefix)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pyheadscale.api import shapes
from pyheadscale.api.errors import bad_request, not_found
from pyheadscale.api.handlers.base import HandlerBase
from pyheadscale.api.request import (
    expiration_field,
    parse_uint,
    pick,
    read_body,
    text_field,
)


class ApiKeyHandlers(HandlerBase):
    """Handlers of the ApiKeys routes."""

    async def list_api_keys(self, request: web.Request) -> web.Response:
        return web.json_response({"apiKeys": [shapes.api_key(a)
                                              for a in self.tailnet.list_api_keys()]})

    async def create_api_key(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        expiration = expiration_field(body, "creating api key")
        # pyheadscale extension: the user the key acts for (v2 makes untagged auth keys for it).
        user_id = parse_uint(pick(body, "user", "userId", "user_id"), "invalid user id") or None
        full = await self.actions.create_api_key(expiration, user_id)
        return web.json_response({"apiKey": full})

    def _lookup_api_key(self, id_value: Any, prefix: str) -> int:
        kid = parse_uint(id_value, "invalid api key id")
        if kid and prefix:
            raise bad_request("provide either id or prefix, not both")
        if kid:
            if kid not in self.tailnet.api_keys:
                raise not_found("getting api key: API key not found")
            return kid
        if prefix:
            text = prefix[:-3] if prefix.endswith("***") and "-" not in prefix else prefix
            a = self.tailnet.api_key_by_prefix(text)
            if a is None:
                raise not_found("getting api key: API key not found")
            return a.id
        raise bad_request("must provide id or prefix")

    async def expire_api_key(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        kid = self._lookup_api_key(pick(body, "id"), text_field(body, "prefix"))
        await self.actions.expire_api_key(kid)
        return web.json_response({})

    async def delete_api_key(self, request: web.Request) -> web.Response:
        kid = self._lookup_api_key(request.query.get("id", ""), request.match_info["prefix"])
        await self.actions.delete_api_key(kid)
        return web.json_response({})
