"""GET /auth/<auth_id>: the page an SSH check-mode banner sends the user to.

With OIDC the page sends the browser to the provider; the callback approves the waiting check
only when the signed-in user owns the check's source node (a tagged source has no owner and is
refused), as Headscale 0.29 does, so a stolen node key alone cannot open a session. Without
OIDC (or with the provider down) the page shows the `headscale auth approve` command.
"""

from __future__ import annotations

import re

from aiohttp import web

from pyheadscale import audit
from pyheadscale.auth.oidc import Claims, OIDCError, OIDCProvider
from pyheadscale.auth.oidc.web import display_name, oidc_actor
from pyheadscale.control.sshcheck import SSHChecks, UnknownSSHCheck
from pyheadscale.state.tailnet import Tailnet
from pyheadscale.templates import oidc as pages

AUTH_PATH = "/auth/"
# What new_auth_id makes; anything else is refused before any lookup or login state.
_AUTH_ID = re.compile(r"^hskey-authreq-[0-9a-f]{1,64}$")


class SSHCheckWeb:
    def __init__(self, checks: SSHChecks, tailnet: Tailnet, oidc: OIDCProvider | None) -> None:
        self.checks = checks
        self.tailnet = tailnet
        self.oidc = oidc

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(AUTH_PATH + "{auth_id}", self.page)

    async def page(self, request: web.Request) -> web.Response:
        auth_id = request.match_info["auth_id"]
        if not _AUTH_ID.match(auth_id):
            return _error(400, "invalid auth ID")
        if self.checks.get(auth_id) is None:
            return _error(404, "SSH check not found or expired")
        if self.oidc is not None and self.oidc.available:
            oidc = self.oidc

            async def finish(req: web.Request, claims: Claims) -> web.Response:
                return await self._approve(oidc, auth_id, claims)

            return oidc.start_login(auth_id, finish)
        return web.Response(text=pages.ssh_check_cli(auth_id=auth_id), content_type="text/html")

    async def _approve(self, oidc: OIDCProvider, auth_id: str, claims: Claims) -> web.Response:
        """The provider vouched for `claims`: approve if that user owns the source node."""
        user = await oidc.upsert_user(claims)
        check = self.checks.get(auth_id)
        if check is None:
            raise OIDCError(410, "login session expired, try again")
        src = self.tailnet.nodes.get(check.src)
        if src is None:
            raise OIDCError(410, "src node no longer exists")
        if src.is_tagged or src.user_id is None:
            raise OIDCError(403, "src node has no user owner")
        if src.user_id != user.id:
            raise OIDCError(403, "OIDC user is not the owner of the SSH source node")
        try:
            self.checks.approve(auth_id)
        except UnknownSSHCheck:  # decided by an admin while the user was at the provider
            raise OIDCError(410, "login session expired, try again") from None
        audit.record(oidc_actor(user), "ssh.check.approve", f"node {check.src}",
                     dst=f"node {check.dst}", auth_id=auth_id)
        return web.Response(text=pages.ssh_check_authorized(user=display_name(user)),
                            content_type="text/html")


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=pages.auth_error(status=status, message=message),
                        content_type="text/html")
