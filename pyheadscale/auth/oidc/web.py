"""The browser side of the OIDC login: the redirect from /register/<auth_id>, /oidc/callback
(state and nonce checks, claims, rules, user upsert, confirmation page) and the POST of that
page, which registers the waiting node."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable
from datetime import UTC, datetime
from urllib.parse import parse_qs

from aiohttp import web

from pyheadscale import audit
from pyheadscale.audit import Actor
from pyheadscale.auth.oidc.claims import Claims, authorize, machine_key_short, user_fields
from pyheadscale.auth.oidc.errors import DiscoveryError, OIDCError
from pyheadscale.auth.oidc.idp import IdPClient
from pyheadscale.auth.oidc.protocol import (
    ProviderMetadata,
    authorization_url,
    new_pkce_verifier,
)
from pyheadscale.auth.oidc.sessions import (
    COOKIE_PREFIX_LEN,
    Expiring,
    FinishLogin,
    LoginInfo,
    PendingConfirmation,
    cookie_name,
)
from pyheadscale.auth.webflow import (
    AUTH_ID_PREFIX,
    Pending,
    PendingRegistrations,
    UnknownAuthID,
)
from pyheadscale.config import OIDCConfig
from pyheadscale.config.errors import key_error
from pyheadscale.state.errors import StateError
from pyheadscale.state.model import Node, User
from pyheadscale.state.tailnet import Tailnet
from pyheadscale.templates import oidc as pages

log = logging.getLogger("pyheadscale.oidc")

CALLBACK_PATH = "/oidc/callback"
CONFIRM_PATH = "/register/confirm/"
CSRF_COOKIE = "headscale_register_confirm"
SESSION_TTL_S = 15 * 60
SESSION_MAX = 1024


class OIDCProvider:
    """The OIDC relying party of one server: discovery, redirect, callback, confirmation."""

    def __init__(self, oidc: OIDCConfig, server_url: str, pending: PendingRegistrations,
                 tailnet: Tailnet) -> None:
        self.oidc = oidc
        self.pending = pending  # the registrations a login completes
        self.tailnet = tailnet
        self.server_url = server_url.rstrip("/")
        self.redirect_uri = self.server_url + CALLBACK_PATH
        self.secure_cookies = self.server_url.startswith("https://")
        self.idp = IdPClient(self.oidc, self.redirect_uri)
        self.logins = Expiring(SESSION_TTL_S, SESSION_MAX)
        self.confirmations = Expiring(SESSION_TTL_S, SESSION_MAX)

    @property
    def meta(self) -> ProviderMetadata | None:
        return self.idp.meta

    @property
    def available(self) -> bool:
        return self.meta is not None

    # -- lifecycle -----------------------------------------------------------------------

    async def discover(self) -> ProviderMetadata:
        return await self.idp.discover()

    async def on_startup(self, app: web.Application) -> None:
        try:
            await self.discover()
        except DiscoveryError as e:
            if self.oidc.only_start_if_oidc_is_available:
                raise key_error(
                    "oidc.issuer", f"OIDC provider {self.oidc.issuer} is not available ({e}); "
                    "set oidc.only_start_if_oidc_is_available: false to start without it"
                ) from None
            log.warning("failed to set up OIDC provider, falling back to CLI based "
                        "authentication: %s", e)

    async def on_cleanup(self, app: web.Application) -> None:
        await self.idp.close()

    def add_routes(self, app: web.Application) -> None:
        """/oidc/callback, POST /register/confirm/{auth_id}, and discovery at startup (the
        register page redirects here through WebAuth)."""
        app.router.add_get(CALLBACK_PATH, self.callback)
        app.router.add_post(CONFIRM_PATH + "{auth_id}", self.confirm)
        app.on_startup.append(self.on_startup)
        app.on_cleanup.append(self.on_cleanup)

    # -- GET /register/{auth_id} ---------------------------------------------------------

    async def redirect(self, request: web.Request, auth_id: str) -> web.Response:
        return self.start_login(auth_id, None)

    def start_login(self, auth_id: str, finish: FinishLogin | None) -> web.Response:
        """Send the browser to the provider; the callback registers the node waiting under
        `auth_id`, or (another use of the same redirect URI) hands the claims to `finish`."""
        assert self.meta is not None
        state, nonce = secrets.token_urlsafe(48), secrets.token_urlsafe(48)
        verifier = new_pkce_verifier() if self.oidc.pkce.enabled else None
        self.logins.put(state, LoginInfo(auth_id, nonce, verifier, finish=finish))
        url = authorization_url(self.meta, self.oidc, self.redirect_uri, state, nonce, verifier)
        resp = web.Response(status=302, headers={"Location": url})
        for base, value in (("state", state), ("nonce", nonce)):
            resp.set_cookie(cookie_name(base, value), value, path=CALLBACK_PATH, max_age=3600,
                            httponly=True, samesite="Lax", secure=self.secure_cookies)
        return resp

    # -- GET /oidc/callback ------------------------------------------------------------

    async def callback(self, request: web.Request) -> web.Response:
        return await _refusals_as_pages(self._callback(request), "OIDC login refused")

    async def _callback(self, request: web.Request) -> web.Response:
        if self.meta is None:
            raise OIDCError(503, "OIDC is not available on this server")
        if request.query.get("error"):
            raise OIDCError(400, f"the identity provider refused the login: "
                                 f"{request.query.get('error')}")
        code, state = request.query.get("code", ""), request.query.get("state", "")
        if not code or not state:
            raise OIDCError(400, "missing code or state parameter")
        if len(state) < COOKIE_PREFIX_LEN:
            raise OIDCError(400, "invalid state parameter")
        state_cookie = request.cookies.get(cookie_name("state", state))
        if state_cookie is None:
            raise OIDCError(400, "state not found")
        if not secrets.compare_digest(state_cookie, state):
            raise OIDCError(403, "state did not match")
        # Single use: a replayed callback finds nothing, whatever the provider would say.
        info: LoginInfo | None = self.logins.take(state)
        if info is None:
            raise OIDCError(410, "login session expired, try again")

        token = await self.idp.exchange(code, info.verifier)
        raw = token.get("id_token")
        if not isinstance(raw, str):
            raise OIDCError(400, "no id_token")
        id_claims = await self.idp.verify(raw)
        nonce = id_claims.get("nonce")
        if not isinstance(nonce, str) or not nonce:
            raise OIDCError(400, "nonce not found in IDToken")
        nonce_cookie = request.cookies.get(cookie_name("nonce", nonce))
        if nonce_cookie is None:
            raise OIDCError(400, "nonce not found")
        if not (secrets.compare_digest(nonce_cookie, nonce)
                and secrets.compare_digest(info.nonce, nonce)):
            raise OIDCError(403, "nonce did not match")

        claims = Claims.from_mapping(id_claims)
        access = token.get("access_token")
        if claims.needs_userinfo() and self.meta.userinfo_endpoint and isinstance(access, str):
            claims = claims.merged_with_userinfo(await self.idp.userinfo(access))
        authorize(self.oidc, claims)
        if info.finish is not None:
            done = await info.finish(request, claims)
            for base, value in (("state", state), ("nonce", nonce)):
                done.del_cookie(cookie_name(base, value), path=CALLBACK_PATH)
            return done

        try:
            pending = self.pending.newest(self.pending.get(info.auth_id))
        except UnknownAuthID:
            raise OIDCError(410, "login session expired, try again") from None
        user = await self.upsert_user(claims)
        expiry = (datetime.fromtimestamp(id_claims["exp"], UTC)
                  if self.oidc.use_expiry_from_token else None)
        csrf = secrets.token_urlsafe(32)
        self.confirmations.put(info.auth_id, PendingConfirmation(user.id, expiry, csrf))
        action = CONFIRM_PATH + info.auth_id
        page = pages.register_confirm(
            form_action=action, csrf_name=CSRF_COOKIE, csrf_token=csrf, user=display_name(user),
            hostname=str(pending.hostinfo.get("Hostname") or ""),
            os_name=str(pending.hostinfo.get("OS") or ""),
            machine_key=machine_key_short(pending.machine_key))
        resp = web.Response(text=page, content_type="text/html")
        for base, value in (("state", state), ("nonce", nonce)):
            resp.del_cookie(cookie_name(base, value), path=CALLBACK_PATH)
        resp.set_cookie(CSRF_COOKIE, csrf, path=action, max_age=SESSION_TTL_S, httponly=True,
                        samesite="Strict", secure=self.secure_cookies)
        return resp

    async def upsert_user(self, c: Claims) -> User:
        """The user the provider vouched for, created at first login, updated after."""
        tn = self.tailnet
        fields = user_fields(c, self.oidc.email_verified_required)
        ident = fields.pop("provider_identifier")
        user = next((u for u in tn.list_users() if u.provider_identifier == ident), None)
        if user is None:
            user = await tn.create_user(
                name=fields.get("name", ""), display_name=fields["display_name"],
                email=fields.get("email", ""), provider_identifier=ident, provider="oidc",
                profile_pic_url=fields["profile_pic_url"])
            audit.record(oidc_actor(user), "user.create", f"user {user.id}", name=user.name)
        # Groups (and every later change of profile) go through update_user, which publishes
        # a USER change so policies using IdP groups are recompiled live.
        return await tn.update_user(user.id, **fields)

    # -- POST /register/confirm/{auth_id} ----------------------------------------------

    async def confirm(self, request: web.Request) -> web.Response:
        return await _refusals_as_pages(self._confirm(request),
                                        "OIDC registration confirmation refused")

    async def _confirm(self, request: web.Request) -> web.Response:
        auth_id = request.match_info["auth_id"]
        if not auth_id.startswith(AUTH_ID_PREFIX):
            raise OIDCError(400, "invalid registration ID")
        if (request.content_length or 0) > 4096:
            raise OIDCError(413, "form too large")
        raw = await request.content.read(4097)
        if len(raw) > 4096:
            raise OIDCError(413, "form too large")
        form = parse_qs(raw.decode("utf-8", "replace"))
        form_csrf = (form.get(CSRF_COOKIE) or [""])[0]
        if not form_csrf:
            raise OIDCError(400, "missing csrf token")
        cookie = request.cookies.get(CSRF_COOKIE)
        if cookie is None:
            raise OIDCError(403, "missing csrf cookie")
        if not secrets.compare_digest(cookie, form_csrf):
            raise OIDCError(403, "csrf token mismatch")
        pc: PendingConfirmation | None = self.confirmations.peek(auth_id)
        if pc is None:
            raise OIDCError(403, "registration not OIDC-authorized")
        if not secrets.compare_digest(pc.csrf, cookie):
            raise OIDCError(403, "csrf token does not match cached registration")
        try:
            # Any open URL of the machine registers its newest request, and is settled
            # through it: the client waits on that one, so it is still open (webflow.py).
            with self.pending.deciding(auth_id) as pending:
                self.confirmations.take(auth_id)
                try:
                    node, had = await self._register(pending, pc)
                except StateError as e:
                    # E.g. --advertise-tags the user does not own: the waiting client is
                    # told too.
                    self.pending.reject(pending.auth_id, str(e))
                    raise OIDCError(403, str(e)) from None
                self.pending.complete(pending.auth_id, node)
        except UnknownAuthID:
            self.confirmations.take(auth_id)
            raise OIDCError(410, "registration session expired") from None
        user = self.tailnet.get_user(pc.user_id)
        audit.record(oidc_actor(user), "node.register", f"node {node.id}",
                     name=node.given_name, user=user.name)
        resp = web.Response(text=pages.auth_success(new_node=node.id not in had,
                                                    user=display_name(user)),
                            content_type="text/html")
        resp.del_cookie(CSRF_COOKIE, path=CONFIRM_PATH + auth_id)
        return resp


    async def _register(self, pending: Pending, pc: PendingConfirmation) -> tuple[Node, set[int]]:
        """The node `pending` makes for the user who logged in, and that user's nodes on the
        machine before (to tell a new node from a re-login)."""
        tn = self.tailnet
        had = {n.id for n in tn.nodes_by_machine_key(pending.machine_key)
               if n.user_id == pc.user_id}
        node = await tn.register_for_user(
            machine_key=pending.machine_key, node_key=pending.node_key, user_id=pc.user_id,
            hostinfo=pending.hostinfo, requested_expiry=pc.expiry or pending.expiry,
            register_method="oidc", capver=pending.capver)
        return node, had


def oidc_actor(user: User) -> Actor:
    """An OIDC login acts as the user it logged in: named by e-mail, else user name."""
    return Actor("oidc", user.email or user.name)


async def _refusals_as_pages(step: Awaitable[web.Response], refused: str) -> web.Response:
    """Run one browser step; a refusal is logged and shown as the error page."""
    try:
        return await step
    except OIDCError as e:
        log.info("%s: %s", refused, e.message)
        return web.Response(status=e.status,
                            text=pages.auth_error(status=e.status, message=e.message),
                            content_type="text/html")


def display_name(u: User) -> str:
    return u.display_name or u.email or u.name or (u.provider_identifier or "") or str(u.id)




