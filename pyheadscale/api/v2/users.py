"""/api/v2 users: Tailscale's User shape over the tailnet's users (read-only, as Headscale).

Headscale models no user types, roles or states and has one tailnet, so every user is an
active member of tailnet "1"; a filter for another type or role matches nobody.
"""

from __future__ import annotations

from aiohttp import web

from pyheadscale.api.v2 import models as m
from pyheadscale.api.v2.common import (
    Principal,
    V2Error,
    go_time,
    json_ok,
    model_json,
    parse_id,
    require_tailnet,
)
from pyheadscale.api.v2.deps import V2Deps
from pyheadscale.state.model import User


def user(d: V2Deps, u: User) -> m.User:
    nodes = d.tailnet.list_nodes(u.id)
    seen = [n.last_seen for n in nodes if n.last_seen is not None]
    return m.User(id=str(u.id), displayName=u.display_name or u.name,
                  loginName=d.tailnet.username(u), profilePicUrl=u.profile_pic_url,
                  tailnetId="1", created=go_time(u.created_at), type="member", role="member",
                  status="active", deviceCount=len(nodes),
                  lastSeen=go_time(max(seen) if seen else None),
                  currentlyConnected=any(n.online for n in nodes))


async def get_user(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    u = d.tailnet.users.get(parse_id(request.match_info["id"], "user"))
    if u is None:
        raise V2Error(404, "user not found")
    return json_ok(model_json(user(d, u)))


async def list_users(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    require_tailnet(request)
    q = request.query
    if q.get("type", "member") != "member" or q.get("role", "member") != "member":
        return json_ok({"users": []})
    return json_ok({"users": [model_json(user(d, u)) for u in d.tailnet.list_users()]})
