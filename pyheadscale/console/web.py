"""The console's web plumbing: one aiohttp sub-application, its session and CSRF guard,
templates and small helpers the page modules share.

Every route is declared (@route on the page's handler) with what it needs: `PUBLIC` (sign-in pages), `READ` (any signed-in
role) or `WRITE` (admins only). The guard runs before any handler: a GET without a session
is sent to sign-in; every POST must carry the session's CSRF token (else 403, whoever asks);
a WRITE route refuses the auditor with 403 before the handler runs.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import jinja2
from aiohttp import web
from markupsafe import Markup

from pyheadscale.api import shapes
from pyheadscale.api.audited import Seen, record
from pyheadscale.api.errors import APIError
from pyheadscale.audit import Actor
from pyheadscale.console.deps import ConsoleDeps
from pyheadscale.console.sessions import Session, Sessions
from pyheadscale.logs import fields
from pyheadscale.state.model import Node, User

log = logging.getLogger("pyheadscale.console")

HERE = Path(__file__).parent
COOKIE = "pyheadscale_console"
CSRF_FIELD = "csrf"
MAX_FIELD = 1 << 20  # the policy text is the largest field; the app caps bodies at 1 MiB

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class Access(enum.Enum):
    PUBLIC = "public"  # sign-in: no session needed (POSTs still carry a CSRF token)
    READ = "read"  # any signed-in role
    WRITE = "write"  # admins only


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")
M = TypeVar("M", bound=Callable[..., Awaitable[web.StreamResponse]])

ID = "{id:[0-9]{1,19}}"  # a row id in a route's path; path_id reads it
_ROUTES = "_console_routes"


def route(method: str, path: str, access: Access) -> Callable[[M], M]:
    """Declare a page method the handler of `method path` (below the console's path) for
    `access`; Console.mount adds it. Stacked ones are added in the order written."""

    def mark(handler: M) -> M:
        setattr(handler, _ROUTES, [(method, path, access), *getattr(handler, _ROUTES, [])])
        return handler

    return mark


def csrf_field(token: str) -> Markup:
    """The hidden form field the guard checks on every POST (templates: csrf_field(csrf))."""
    return Markup('<input type="hidden" name="{}" value="{}">').format(CSRF_FIELD, token)


def path_id(request: web.Request) -> int:
    return int(request.match_info["id"])


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # below the console's path
    handler: Handler
    access: Access


SESSION_KEY = web.RequestKey("console_session", Session)


def session_of(request: web.Request) -> Session | None:
    """The live session the guard found for this request, if any."""
    return request[SESSION_KEY] if SESSION_KEY in request else None


class Console:
    """One server's console: its dependencies, sessions and templates."""

    def __init__(self, deps: ConsoleDeps) -> None:
        self.deps = deps
        st = deps.settings
        self.base = st.path
        self.secure = deps.server_url.startswith("https://")
        self.sessions = Sessions(st.session_idle_timeout.total_seconds(),
                                 st.session_max_age.total_seconds(),
                                 st.sign_in_link_ttl.total_seconds())
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
            undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.templates.globals["csrf_field"] = csrf_field
        self.routes: list[Route] = []
        # Our two static files, held in memory: they are small, and a plain response body
        # needs nothing from the transport (no sendfile). Pages name them with a content
        # hash, so browsers may keep them for long.
        self.static: dict[str, tuple[bytes, str]] = {}
        digest = hashlib.sha256()
        for name, ctype in (("console.css", "text/css"), ("console.js", "text/javascript")):
            body = (HERE / "static" / name).read_bytes()
            self.static[name] = (body, ctype)
            digest.update(body)
        self.static_version = digest.hexdigest()[:12]

    # -- helpers for page modules ----------------------------------------------------------

    def url(self, path: str = "") -> str:
        return self.base + path

    def origin(self) -> str:
        u = urlsplit(self.deps.server_url)
        return f"{u.scheme}://{u.netloc}"

    def render(self, request: web.Request, template: str, code: int = 200,
               **context: Any) -> web.Response:
        s = session_of(request)
        flashes = list(s.flashes) if s is not None else []
        if s is not None:
            s.flashes.clear()
        page = self.templates.get_template(template).render(
            base=self.base, static_version=self.static_version, session=s,
            csrf=s.csrf if s is not None else "", flashes=flashes, request_path=request.path, **context)
        return web.Response(text=page, content_type="text/html", status=code)

    def redirect(self, path: str) -> web.Response:
        return web.Response(status=303, headers={"Location": self.url(path)})

    @staticmethod
    def session(request: web.Request) -> Session:
        s = session_of(request)
        assert s is not None, "READ and WRITE routes always have a session"
        return s

    def actor(self, request: web.Request) -> Actor:
        return Actor("console", self.session(request).user)

    @staticmethod
    def flash(request: web.Request, kind: str, text: str) -> None:
        s = session_of(request)
        if s is not None:
            s.flashes.append((kind, text))
            del s.flashes[:-5]

    def audit(self, request: web.Request, op_id: str, seen: Seen) -> None:
        """The audit line of API operation `op_id`, which this request just performed: the
        line the API's guard writes for it, from what the API call would have carried."""
        record(op_id, self.actor(request), seen)

    def node_seen(self, n: Node) -> Seen:
        tn = self.deps.tailnet
        return Seen(answer={"node": shapes.node(n, tn.users, tn.preauth_keys)})

    @staticmethod
    def user_seen(u: User) -> Seen:
        return Seen(answer={"user": shapes.user(u)})

    async def act(self, request: web.Request, op_id: str, action: Awaitable[T],
                  seen: Callable[[T], Seen], done: str, back: str,
                  then: str | None = None) -> web.Response:
        """Run one admin action (API operation `op_id`; `seen` turns its result into what
        the API would have carried, for the audit line): the API's refusal shown at `back`,
        its message at `then` (default `back`)."""
        try:
            result = await action
        except APIError as e:
            self.flash(request, "error", e.message)
            return self.redirect(back)
        self.audit(request, op_id, seen(result))
        self.flash(request, "ok", done)
        return self.redirect(then or back)

    async def act_confirmed(self, request: web.Request, op_id: str,
                            action: Callable[[], Awaitable[T]], seen: Callable[[T], Seen],
                            done: str, back: str, then: str) -> web.Response:
        """`act` for a deletion: started only when the form's confirm box is ticked."""
        if (await read_form(request)).get("confirm") != "yes":
            self.flash(request, "error", "Tick the box to confirm the deletion.")
            return self.redirect(back)
        return await self.act(request, op_id, action(), seen, done, back, then)

    # -- wiring ----------------------------------------------------------------------------

    def mount(self, page: object) -> None:
        """Add the routes `page`'s methods declare with @route."""
        for name, member in vars(type(page)).items():
            for method, path, access in getattr(member, _ROUTES, ()):
                self.routes.append(Route(method, path, getattr(page, name), access))

    def app(self) -> web.Application:
        sub = web.Application(middlewares=[self._guard])
        for r in self.routes:
            sub.router.add_route(r.method, r.path, self._wrap(r))
        sub.router.add_get("/static/{name}", self._static)
        return sub

    async def _static(self, request: web.Request) -> web.StreamResponse:
        item = self.static.get(request.match_info["name"])
        if item is None:
            raise web.HTTPNotFound()
        body, ctype = item
        return web.Response(body=body, content_type=ctype, charset="utf-8",
                            headers={"Cache-Control": "public, max-age=86400"})

    def _wrap(self, route: Route) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            s = self.sessions.get(request.cookies.get(COOKIE))
            if s is not None:
                request[SESSION_KEY] = s
            if request.method == "POST":
                refusal = await self._check_post(request, s, route.access)
                if refusal is not None:
                    return refusal
            elif route.access is not Access.PUBLIC and s is None:
                return web.Response(status=303, headers={
                    "Location": self.url("/sign-in") + "?next=" + quote(request.path_qs)})
            return await route.handler(request)

        return handler

    async def _check_post(self, request: web.Request, s: Session | None,
                          access: Access) -> web.Response | None:
        origin = request.headers.get("Origin")
        if origin is not None and origin != "null" and origin != self.origin():
            return self.forbidden(request, "cross-site request refused")
        form = await read_form(request)
        token = form.get(CSRF_FIELD, "")
        expected = [s.csrf] if s is not None else []
        if access is Access.PUBLIC:  # sign-in forms: the pre-session double-submit cookie
            expected.append(request.cookies.get(PRE_COOKIE, ""))
        if not token or not any(e and secrets.compare_digest(token, e) for e in expected):
            return self.forbidden(request, "missing or invalid CSRF token" if s is not None
                                  or access is Access.PUBLIC
                                  else "not signed in (or the session ended)")
        if access is Access.WRITE and (s is None or not s.can_write):
            return self.forbidden(request, "the auditor role cannot change anything")
        if access is Access.READ and s is None:
            return self.forbidden(request, "not signed in (or the session ended)")
        return None

    def forbidden(self, request: web.Request, why: str) -> web.Response:
        log.info("console request refused", extra=fields(
            status=403, method=request.method, path=request.path, reason=why))
        return self.render(request, "error.html", code=403, title="Forbidden", message=why)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resp = await handler(request)
        if not resp.prepared:
            resp.headers["Content-Security-Policy"] = CSP
            resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    def set_session_cookie(self, resp: web.StreamResponse, s: Session) -> None:
        resp.set_cookie(COOKIE, s.id, path=self.base, httponly=True, secure=self.secure,
                        samesite="Lax", max_age=int(self.sessions.max_age_s))


# A pre-session CSRF token for the sign-in forms (double submit: cookie and field).
PRE_COOKIE = "pyheadscale_console_pre"

FORM_KEY: web.RequestKey[Mapping[str, str]] = web.RequestKey("console_form", dict)


async def read_form(request: web.Request) -> Mapping[str, str]:
    """The urlencoded form, read once per request; only text fields, each bounded."""
    if FORM_KEY in request:
        return request[FORM_KEY]
    out: dict[str, str] = {}
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        try:
            data = await request.post()  # over the app's body limit: 413, raised as is
        except ValueError:
            data = None
        for k, v in (data or {}).items():
            if isinstance(v, str) and len(v) <= MAX_FIELD and k not in out:
                out[k] = v
    request[FORM_KEY] = out
    return out


async def form_list(request: web.Request, name: str) -> list[str]:
    """Every value of a repeated field (checkboxes)."""
    await read_form(request)
    data = await request.post()
    return [v for v in data.getall(name, []) if isinstance(v, str) and len(v) <= 4096]
