"""/api/v1/preauthkey: list, create, expire and delete pre-auth keys."""

from __future__ import annotations

from aiohttp import web

from pyheadscale.api import shapes
from pyheadscale.api.handlers.base import HandlerBase
from pyheadscale.api.request import (
    bool_value,
    check_tags,
    expiration_field,
    list_field,
    parse_uint,
    pick,
    read_body,
)


class PreAuthKeyHandlers(HandlerBase):
    """Handlers of the PreAuthKeys routes."""

    async def list_preauth_keys(self, request: web.Request) -> web.Response:
        tn = self.tailnet
        return web.json_response({"preAuthKeys": [shapes.preauth_key(k, tn.users)
                                                  for k in tn.list_preauth_keys()]})

    async def create_preauth_key(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        uid = parse_uint(pick(body, "user"), "invalid user id")
        tags = list_field(body, "aclTags", "acl_tags")
        check_tags(tags, "invalid tag")
        expiration = expiration_field(body, "creating pre-auth key")
        k, full = await self.actions.create_preauth_key(
            uid or None,
            reusable=bool_value(pick(body, "reusable", default=False)),
            ephemeral=bool_value(pick(body, "ephemeral", default=False)),
            expiration=expiration, tags=tags)
        return web.json_response(
            {"preAuthKey": shapes.preauth_key(k, self.tailnet.users, full_key=full)})

    async def expire_preauth_key(self, request: web.Request) -> web.Response:
        kid = parse_uint(pick(await read_body(request), "id"), "invalid pre-auth key id")
        await self.actions.expire_preauth_key(kid)
        return web.json_response({})

    async def delete_preauth_key(self, request: web.Request) -> web.Response:
        kid = parse_uint(request.query.get("id", ""), "invalid pre-auth key id")
        await self.actions.delete_preauth_key(kid)
        return web.json_response({})
