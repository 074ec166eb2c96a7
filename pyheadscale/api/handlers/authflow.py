"""/api/v1/auth: finish, approve or reject a pending interactive login (node registration or
an SSH check)."""

from __future__ import annotations

from aiohttp import web

from pyheadscale.api.handlers.base import HandlerBase
from pyheadscale.api.request import (
    read_body,
    text_field,
)


class AuthFlowHandlers(HandlerBase):
    """Handlers of the Auth routes."""

    async def auth_register(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        return await self._register(text_field(body, "authId", "auth_id"),
                                    text_field(body, "user"))

    async def auth_approve(self, request: web.Request) -> web.Response:
        auth_id = text_field(await read_body(request), "authId", "auth_id")
        await self.actions.approve_pending(auth_id)
        return web.json_response({})

    async def auth_reject(self, request: web.Request) -> web.Response:
        auth_id = text_field(await read_body(request), "authId", "auth_id")
        await self.actions.reject_pending(auth_id)
        return web.json_response({})
