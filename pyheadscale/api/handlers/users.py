"""/api/v1/user: list, create, rename and delete users."""

from __future__ import annotations

from aiohttp import web

from pyheadscale.api import shapes
from pyheadscale.api.handlers.base import HandlerBase
from pyheadscale.api.request import (
    parse_uint,
    read_body,
    text_field,
)


class UserHandlers(HandlerBase):
    """Handlers of the Users routes."""

    async def list_users(self, request: web.Request) -> web.Response:
        q = request.query
        id_text = q.get("id", "")
        uid = parse_uint(id_text, "invalid id")
        name, email = q.get("name", ""), q.get("email", "")
        users = self.tailnet.list_users()
        if name:
            users = [u for u in users if u.name == name]
        elif email:
            users = [u for u in users if u.email == email]
        elif uid:
            users = [u for u in users if u.id == uid]
        return web.json_response({"users": [shapes.user(u) for u in users]})

    async def create_user(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        u = await self.actions.create_user(
            text_field(body, "name"),
            display_name=text_field(body, "displayName", "display_name"),
            email=text_field(body, "email"),
            picture_url=text_field(body, "pictureUrl", "picture_url"))
        return web.json_response({"user": shapes.user(u)})

    async def rename_user(self, request: web.Request) -> web.Response:
        uid = parse_uint(request.match_info["oldId"], "invalid user id")
        u = await self.actions.rename_user(uid, request.match_info["newName"])
        return web.json_response({"user": shapes.user(u)})

    async def delete_user(self, request: web.Request) -> web.Response:
        uid = parse_uint(request.match_info["id"], "invalid user id")
        await self.actions.delete_user(uid)
        return web.json_response({})
