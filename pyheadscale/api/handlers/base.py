"""What every /api/v1 handler group shares: the control plane, and how nodes and users
are looked up and shaped for an answer."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pyheadscale.api import shapes
from pyheadscale.api.errors import not_found, state_errors
from pyheadscale.api.request import check_auth_id
from pyheadscale.auth.webflow import UnknownAuthID
from pyheadscale.state.model import Node


class HandlerBase:
    """State and lookups shared by the resource handler groups (mixed together in V1API)."""

    def __init__(self, control: Any) -> None:
        self.control = control
        self.tailnet = control.tailnet
        self.policy = control.policy

    def _node(self, n: Node, **kw: Any) -> dict[str, Any]:
        tn = self.tailnet
        return shapes.node(n, tn.users, tn.preauth_keys, **kw)

    def _primary(self, n: Node) -> list[Any]:
        mapctx = getattr(self.control, "mapctx", None)
        if mapctx is None:
            return []
        return [r for r in mapctx.routes_of(n.id) if r not in shapes.EXIT_ROUTES]

    def _user_by_name(self, name: str, context: str) -> Any:
        u = self.tailnet.user_by_name(name) if name else None
        if u is None:
            raise not_found(f"{context}: user not found")
        return u

    def _existing_node(self, node_id: int, context: str = "") -> Node:
        n = self.tailnet.nodes.get(node_id)
        if n is None:
            raise not_found(f"{context}: node not found" if context else "node not found")
        return n

    async def _register(self, auth_id: str, user_name: str) -> web.Response:
        """Register the node waiting under `auth_id` for `user_name` (nodes and auth routes)."""
        check_auth_id(auth_id, "registering node")
        u = self._user_by_name(user_name, "looking up user")
        try:
            with state_errors("registering node"):
                n = await self.control.webflow.register(auth_id, u.id)
        except UnknownAuthID as e:
            raise not_found(f"registering node: {e}") from None
        return web.json_response({"node": self._node(n)})
