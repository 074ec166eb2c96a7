"""The interactive registration flow over Noise (AuthURL + Followup) and its web page."""

from __future__ import annotations

import asyncio
import html
import time
from datetime import UTC, datetime

from aiohttp import web

from pyheadscale.auth.oidc import OIDCProvider
from pyheadscale.auth.webflow import (
    AUTH_ID_PREFIX,
    Pending,
    RegistrationRefused,
    UnknownAuthID,
)
from pyheadscale.control.register import register_body, register_response, reply
from pyheadscale.control.sharedreg import SharedPending
from pyheadscale.control.types import ControlRequest, ResponseStream
from pyheadscale.ratelimit import source_key
from pyheadscale.state.model import Node
from pyheadscale.state.tailnet import Tailnet
from pyheadscale.tailcfg import RegisterRequest


class WebAuth:
    """Registrations that wait for a person: the CLI/API `auth register`, or OIDC (`oidc`,
    when configured) completing them."""

    def __init__(self, server_url: str, pending: SharedPending, tailnet: Tailnet,
                 oidc: OIDCProvider | None) -> None:
        self.server_url = server_url.rstrip("/")
        self.pending = pending
        self.tailnet = tailnet
        self.oidc = oidc

    def auth_url(self, auth_id: str) -> str:
        return f"{self.server_url}/register/{auth_id}"

    async def handle(self, req: ControlRequest, rr: RegisterRequest, resp: ResponseStream) -> None:
        pending = self.pending
        if rr.followup:
            auth_id = rr.followup.rstrip("/").rsplit("/", 1)[-1]
            try:
                p = await pending.fetch(auth_id)  # opened on another instance, maybe
            except UnknownAuthID:
                p = None
            if p is not None and p.machine_key == req.machine_key:
                await self._wait(p, resp)
                return
            # Expired or unknown: a *new* URL (the same one would make the client back off).
        source = source_key(req.remote)
        if not pending.rate.allow(source):
            await reply(resp, 429, "too many registration requests from this address; "
                        "retry later")
            return
        try:
            p = pending.add(machine_key=req.machine_key, node_key=rr.node_key,
                            hostinfo=rr.hostinfo, expiry=rr.expiry, ephemeral=rr.ephemeral,
                            capver=rr.version, source=source)
        except RegistrationRefused as e:
            await reply(resp, 429, str(e))
            return
        await pending.publish(p)
        await reply(resp, 200, register_body(auth_url=self.auth_url(p.auth_id)))

    async def _wait(self, p: Pending, resp: ResponseStream) -> None:
        # Held until decided, or until the registration expires: then the waiting client is
        # answered at once with a fresh AuthURL (as Headscale's cache eviction does), instead
        # of waiting on a URL that no longer works. Expiring while a person is completing
        # this login, it waits for that decision instead: the client then gets its node (or
        # the refusal), not a new URL to open for a login that just went through.
        left = p.created + self.pending.expiration_s - time.monotonic()
        try:
            with self.pending.waiting(p):
                try:
                    node: Node = await asyncio.wait_for(asyncio.shield(p.done), max(left, 0.0))
                except TimeoutError:
                    await self.pending.decided(p)
                    if not p.done.done():
                        raise
                    node = p.done.result()
        except (UnknownAuthID, TimeoutError):
            if not p.done.done():  # timed out: expire it everywhere, like the lazy sweep
                self.pending.discard(p.auth_id)
            try:
                fresh = self.pending.add(machine_key=p.machine_key, node_key=p.node_key,
                                         hostinfo=p.hostinfo, expiry=p.expiry,
                                         ephemeral=p.ephemeral, capver=p.capver,
                                         source=p.source)
            except RegistrationRefused as e:
                await reply(resp, 429, str(e))
                return
            await self.pending.publish(fresh)
            await reply(resp, 200, register_body(auth_url=self.auth_url(fresh.auth_id)))
            return
        except PermissionError as e:
            await reply(resp, 200, register_body(error=str(e)))
            return
        await reply(resp, 200, register_response(self.tailnet, node, datetime.now(UTC)))

    async def register(self, auth_id: str, user_id: int) -> Node:
        """Complete a pending registration for a user (CLI/API `auth register`)."""
        await self.pending.fetch(auth_id)  # opened on another instance, maybe
        # The machine's newest request registers, and settles all its URLs: its client
        # waits on that one, so it is still open (webflow.py).
        with self.pending.deciding(auth_id) as p:
            node = await self.tailnet.register_for_user(
                machine_key=p.machine_key, node_key=p.node_key, hostinfo=p.hostinfo,
                user_id=user_id, requested_expiry=p.expiry,
                register_method="cli", capver=p.capver)
            self.pending.complete(p.auth_id, node)
        return node

    # --- web page ---------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/register/{auth_id}", self.page)
        if self.oidc is not None:
            self.oidc.add_routes(app)

    async def page(self, request: web.Request) -> web.Response:
        auth_id = request.match_info["auth_id"]
        if not auth_id.startswith(AUTH_ID_PREFIX):
            return web.Response(status=400, text="invalid registration ID")
        try:
            await self.pending.fetch(auth_id)
        except UnknownAuthID:
            return web.Response(status=404, text="registration not found or expired")
        # OIDC: with a reachable provider the page sends the browser there instead
        # (pyheadscale/auth/oidc/); otherwise (no issuer, or provider down at start with
        # oidc.only_start_if_oidc_is_available: false) the CLI instructions below are shown.
        if self.oidc is not None and self.oidc.available:
            return await self.oidc.redirect(request, auth_id)
        cmd = f"headscale auth register --auth-id {auth_id} --user USERNAME"
        body = PAGE.format(cmd=html.escape(cmd))
        return web.Response(text=body, content_type="text/html")


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Registration - pyheadscale</title></head>
<body><h1>Machine registration</h1>
<p>Run the command below on the pyheadscale server to add this machine to your network:</p>
<pre><code>{cmd}</code></pre></body></html>
"""

