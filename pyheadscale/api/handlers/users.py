"""/api/v1/user: list, create, rename and delete users."""

from __future__ import annotations

from aiohttp import web

from pyheadscale.api import shapes
from pyheadscale.api.errors import APIError, state_errors
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
        name = text_field(body, "name")
        if name and self.tailnet.user_by_name(name) is not None:
            raise APIError(409, "user already exists")
        with state_errors("creating user"):
            u = await self.tailnet.create_user(
                name, display_name=text_field(body, "displayName", "display_name"),
                email=text_field(body, "email"),
                profile_pic_url=text_field(body, "pictureUrl", "picture_url"))
        return web.json_response({"user": shapes.user(u)})

    async def rename_user(self, request: web.Request) -> web.Response:
        uid = parse_uint(request.match_info["oldId"], "invalid user id")
        new_name = request.match_info["newName"]
        with state_errors("renaming user"):
            self.tailnet.get_user(uid)
            u = await self.tailnet.rename_user(uid, new_name)
        return web.json_response({"user": shapes.user(u)})

    async def delete_user(self, request: web.Request) -> web.Response:
        uid = parse_uint(request.match_info["id"], "invalid user id")
        # Headscale ErrUserStillHasNodes (a Conflict) is a 400.
        with state_errors("deleting user", conflict_status=400):
            self.tailnet.get_user(uid)
            await self.tailnet.delete_user(uid)
        return web.json_response({})
