"""/api/v1/policy: read, replace and check the policy (file or database mode; the running
policy's controller does the work, state/policystore.py holds the text)."""

from __future__ import annotations

from aiohttp import web

from pyheadscale.api import shapes
from pyheadscale.api.errors import APIError, bad_request, from_state
from pyheadscale.api.handlers.base import HandlerBase
from pyheadscale.api.request import (
    read_body,
    text_field,
)
from pyheadscale.policy import PolicyError
from pyheadscale.state.errors import StateError
from pyheadscale.state.policystore import PolicyNotFound, PolicyReadError


class PolicyHandlers(HandlerBase):
    """Handlers of the Policy routes."""

    async def get_policy(self, request: web.Request) -> web.Response:
        try:
            p = await self.policy.get()
        except PolicyNotFound as e:
            raise APIError(500, f"loading ACL from database: {e}") from None
        except PolicyReadError as e:
            raise APIError(500, str(e)) from None
        except StateError as e:
            raise from_state("loading ACL from database", e) from None
        # File mode has no update time: Headscale leaves the field unset, which its JSON
        # gateway writes as null (Headplane then shows the policy read-only).
        updated = p.updated_at if self.policy.mode == "database" else None
        return web.json_response({"policy": p.data, "updatedAt": shapes.ts_or_null(updated)})

    async def set_policy(self, request: web.Request) -> web.Response:
        text = text_field(await read_body(request), "policy")
        p = await self.actions.set_policy(text)
        return web.json_response({"policy": p.data, "updatedAt": shapes.ts(p.updated_at)})

    async def check_policy(self, request: web.Request) -> web.Response:
        text = text_field(await read_body(request), "policy")
        try:
            await self.policy.check(text)
        except PolicyError as e:
            raise bad_request(str(e)) from None
        return web.json_response({})
