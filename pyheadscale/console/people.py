"""Users (create, rename, delete; their nodes and keys) and Keys (pre-auth keys, API keys).

A new key's full text is in the answer to the POST that made it and nowhere else: the page
is not cached (Cache-Control: no-store) and reloading it does not show the key again.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from aiohttp import web

from pyheadscale.api import shapes
from pyheadscale.api.audited import Seen
from pyheadscale.api.errors import APIError
from pyheadscale.console.views import iso, key_row, node_row, parse_tags, user_label, when
from pyheadscale.console.web import ID, Access, Console, path_id, read_form, route

# Expiry choices offered for new keys (the API takes any RFC 3339 time).
EXPIRY_CHOICES = {"1h": timedelta(hours=1), "1d": timedelta(days=1),
                  "7d": timedelta(days=7), "30d": timedelta(days=30),
                  "90d": timedelta(days=90), "365d": timedelta(days=365)}


def _expiry(choice: str) -> datetime | None:
    delta = EXPIRY_CHOICES.get(choice)
    if delta is None:
        raise APIError(400, f"unknown expiry choice {choice!r}")
    return datetime.now(UTC) + delta


class People:
    def __init__(self, console: Console) -> None:
        self.c = console
        console.mount(self)

    # -- users -----------------------------------------------------------------------------

    @route("GET", "/users", Access.READ)
    async def users(self, request: web.Request) -> web.StreamResponse:
        tn = self.c.deps.tailnet
        rows = []
        for u in sorted(tn.list_users(), key=lambda u: u.id):
            rows.append({"id": u.id, "name": u.name, "display": u.display_name,
                         "email": u.email, "provider": u.provider or "local",
                         "created": iso(u.created_at),
                         "nodes": sum(1 for n in tn.nodes.values()
                                      if n.user_id == u.id and not n.is_tagged),
                         "keys": len(tn.list_preauth_keys(u.id))})
        return self.c.render(request, "users.html", title="Users", rows=rows)

    @route("POST", "/users", Access.WRITE)
    async def create_user(self, request: web.Request) -> web.StreamResponse:
        f = await read_form(request)
        name = f.get("name", "").strip()
        return await self.c.act(request, "createUser", self.c.deps.actions.create_user(
            name, display_name=f.get("display_name", "").strip(),
            email=f.get("email", "").strip()), self.c.user_seen, f"User {name} created.",
            "/users")

    @route("GET", f"/users/{ID}", Access.READ)
    async def user(self, request: web.Request) -> web.StreamResponse:
        uid = path_id(request)
        tn = self.c.deps.tailnet
        u = tn.users.get(uid)
        if u is None:
            return self.c.render(request, "error.html", code=404, title="User",
                                 message=f"There is no user {uid}.")
        now = datetime.now(UTC)
        ctx = self.c.deps.context()
        nodes = [node_row(n, tn.users, ctx.routes_of, now) for n in tn.list_nodes(uid)
                 if not n.is_tagged]
        keys = [key_row(k, tn.users, now) for k in tn.list_preauth_keys(uid)]
        return self.c.render(request, "user.html", title=f"User {user_label(u)}", u=u,
                             nodes=nodes, keys=keys, created=iso(u.created_at),
                             groups=u.groups)

    @route("POST", f"/users/{ID}/rename", Access.WRITE)
    async def rename_user(self, request: web.Request) -> web.StreamResponse:
        uid = path_id(request)
        name = (await read_form(request)).get("name", "").strip()
        return await self.c.act(request, "renameUser", self.c.deps.actions.rename_user(
            uid, name), self.c.user_seen, f"Renamed to {name}.", f"/users/{uid}")

    @route("POST", f"/users/{ID}/delete", Access.WRITE)
    async def delete_user(self, request: web.Request) -> web.StreamResponse:
        uid = path_id(request)
        return await self.c.act_confirmed(
            request, "deleteUser", lambda: self.c.deps.actions.delete_user(uid),
            lambda _: Seen(path={"id": str(uid)}), "User deleted, with their pre-auth keys.",
            f"/users/{uid}", "/users")

    # -- keys ------------------------------------------------------------------------------

    @route("GET", "/keys", Access.READ)
    async def keys(self, request: web.Request, *, new_key: str = "",
                   new_kind: str = "") -> web.StreamResponse:
        tn = self.c.deps.tailnet
        now = datetime.now(UTC)
        paks = [key_row(k, tn.users, now)
                for k in sorted(tn.list_preauth_keys(), key=lambda k: k.id)]
        apis = [{"id": a.id, "prefix": a.prefix, "created": iso(a.created_at),
                 "expiration": when(a.expiration, now), "expired": a.is_expired(now),
                 "last_seen": when(a.last_seen, now) if a.last_seen else "never"}
                for a in sorted(tn.list_api_keys(), key=lambda a: a.id)]
        return self.c.render(request, "keys.html", title="Keys", paks=paks, apis=apis,
                             users=sorted(tn.list_users(), key=lambda u: u.name),
                             expiries=list(EXPIRY_CHOICES), new_key=new_key,
                             new_kind=new_kind)

    @route("POST", "/keys/preauth", Access.WRITE)
    async def create_preauth_key(self, request: web.Request) -> web.StreamResponse:
        f = await read_form(request)
        try:
            uid = int(f.get("user", "0") or "0")
            tags = parse_tags(f.get("tags", ""))
            k, full = await self.c.deps.actions.create_preauth_key(
                uid or None, reusable=f.get("reusable") == "yes",
                ephemeral=f.get("ephemeral") == "yes", expiration=_expiry(f.get("expiry", "")),
                tags=tags)
        except ValueError:
            self.c.flash(request, "error", "choose a user")
            return self.c.redirect("/keys")
        except APIError as e:
            self.c.flash(request, "error", e.message)
            return self.c.redirect("/keys")
        tn = self.c.deps.tailnet
        self.c.audit(request, "createPreAuthKey",
                     Seen(answer={"preAuthKey": shapes.preauth_key(k, tn.users)}))
        return await self.keys(request, new_key=full, new_kind="pre-auth key")

    @route("POST", f"/keys/preauth/{ID}/expire", Access.WRITE)
    async def expire_preauth_key(self, request: web.Request) -> web.StreamResponse:
        kid = path_id(request)
        return await self.c.act(request, "expirePreAuthKey",
                                self.c.deps.actions.expire_preauth_key(kid),
                                lambda _: Seen(body={"id": kid}),
                                f"Pre-auth key {kid} expired.", "/keys")

    @route("POST", "/keys/api", Access.WRITE)
    async def create_api_key(self, request: web.Request) -> web.StreamResponse:
        f = await read_form(request)
        try:
            full = await self.c.deps.actions.create_api_key(_expiry(f.get("expiry", "")))
        except APIError as e:
            self.c.flash(request, "error", e.message)
            return self.c.redirect("/keys")
        self.c.audit(request, "createApiKey", Seen(answer={"apiKey": full}))
        return await self.keys(request, new_key=full, new_kind="API key")

    @route("POST", f"/keys/api/{ID}/expire", Access.WRITE)
    async def expire_api_key(self, request: web.Request) -> web.StreamResponse:
        kid = path_id(request)
        a = self.c.deps.tailnet.api_keys.get(kid)
        # Named by its prefix, as `headscale apikeys expire --prefix` names it.
        seen = Seen(body={"prefix": a.prefix} if a is not None else {"id": kid})
        return await self.c.act(request, "expireApiKey",
                                self.c.deps.actions.expire_api_key(kid), lambda _: seen,
                                f"API key {kid} expired.", "/keys")
