"""/api/v1/node (and /api/v1/debug/node): list, inspect, expire, rename, tag, route and
register nodes."""

from __future__ import annotations

import secrets

from aiohttp import web

from pyheadscale.api import shapes
from pyheadscale.api.errors import bad_request
from pyheadscale.api.handlers.base import HandlerBase
from pyheadscale.api.request import (
    bool_value,
    check_auth_id,
    list_field,
    parse_node_id,
    parse_prefix,
    pick,
    read_body,
    text_field,
)
from pyheadscale.auth.webflow import RegistrationRefused
from pyheadscale.gojson import DecodeError
from pyheadscale.hostinfo import decode_hostinfo
from pyheadscale.state.model import Node


class NodeHandlers(HandlerBase):
    """Handlers of the Nodes routes."""

    async def list_nodes(self, request: web.Request) -> web.Response:
        name = request.query.get("user", "")
        user_id = self._user_by_name(name, "listing nodes").id if name else None
        out = []
        for n in self.tailnet.list_nodes(user_id):
            subnet = self._primary(n) + shapes.exit_routes(n)
            out.append(self._node(n, subnet_routes=subnet, tagged_as_user=True))
        return web.json_response({"nodes": out})

    async def get_node(self, request: web.Request) -> web.Response:
        n = self._existing_node(parse_node_id(request.match_info["nodeId"]))
        return web.json_response({"node": self._node(n)})

    async def delete_node(self, request: web.Request) -> web.Response:
        node_id = parse_node_id(request.match_info["nodeId"])
        await self.actions.delete_node(node_id)
        return web.json_response({})

    async def expire_node(self, request: web.Request) -> web.Response:
        node_id = parse_node_id(request.match_info["nodeId"])
        body = await read_body(request)
        q = request.query
        # 0.29's gateway took these from the query, 0.30 from an optional body.
        disable = bool_value(pick(body, "disableExpiry", "disable_expiry",
                                  default=q.get("disableExpiry", q.get("disable_expiry",
                                                                       False))))
        expiry_text = pick(body, "expiry", default=q.get("expiry"))
        expiry = None
        if expiry_text:
            if not isinstance(expiry_text, str):
                raise bad_request("expiring node: expiry must be an RFC 3339 string")
            try:
                expiry = shapes.parse_ts(expiry_text)
            except ValueError as e:
                raise bad_request(f"expiring node: {e}") from None
        n = await self.actions.expire_node(node_id, expiry=expiry, disable=disable)
        return web.json_response({"node": self._node(n)})

    async def rename_node(self, request: web.Request) -> web.Response:
        node_id = parse_node_id(request.match_info["nodeId"])
        n = await self.actions.rename_node(node_id, request.match_info["newName"])
        return web.json_response({"node": self._node(n)})

    async def set_tags(self, request: web.Request) -> web.Response:
        node_id = parse_node_id(request.match_info["nodeId"])
        tags = list_field(await read_body(request), "tags")
        n = await self.actions.set_tags(node_id, tags)
        return web.json_response({"node": self._node(n)})

    async def approve_routes(self, request: web.Request) -> web.Response:
        node_id = parse_node_id(request.match_info["nodeId"])
        routes = list_field(await read_body(request), "routes")
        n = await self.actions.approve_routes(node_id, routes)
        return web.json_response({"node": self._node(n, subnet_routes=self._primary(n))})

    async def register_node(self, request: web.Request) -> web.Response:
        body = await read_body(request)  # Headplane also sends user/key in the body
        q = request.query
        key = q.get("key") or text_field(body, "key")
        user = q.get("user") or text_field(body, "user")
        return await self._register(key, user)

    async def backfill_ips(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        confirmed = bool_value(pick(body, "confirmed", default=request.query.get("confirmed",
                                                                                 False)))
        if not confirmed:
            raise bad_request("backfilling node IPs: not confirmed, aborting")
        changes = await self.actions.backfill_ips()
        return web.json_response({"changes": changes})

    async def debug_create_node(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        u = self._user_by_name(text_field(body, "user"), "looking up user")
        routes = []
        for r in list_field(body, "routes"):
            p = parse_prefix(r)
            if p is None:
                raise bad_request(f'parsing routes: netip.ParsePrefix("{r}"): invalid prefix')
            routes.append(p)
        auth_id = text_field(body, "key")
        check_auth_id(auth_id, "debug creating node")
        name = text_field(body, "name")
        try:
            hostinfo = decode_hostinfo(
                {"Hostname": name, "OS": "TestOS", "RoutableIPs": [str(r) for r in routes]})
        except DecodeError as e:
            raise bad_request(f"debug creating node: {e}") from None
        machine_key, node_key = secrets.token_bytes(32), secrets.token_bytes(32)
        try:
            self.pending.add(auth_id, machine_key=machine_key, node_key=node_key,
                             hostinfo=hostinfo, source="admin")
        except RegistrationRefused as e:
            raise bad_request(f"debug creating node: {e}") from None
        # A synthetic echo, as Headscale: the node exists once `auth register` completes it.
        echo = Node(id=0, machine_key=machine_key, node_key=node_key, disco_key=None,
                    hostname=name, given_name="", user_id=u.id, ipv4=None, ipv6=None,
                    register_method="", created_at=shapes.ZERO_TIME,
                    updated_at=shapes.ZERO_TIME, expiry=shapes.ZERO_TIME,
                    last_seen=shapes.ZERO_TIME, hostinfo=hostinfo)
        return web.json_response({"node": self._node(echo)})
