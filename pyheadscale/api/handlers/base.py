"""What every /api/v1 handler group shares: its dependencies (AdminDeps), and how nodes and
users are looked up and shaped for an answer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pyheadscale.api import shapes
from pyheadscale.api.actions import AdminActions
from pyheadscale.api.errors import not_found
from pyheadscale.auth.webflow import PendingRegistrations
from pyheadscale.state.model import IPNetwork, Node, User
from pyheadscale.state.tailnet import Tailnet

if TYPE_CHECKING:  # the CLI imports api/ for messages; it need not load the control plane
    from pyheadscale.control.policyctl import PolicyController
    from pyheadscale.control.sshcheck import SSHChecks


@dataclass(frozen=True)
class AdminDeps:
    """Everything the /api/v1 handlers use (the control plane builds it)."""

    tailnet: Tailnet
    policy: PolicyController  # the running policy: get, set, check, tag_exists
    pending: PendingRegistrations  # interactive registrations waiting for `auth register`
    sshchecks: SSHChecks  # SSH check-mode sessions waiting for `auth approve|reject`
    register: Callable[[str, int], Awaitable[Node]]  # complete a pending one for a user
    primary_routes: Callable[[int], tuple[IPNetwork, ...]]  # what a node serves right now


class HandlerBase:
    """State and lookups shared by the resource handler groups (mixed together in V1API)."""

    def __init__(self, deps: AdminDeps) -> None:
        self.deps = deps
        self.tailnet = deps.tailnet
        self.policy = deps.policy
        self.pending = deps.pending
        self.sshchecks = deps.sshchecks
        self.actions = AdminActions(deps)

    def _node(self, n: Node, **kw: Any) -> dict[str, Any]:
        tn = self.tailnet
        return shapes.node(n, tn.users, tn.preauth_keys, **kw)

    def _primary(self, n: Node) -> list[IPNetwork]:
        return [r for r in self.deps.primary_routes(n.id) if r not in shapes.EXIT_ROUTES]

    def _user_by_name(self, name: str, context: str) -> User:
        return self.actions.user_by_name(name, context)

    def _existing_node(self, node_id: int, context: str = "") -> Node:
        n = self.tailnet.nodes.get(node_id)
        if n is None:
            raise not_found(f"{context}: node not found" if context else "node not found")
        return n

    async def _register(self, auth_id: str, user_name: str) -> web.Response:
        """Register the node waiting under `auth_id` for `user_name` (nodes and auth routes)."""
        n = await self.actions.register_pending(auth_id, user_name)
        return web.json_response({"node": self._node(n)})
