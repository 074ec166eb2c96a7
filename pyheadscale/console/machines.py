"""Machines: the list (search, filters, live online state), a node's page and its actions,
and the registrations waiting for an admin."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from aiohttp import web

from pyheadscale.api.audited import Seen
from pyheadscale.auth.webflow import AUTH_ID_PREFIX
from pyheadscale.console.views import (
    NodeRow,
    matches,
    node_row,
    parse_routes,
    parse_tags,
    user_label,
)
from pyheadscale.console.web import ID, Access, Console, form_list, path_id, read_form, route

STATUSES = ("online", "offline", "expired")


class Machines:
    def __init__(self, console: Console) -> None:
        self.c = console
        console.mount(self)

    def _rows(self) -> list[NodeRow]:
        tn = self.c.deps.tailnet
        ctx = self.c.deps.context()
        now = datetime.now(UTC)
        return [node_row(n, tn.users, ctx.routes_of, now)
                for n in sorted(tn.list_nodes(), key=lambda n: n.id)]

    @route("GET", "/machines", Access.READ)
    async def list(self, request: web.Request) -> web.StreamResponse:
        q = request.query.get("q", "")[:200]
        user = request.query.get("user", "")[:200]
        status = request.query.get("status", "")
        tag = request.query.get("tag", "")[:200]
        all_rows = self._rows()
        rows = [r for r in all_rows if matches(r, q)
                and (not user or r.owner == user)
                and (status not in STATUSES or r.status == status)
                and (not tag or tag in r.tags)]
        tn = self.c.deps.tailnet
        return self.c.render(
            request, "machines.html", title="Machines", rows=rows, total=len(all_rows),
            q=q, user=user, status=status, tag=tag, statuses=STATUSES,
            users=sorted(user_label(u) for u in tn.list_users()),
            tags=sorted({t for r in all_rows for t in r.tags}),
            pending=len(self.c.deps.pending.list()))

    @route("GET", "/machines.json", Access.READ)
    async def live(self, request: web.Request) -> web.StreamResponse:
        """What the list's script refreshes: each node's state and last-seen text."""
        return web.json_response({"nodes": [
            {"id": r.id, "status": r.status, "lastSeen": r.last_seen} for r in self._rows()]})

    @route("GET", f"/machines/{ID}", Access.READ)
    async def detail(self, request: web.Request) -> web.StreamResponse:
        nid = path_id(request)
        tn = self.c.deps.tailnet
        n = tn.nodes.get(nid)
        if n is None:
            return self.c.render(request, "error.html", code=404, title="Machine",
                                 message=f"There is no machine {nid}.")
        row = node_row(n, tn.users, self.c.deps.context().routes_of, datetime.now(UTC))
        pol = self.c.deps.policy.manager
        known_tags = sorted(pol.policy.tag_owners) if pol is not None and pol.policy else []
        return self.c.render(request, "machine.html", title=f"Machine {row.name}", n=row,
                             known_tags=known_tags)

    # -- actions: each one AdminActions call, as /api/v1 makes it --------------------------

    @route("POST", f"/machines/{ID}/rename", Access.WRITE)
    async def rename(self, request: web.Request) -> web.StreamResponse:
        nid = path_id(request)
        name = (await read_form(request)).get("name", "").strip()
        return await self.c.act(request, "renameNode", self.c.deps.actions.rename_node(
            nid, name), self.c.node_seen, f"Renamed to {name}.", f"/machines/{nid}")

    @route("POST", f"/machines/{ID}/expire", Access.WRITE)
    async def expire(self, request: web.Request) -> web.StreamResponse:
        nid = path_id(request)
        return await self.c.act(request, "expireNode", self.c.deps.actions.expire_node(
            nid), self.c.node_seen, "Key expired: the machine must log in again.",
            f"/machines/{nid}")

    @route("POST", f"/machines/{ID}/disable-expiry", Access.WRITE)
    async def disable_expiry(self, request: web.Request) -> web.StreamResponse:
        nid = path_id(request)
        return await self.c.act(request, "expireNode", self.c.deps.actions.expire_node(
            nid, disable=True), self.c.node_seen, "Key expiry disabled.", f"/machines/{nid}")

    @route("POST", f"/machines/{ID}/routes", Access.WRITE)
    async def routes(self, request: web.Request) -> web.StreamResponse:
        nid = path_id(request)
        routes = parse_routes(await form_list(request, "route"))
        return await self.c.act(request, "setApprovedRoutes",
                                self.c.deps.actions.approve_routes(nid, routes),
                                self.c.node_seen, "Routes saved.", f"/machines/{nid}")

    @route("POST", f"/machines/{ID}/tags", Access.WRITE)
    async def tags(self, request: web.Request) -> web.StreamResponse:
        nid = path_id(request)
        tags = parse_tags((await read_form(request)).get("tags", ""))
        return await self.c.act(request, "setTags", self.c.deps.actions.set_tags(nid, tags),
                                self.c.node_seen, "Tags saved.", f"/machines/{nid}")

    @route("POST", f"/machines/{ID}/delete", Access.WRITE)
    async def delete(self, request: web.Request) -> web.StreamResponse:
        nid = path_id(request)
        return await self.c.act_confirmed(
            request, "deleteNode", lambda: self.c.deps.actions.delete_node(nid),
            lambda _: Seen(path={"nodeId": str(nid)}), f"Machine {nid} deleted.",
            f"/machines/{nid}", "/machines")

    # -- pending registrations -------------------------------------------------------------

    @route("GET", "/pending", Access.READ)
    async def pending(self, request: web.Request) -> web.StreamResponse:
        now = time.monotonic()
        items = [{
            "auth_id": p.auth_id,
            "hostname": str(p.hostinfo.get("Hostname") or "")[:200],
            "os": str(p.hostinfo.get("OS") or "")[:100],
            "version": str(p.hostinfo.get("IPNVersion") or "")[:100],
            "tags": [t for t in (p.hostinfo.get("RequestTags") or []) if isinstance(t, str)],
            "machine_key": p.machine_key.hex()[:16],
            "waiting": f"{int(now - p.created)} s",
        } for p in self.c.deps.pending.list()]
        users = sorted(self.c.deps.tailnet.list_users(), key=lambda u: u.name)
        return self.c.render(request, "pending.html", title="Pending registrations",
                             items=items, users=users)

    @route("POST", "/pending/approve", Access.WRITE)
    async def approve(self, request: web.Request) -> web.StreamResponse:
        form = await read_form(request)
        auth_id, user = form.get("auth_id", ""), form.get("user", "")
        return await self.c.act(request, "registerNode", self.c.deps.actions.register_pending(
            auth_id, user), self.c.node_seen, f"Registered for {user}.", "/pending")

    @route("POST", "/pending/reject", Access.WRITE)
    async def reject(self, request: web.Request) -> web.StreamResponse:
        auth_id = (await read_form(request)).get("auth_id", "")
        if not auth_id.startswith(AUTH_ID_PREFIX):
            self.c.flash(request, "error", "No such registration.")
            return self.c.redirect("/pending")
        return await self.c.act(request, "authReject",
                                self.c.deps.actions.reject_pending(auth_id),
                                lambda _: Seen(body={"authId": auth_id}),
                                "Registration rejected.", "/pending")
