"""/api/v1/auth: finish, approve or reject a pending interactive login (node registration or
an SSH check)."""

from __future__ import annotations

from aiohttp import web

from pyheadscale.api.errors import not_found
from pyheadscale.api.handlers.base import HandlerBase
from pyheadscale.api.request import (
    check_auth_id,
    read_body,
    text_field,
)
from pyheadscale.auth.webflow import Pending, UnknownAuthID


class AuthFlowHandlers(HandlerBase):
    """Handlers of the Auth routes."""

    async def auth_register(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        return await self._register(text_field(body, "authId", "auth_id"),
                                    text_field(body, "user"))

    def _pending(self, auth_id: str) -> Pending:
        check_auth_id(auth_id, "invalid auth_id")
        try:
            return self.pending.get(auth_id)
        except UnknownAuthID:
            raise not_found(f"no pending auth session for auth_id {auth_id}") from None

    async def auth_approve(self, request: web.Request) -> web.Response:
        auth_id = text_field(await read_body(request), "authId", "auth_id")
        if auth_id in self.sshchecks:  # an SSH check-mode session waits on it
            self.sshchecks.approve(auth_id)
            return web.json_response({})
        self._pending(auth_id)
        # An approval without a user: the waiting client is told to start over with a fresh
        # AuthURL, which is what Headscale's follow-up handler does with a node-less verdict.
        self.pending.discard(auth_id)
        return web.json_response({})

    async def auth_reject(self, request: web.Request) -> web.Response:
        auth_id = text_field(await read_body(request), "authId", "auth_id")
        if auth_id in self.sshchecks:
            self.sshchecks.reject(auth_id)
            return web.json_response({})
        self._pending(auth_id)
        try:
            self.pending.reject(auth_id, "auth request rejected")
        except UnknownAuthID:
            raise not_found(f"no pending auth session for auth_id {auth_id}") from None
        return web.json_response({})
