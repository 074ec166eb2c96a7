"""Signing in and out: one-time links from `headscale admin login`, and OIDC.

OIDC uses the server's one redirect URI (/oidc/callback), so an operator registers nothing
new at the provider. Who may sign in that way, and as which role, is `admin_console.admins`
and `admin_console.auditors`: an entry is a verified e-mail address, a user name
(preferred_username), or `group:<name>` for a group in the token's groups claim.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from aiohttp import web

from pyheadscale import audit
from pyheadscale.audit import CLI_SOCKET
from pyheadscale.auth.oidc import Claims
from pyheadscale.console.sessions import Role
from pyheadscale.console.web import COOKIE, PRE_COOKIE, Access, Console, read_form, route
from pyheadscale.logs import fields

log = logging.getLogger("pyheadscale.console")

LINK_REQUEST_MAX = 4096


def matches(entries: Sequence[str], c: Claims) -> bool:
    for e in entries:
        e = e.strip()
        if e.startswith("group:"):
            if e[len("group:"):] in c.groups:
                return True
        elif "@" in e:
            # Only a verified address names a person.
            if c.email_verified and c.email and c.email.lower() == e.lower():
                return True
        elif e and e == c.username:
            return True
    return False


def role_for(admins: Sequence[str], auditors: Sequence[str], c: Claims) -> Role | None:
    if matches(admins, c):
        return Role.ADMIN
    if matches(auditors, c):
        return Role.AUDITOR
    return None


def safe_next(console: Console, value: str) -> str:
    """Only a path inside the console may be returned to after sign-in."""
    if value.startswith(console.base + "/") and not value.startswith("//") and "\\" not in value:
        return value
    return console.url("/machines")


class SignIn:
    def __init__(self, console: Console) -> None:
        self.c = console
        console.mount(self)

    @route("GET", "", Access.PUBLIC)
    @route("GET", "/", Access.PUBLIC)
    async def home(self, request: web.Request) -> web.StreamResponse:
        return self.c.redirect("/machines")

    def _pre_token(self, request: web.Request) -> str:
        return request.cookies.get(PRE_COOKIE) or secrets.token_urlsafe(32)

    def _with_pre_cookie(self, resp: web.Response, token: str) -> web.Response:
        resp.set_cookie(PRE_COOKIE, token, path=self.c.base, httponly=True,
                        secure=self.c.secure, samesite="Strict", max_age=3600)
        return resp

    @route("GET", "/sign-in", Access.PUBLIC)
    async def page(self, request: web.Request) -> web.StreamResponse:
        oidc = self.c.deps.oidc
        nxt = safe_next(self.c, request.query.get("next", ""))
        return self.c.render(
            request, "signin.html", title="Sign in",
            oidc_url=(self.c.url("/sign-in/oidc") + "?next=" + quote(nxt)
                      if oidc is not None and oidc.available else ""),
            oidc_configured=oidc is not None, message=request.query.get("m", ""))

    @route("GET", "/sign-in/link", Access.PUBLIC)
    async def link_page(self, request: web.Request) -> web.StreamResponse:
        token = request.query.get("token", "")[:128]
        link = self.c.sessions.peek_link(token) if token else None
        if link is None:
            return self.c.render(request, "error.html", code=410, title="Sign-in link",
                                 message="This sign-in link is unknown, used or expired. Run "
                                         "`headscale admin login` for a new one.")
        pre = self._pre_token(request)
        resp = self.c.render(request, "signin_link.html", title="Sign in", token=token,
                             user=link.user, role=link.role.value, pre_csrf=pre)
        return self._with_pre_cookie(resp, pre)

    @route("POST", "/sign-in/link", Access.PUBLIC)
    async def link_redeem(self, request: web.Request) -> web.StreamResponse:
        form = await read_form(request)
        s = self.c.sessions.redeem_link(form.get("token", "")[:128])
        if s is None:
            return self.c.render(request, "error.html", code=410, title="Sign-in link",
                                 message="This sign-in link is unknown, used or expired.")
        log.info("console sign-in", extra=fields(user=s.user, role=s.role.value, via="link"))
        resp = self.c.redirect("/machines")
        self.c.set_session_cookie(resp, s)
        resp.del_cookie(PRE_COOKIE, path=self.c.base)
        return resp

    @route("GET", "/sign-in/oidc", Access.PUBLIC)
    async def oidc_start(self, request: web.Request) -> web.StreamResponse:
        oidc = self.c.deps.oidc
        if oidc is None or not oidc.available:
            return self.c.render(request, "error.html", code=404, title="Sign in",
                                 message="OIDC is not configured or its provider is not "
                                         "available.")
        nxt = safe_next(self.c, request.query.get("next", ""))

        async def finish(req: web.Request, claims: Claims) -> web.Response:
            return self._oidc_finish(req, claims, nxt)

        return oidc.start_login("", finish)

    def _oidc_finish(self, request: web.Request, claims: Claims, nxt: str) -> web.Response:
        st = self.c.deps.settings
        role = role_for(st.admins, st.auditors, claims)
        who = claims.email or claims.username or claims.sub
        if role is None:
            log.info("console sign-in refused: not in admin_console.admins or auditors",
                     extra=fields(user=who, via="oidc"))
            return self.c.render(request, "error.html", code=403, title="Sign in",
                                 message=f"{who} may not use the admin console (see "
                                         "admin_console.admins and auditors).")
        s = self.c.sessions.start(f"oidc:{who}", role)
        log.info("console sign-in", extra=fields(user=s.user, role=role.value, via="oidc"))
        resp = web.Response(status=303, headers={"Location": nxt})
        self.c.set_session_cookie(resp, s)
        return resp

    @route("POST", "/sign-out", Access.READ)
    async def sign_out(self, request: web.Request) -> web.StreamResponse:
        s = self.c.session(request)
        self.c.sessions.end(s.id)
        resp = web.Response(status=303, headers={
            "Location": self.c.url("/sign-in") + "?m=" + quote("Signed out.")})
        resp.del_cookie(COOKIE, path=self.c.base)
        return resp

    # -- the unix socket: `headscale admin login` ------------------------------------------

    def add_socket_routes(self, app: web.Application) -> None:
        app.router.add_post("/console/sign-in-link", self.new_link)

    async def new_link(self, request: web.Request) -> web.Response:
        raw = await request.content.read(LINK_REQUEST_MAX + 1)
        if len(raw) > LINK_REQUEST_MAX:
            return web.json_response({"message": "request too large"}, status=413)
        try:
            body: Any = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("expected an object")
            user = body.get("user", "admin")
            role = Role.parse(str(body.get("role", "admin")))
            if not isinstance(user, str) or not 0 < len(user) <= 64 or not user.isprintable():
                raise ValueError("user must be 1 to 64 printable characters")
        except ValueError as e:
            return web.json_response({"message": str(e)}, status=400)
        if not self.c.deps.settings.enabled:
            return web.json_response({"message": "the admin console is disabled "
                                                 "(admin_console.enabled: false)"}, status=409)
        link = self.c.sessions.new_link(f"cli:{user}", role)
        # A link is a credential, as a new API key is: audited, its token never written.
        audit.record(CLI_SOCKET, "console.sign_in_link", f"console user cli:{user}",
                     role=role.value)
        url = (self.c.deps.server_url.rstrip("/") + self.c.url("/sign-in/link") + "?token="
               + link.token)
        return web.json_response({"url": url, "role": role.value,
                                  "expiresInSeconds": int(self.c.sessions.link_ttl_s)})
