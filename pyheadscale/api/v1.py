"""Headscale 0.29-compatible REST API `/api/v1`: the route table and its handlers.

Paths, verbs, status codes and message texts follow Headscale (grpc-gateway paths; the
400/404/409 mapping of its 0.30 rewrite, which the conformance goldens pin). Request bodies
accept protojson's camelCase and the proto snake_case names; uint64 fields accept strings or
numbers. `ROUTES` is also what openapi.py documents.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from pyheadscale.api import shapes
from pyheadscale.api.auth import CORS, guard
from pyheadscale.api.errors import APIError, bad_request, from_state, not_found
from pyheadscale.api.policystore import (
    PolicyNotFound,
    PolicyReadError,
    PolicyService,
    PolicyUpdateDisabled,
)
from pyheadscale.auth.webflow import AUTH_ID_PREFIX, Pending, UnknownAuthID
from pyheadscale.policy import PolicyError
from pyheadscale.state.model import Node
from pyheadscale.state.tailnet import Conflict, StateError

AUTH_ID_LENGTH = 38  # "hskey-authreq-" + 24 random characters (Headscale types.AuthID)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: str  # V1API method name
    op_id: str  # Headscale 0.30 (OpenAPI 3) operation id
    rpc: str  # Headscale <= 0.29 gRPC method (Swagger 2 id HeadscaleService_<rpc>)
    summary: str
    tag: str
    body: str | None = None  # request schema name
    response: str = "Empty"  # response schema name
    query: tuple[tuple[str, str], ...] = ()  # (name, type)
    path_params: tuple[str, ...] = field(default=())


ROUTES: tuple[Route, ...] = (
    # users
    Route("GET", "/api/v1/user", "list_users", "listUsers", "ListUsers", "List users", "Users",
          response="ListUsersResponse",
          query=(("id", "uint64"), ("name", "string"), ("email", "string"))),
    Route("POST", "/api/v1/user", "create_user", "createUser", "CreateUser", "Create user",
          "Users", body="CreateUserRequest", response="UserResponse"),
    Route("POST", "/api/v1/user/{oldId}/rename/{newName}", "rename_user", "renameUser",
          "RenameUser", "Rename user", "Users", response="UserResponse",
          path_params=("oldId", "newName")),
    Route("DELETE", "/api/v1/user/{id}", "delete_user", "deleteUser", "DeleteUser",
          "Delete user", "Users", path_params=("id",)),
    # nodes (static paths before {nodeId})
    Route("GET", "/api/v1/node", "list_nodes", "listNodes", "ListNodes", "List nodes", "Nodes",
          response="ListNodesResponse", query=(("user", "string"),)),
    Route("POST", "/api/v1/node/register", "register_node", "registerNode", "RegisterNode",
          "Register node", "Nodes", response="NodeResponse",
          query=(("user", "string"), ("key", "string"))),
    Route("POST", "/api/v1/node/backfillips", "backfill_ips", "backfillNodeIPs",
          "BackfillNodeIPs", "Backfill node IPs", "Nodes", response="BackfillNodeIPsResponse",
          query=(("confirmed", "boolean"),)),
    Route("GET", "/api/v1/node/{nodeId}", "get_node", "getNode", "GetNode", "Get node",
          "Nodes", response="NodeResponse", path_params=("nodeId",)),
    Route("DELETE", "/api/v1/node/{nodeId}", "delete_node", "deleteNode", "DeleteNode",
          "Delete node", "Nodes", path_params=("nodeId",)),
    Route("POST", "/api/v1/node/{nodeId}/expire", "expire_node", "expireNode", "ExpireNode",
          "Expire node", "Nodes", body="ExpireNodeRequest", response="NodeResponse",
          query=(("expiry", "date-time"), ("disableExpiry", "boolean")),
          path_params=("nodeId",)),
    Route("POST", "/api/v1/node/{nodeId}/rename/{newName}", "rename_node", "renameNode",
          "RenameNode", "Rename node", "Nodes", response="NodeResponse",
          path_params=("nodeId", "newName")),
    Route("POST", "/api/v1/node/{nodeId}/tags", "set_tags", "setTags", "SetTags", "Set tags",
          "Nodes", body="SetTagsRequest", response="NodeResponse", path_params=("nodeId",)),
    Route("POST", "/api/v1/node/{nodeId}/approve_routes", "approve_routes", "setApprovedRoutes",
          "SetApprovedRoutes", "Set approved routes", "Nodes", body="SetApprovedRoutesRequest",
          response="NodeResponse", path_params=("nodeId",)),
    Route("POST", "/api/v1/debug/node", "debug_create_node", "debugCreateNode",
          "DebugCreateNode", "Debug create node", "Nodes", body="DebugCreateNodeRequest",
          response="NodeResponse"),
    # interactive auth
    Route("POST", "/api/v1/auth/register", "auth_register", "authRegister", "AuthRegister",
          "Register node via auth flow", "Auth", body="AuthRegisterRequest",
          response="NodeResponse"),
    Route("POST", "/api/v1/auth/approve", "auth_approve", "authApprove", "AuthApprove",
          "Approve a pending auth session", "Auth", body="AuthIdRequest"),
    Route("POST", "/api/v1/auth/reject", "auth_reject", "authReject", "AuthReject",
          "Reject a pending auth session", "Auth", body="AuthIdRequest"),
    # pre-auth keys
    Route("GET", "/api/v1/preauthkey", "list_preauth_keys", "listPreAuthKeys",
          "ListPreAuthKeys", "List pre-auth keys", "PreAuthKeys",
          response="ListPreAuthKeysResponse"),
    Route("POST", "/api/v1/preauthkey", "create_preauth_key", "createPreAuthKey",
          "CreatePreAuthKey", "Create pre-auth key", "PreAuthKeys",
          body="CreatePreAuthKeyRequest", response="PreAuthKeyResponse"),
    Route("POST", "/api/v1/preauthkey/expire", "expire_preauth_key", "expirePreAuthKey",
          "ExpirePreAuthKey", "Expire pre-auth key", "PreAuthKeys", body="IdRequest"),
    Route("DELETE", "/api/v1/preauthkey", "delete_preauth_key", "deletePreAuthKey",
          "DeletePreAuthKey", "Delete pre-auth key", "PreAuthKeys", query=(("id", "uint64"),)),
    # api keys
    Route("GET", "/api/v1/apikey", "list_api_keys", "listApiKeys", "ListApiKeys",
          "List API keys", "ApiKeys", response="ListApiKeysResponse"),
    Route("POST", "/api/v1/apikey", "create_api_key", "createApiKey", "CreateApiKey",
          "Create API key", "ApiKeys", body="CreateApiKeyRequest",
          response="CreateApiKeyResponse"),
    Route("POST", "/api/v1/apikey/expire", "expire_api_key", "expireApiKey", "ExpireApiKey",
          "Expire API key", "ApiKeys", body="ExpireApiKeyRequest"),
    Route("DELETE", "/api/v1/apikey/{prefix}", "delete_api_key", "deleteApiKey",
          "DeleteApiKey", "Delete API key", "ApiKeys", query=(("id", "uint64"),),
          path_params=("prefix",)),
    # policy
    Route("GET", "/api/v1/policy", "get_policy", "getPolicy", "GetPolicy", "Get policy",
          "Policy", response="PolicyResponse"),
    Route("PUT", "/api/v1/policy", "set_policy", "setPolicy", "SetPolicy", "Set policy",
          "Policy", body="PolicyRequest", response="PolicyResponse"),
    Route("POST", "/api/v1/policy/check", "check_policy", "checkPolicy", "CheckPolicy",
          "Check policy", "Policy", body="PolicyRequest"),
    # health
    Route("GET", "/api/v1/health", "health", "health", "Health", "Health check", "Health",
          response="HealthResponse"),
)


# --- request helpers ---------------------------------------------------------------------------


async def read_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"invalid JSON body: {e}") from None
    if not isinstance(body, dict):
        raise bad_request("invalid JSON body: expected an object")
    return body


def pick(body: dict[str, Any], *names: str, default: Any = None) -> Any:
    """First present field among protojson's camelCase and the proto snake_case names."""
    for n in names:
        if n in body and body[n] is not None:
            return body[n]
    return default


def text_field(body: dict[str, Any], *names: str) -> str:
    v = pick(body, *names, default="")
    if not isinstance(v, str):
        raise bad_request(f"invalid value for field {names[0]!r}: expected a string")
    return v


def list_field(body: dict[str, Any], *names: str) -> list[str]:
    v = pick(body, *names, default=[])
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise bad_request(f"invalid value for field {names[0]!r}: expected a list of strings")
    return v


def bool_value(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "t")
    return bool(v)


def parse_uint(value: Any, context: str) -> int:
    """uint64 from a JSON string/number or a path/query text; "" and None give 0."""
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise bad_request(f"{context}: invalid value {value!r}")
    if isinstance(value, int):
        if 0 <= value < 1 << 64:
            return value
        raise bad_request(f'{context}: strconv.ParseUint: parsing "{value}": value out of range')
    s = str(value)
    if not s.isdigit() or not s.isascii():
        raise bad_request(f'{context}: strconv.ParseUint: parsing "{s}": invalid syntax')
    n = int(s)
    if n >= 1 << 64:
        raise bad_request(f'{context}: strconv.ParseUint: parsing "{s}": value out of range')
    return n


def parse_node_id(s: str) -> int:
    return parse_uint(s, "type mismatch, parameter: node_id, error")


def auth_id_error(auth_id: str) -> str | None:
    """Headscale types.AuthID validation message, or None when well-formed."""
    if not auth_id.startswith(AUTH_ID_PREFIX):
        return f'auth ID has invalid prefix: expected prefix "{AUTH_ID_PREFIX}"'
    if len(auth_id) != AUTH_ID_LENGTH:
        return f"auth ID has invalid length: expected {AUTH_ID_LENGTH}, got {len(auth_id)}"
    return None


def validate_tag(tag: str) -> str | None:
    """Headscale validateTag."""
    if not tag.startswith("tag:"):
        return "tag must start with the string 'tag:'"
    if tag.lower() != tag:
        return "tag should be lowercase"
    if len(tag.split()) > 1:
        return "tags must not contain spaces"
    return None


def parse_prefix(r: str) -> Any:
    try:
        return ipaddress.ip_network(r.strip(), strict=False) if "/" in r else None
    except ValueError:
        return None


def go_list(items: Sequence[str]) -> str:
    return "[" + " ".join(items) + "]"  # Go's %v of a []string


def version_info() -> dict[str, Any]:
    """GET /version (Headscale VersionInfo). Headplane gates features on `version`."""
    import platform
    import sys

    from pyheadscale import __version__

    return {
        "version": "v0.29.2",
        "commit": f"pyheadscale-{__version__}",
        "buildTime": "",
        "go": {"version": f"python{sys.version.split()[0]}", "os": sys.platform,
               "arch": platform.machine()},
        "dirty": False,
    }


# --- handlers ------------------------------------------------------------------------------------


class V1API:
    def __init__(self, control: Any) -> None:
        self.control = control
        self.tailnet = control.tailnet
        self.policy = PolicyService(control)

    # shape helpers

    def _node(self, n: Node, **kw: Any) -> dict[str, Any]:
        tn = self.tailnet
        return shapes.node(n, tn.users, tn.preauth_keys, **kw)

    def _primary(self, n: Node) -> list[Any]:
        mapctx = getattr(self.control, "mapctx", None)
        if mapctx is None:
            return []
        return [r for r in mapctx.routes_of(n.id) if r not in shapes.EXIT_ROUTES]

    def _user_by_name(self, name: str, context: str) -> Any:
        u = self.tailnet.user_by_name(name) if name else None
        if u is None:
            raise not_found(f"{context}: user not found")
        return u

    def _existing_node(self, node_id: int, context: str = "") -> Node:
        n = self.tailnet.nodes.get(node_id)
        if n is None:
            raise not_found(f"{context}: node not found" if context else "node not found")
        return n

    # users

    async def list_users(self, request: web.Request) -> web.Response:
        q = request.query
        id_text = q.get("id", "")
        uid = parse_uint(id_text, "invalid id")
        name, email = q.get("name", ""), q.get("email", "")
        users = self.tailnet.list_users()
        if name:
            users = [u for u in users if u.name == name]
        elif email:
            users = [u for u in users if u.email == email]
        elif uid:
            users = [u for u in users if u.id == uid]
        return web.json_response({"users": [shapes.user(u) for u in users]})

    async def create_user(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        name = text_field(body, "name")
        if name and self.tailnet.user_by_name(name) is not None:
            raise APIError(409, "user already exists")
        try:
            u = await self.tailnet.create_user(
                name, display_name=text_field(body, "displayName", "display_name"),
                email=text_field(body, "email"),
                profile_pic_url=text_field(body, "pictureUrl", "picture_url"))
        except StateError as e:
            raise from_state("creating user", e) from None
        return web.json_response({"user": shapes.user(u)})

    async def rename_user(self, request: web.Request) -> web.Response:
        uid = parse_uint(request.match_info["oldId"], "invalid user id")
        new_name = request.match_info["newName"]
        try:
            self.tailnet.get_user(uid)
            u = await self.tailnet.rename_user(uid, new_name)
        except StateError as e:
            raise from_state("renaming user", e) from None
        return web.json_response({"user": shapes.user(u)})

    async def delete_user(self, request: web.Request) -> web.Response:
        uid = parse_uint(request.match_info["id"], "invalid user id")
        try:
            self.tailnet.get_user(uid)
            await self.tailnet.delete_user(uid)
        except Conflict as e:  # Headscale ErrUserStillHasNodes is a 400
            raise from_state("deleting user", e, conflict_status=400) from None
        except StateError as e:
            raise from_state("deleting user", e) from None
        return web.json_response({})

    # nodes

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
        self._existing_node(node_id)
        try:
            await self.tailnet.delete_node(node_id)
        except StateError as e:
            raise from_state("deleting node", e) from None
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
        if disable and expiry is not None:
            raise bad_request("cannot set both disable_expiry and expiry")
        try:
            if disable:
                n = await self.tailnet.set_expiry(node_id, None)
            elif expiry is not None:
                n = await self.tailnet.set_expiry(node_id, expiry)
            else:
                n = await self.tailnet.expire_node(node_id)
        except StateError as e:
            raise from_state("expiring node", e) from None
        return web.json_response({"node": self._node(n)})

    async def rename_node(self, request: web.Request) -> web.Response:
        node_id = parse_node_id(request.match_info["nodeId"])
        try:
            n = await self.tailnet.rename_node(node_id, request.match_info["newName"])
        except StateError as e:
            # Headscale ErrNodeNameNotUnique / ErrGivenNameInvalid are 400s.
            err = from_state("renaming node", e)
            if err.status == 409:
                err.status = 400
            raise err from None
        return web.json_response({"node": self._node(n)})

    async def set_tags(self, request: web.Request) -> web.Response:
        node_id = parse_node_id(request.match_info["nodeId"])
        tags = list_field(await read_body(request), "tags")
        if not tags:
            raise bad_request("cannot remove all tags from a node - tagged nodes must have at "
                              "least one tag")
        for t in tags:
            problem = validate_tag(t)
            if problem:
                raise bad_request(f"setting tags: {problem}")
        self._existing_node(node_id)
        invalid = [t for t in tags if not self.policy.tag_exists(t)]
        if invalid:
            raise bad_request(f"setting tags: requested tags {go_list(invalid)} are invalid or "
                              "not permitted")
        try:
            n = await self.tailnet.set_tags(node_id, tags)
        except StateError as e:
            raise from_state("setting tags", e) from None
        return web.json_response({"node": self._node(n)})

    async def approve_routes(self, request: web.Request) -> web.Response:
        node_id = parse_node_id(request.match_info["nodeId"])
        routes = list_field(await read_body(request), "routes")
        for r in routes:
            if parse_prefix(r) is None:
                raise bad_request(f'parsing route: netip.ParsePrefix("{r}"): invalid prefix')
        try:
            n = await self.tailnet.approve_routes(node_id, routes)
        except StateError as e:
            raise from_state("setting approved routes", e) from None
        return web.json_response({"node": self._node(n, subnet_routes=self._primary(n))})

    async def _register(self, auth_id: str, user_name: str) -> web.Response:
        problem = auth_id_error(auth_id)
        if problem:
            raise bad_request(f"registering node: {problem}")
        u = self._user_by_name(user_name, "looking up user")
        try:
            n = await self.control.webflow.register(auth_id, u.id)
        except UnknownAuthID as e:
            raise not_found(f"registering node: {e}") from None
        except StateError as e:
            raise from_state("registering node", e) from None
        return web.json_response({"node": self._node(n)})

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
        backfill = getattr(self.tailnet, "backfill_node_ips", None)
        if backfill is not None:
            try:
                changes = await backfill()
            except StateError as e:
                raise from_state("backfilling node IPs", e) from None
            return web.json_response({"changes": list(changes)})
        ipam = self.tailnet.ipam
        want4, want6 = ipam.prefix4 is not None, ipam.prefix6 is not None
        pending = [n.id for n in self.tailnet.list_nodes()
                   if (want4 and n.ipv4 is None) or (want6 and n.ipv6 is None)
                   or (not want4 and n.ipv4 is not None) or (not want6 and n.ipv6 is not None)]
        if pending:
            # state/ has no backfill yet: say so rather than claim nothing needed changing.
            raise APIError(501, f"backfilling node IPs: not implemented; nodes {pending} need "
                                "address changes")
        return web.json_response({"changes": []})

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
        problem = auth_id_error(auth_id)
        if problem:
            raise bad_request(f"debug creating node: {problem}")
        name = text_field(body, "name")
        hostinfo = {"Hostname": name, "OS": "TestOS", "RoutableIPs": [str(r) for r in routes]}
        machine_key, node_key = secrets.token_bytes(32), secrets.token_bytes(32)
        self.control.pending.add(auth_id, machine_key=machine_key, node_key=node_key,
                                 hostinfo=hostinfo)
        # A synthetic echo, as Headscale: the node exists once `auth register` completes it.
        echo = Node(id=0, machine_key=machine_key, node_key=node_key, disco_key=None,
                    hostname=name, given_name="", user_id=u.id, ipv4=None, ipv6=None,
                    register_method="", created_at=shapes.ZERO_TIME,
                    updated_at=shapes.ZERO_TIME, expiry=shapes.ZERO_TIME,
                    last_seen=shapes.ZERO_TIME, hostinfo=hostinfo)
        return web.json_response({"node": self._node(echo)})

    # interactive auth

    async def auth_register(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        return await self._register(text_field(body, "authId", "auth_id"),
                                    text_field(body, "user"))

    def _pending(self, auth_id: str) -> Pending:
        problem = auth_id_error(auth_id)
        if problem:
            raise bad_request(f"invalid auth_id: {problem}")
        try:
            return self.control.pending.get(auth_id)
        except UnknownAuthID:
            raise not_found(f"no pending auth session for auth_id {auth_id}") from None

    async def auth_approve(self, request: web.Request) -> web.Response:
        auth_id = text_field(await read_body(request), "authId", "auth_id")
        if auth_id in self.control.sshchecks:  # an SSH check-mode session waits on it
            self.control.sshchecks.approve(auth_id)
            return web.json_response({})
        self._pending(auth_id)
        # An approval without a user: the waiting client is told to start over with a fresh
        # AuthURL, which is what Headscale's follow-up handler does with a node-less verdict.
        self.control.pending.discard(auth_id)
        return web.json_response({})

    async def auth_reject(self, request: web.Request) -> web.Response:
        auth_id = text_field(await read_body(request), "authId", "auth_id")
        if auth_id in self.control.sshchecks:
            self.control.sshchecks.reject(auth_id)
            return web.json_response({})
        self._pending(auth_id)
        try:
            self.control.pending.reject(auth_id, "auth request rejected")
        except UnknownAuthID:
            raise not_found(f"no pending auth session for auth_id {auth_id}") from None
        return web.json_response({})

    # pre-auth keys

    async def list_preauth_keys(self, request: web.Request) -> web.Response:
        tn = self.tailnet
        return web.json_response({"preAuthKeys": [shapes.preauth_key(k, tn.users)
                                                  for k in tn.list_preauth_keys()]})

    async def create_preauth_key(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        uid = parse_uint(pick(body, "user"), "invalid user id")
        tags = list_field(body, "aclTags", "acl_tags")
        for t in tags:
            problem = validate_tag(t)
            if problem:
                raise bad_request(f"invalid tag: {problem}")
        exp_text = pick(body, "expiration")
        expiration = None
        if exp_text:
            try:
                expiration = shapes.parse_ts(str(exp_text))
            except ValueError as e:
                raise bad_request(f"creating pre-auth key: {e}") from None
        try:
            if uid:
                self.tailnet.get_user(uid)
            k, full = await self.tailnet.create_preauth_key(
                uid or None, reusable=bool_value(pick(body, "reusable", default=False)),
                ephemeral=bool_value(pick(body, "ephemeral", default=False)),
                expiration=expiration, tags=tags)
        except StateError as e:
            raise from_state("creating pre-auth key", e) from None
        return web.json_response(
            {"preAuthKey": shapes.preauth_key(k, self.tailnet.users, full_key=full)})

    async def expire_preauth_key(self, request: web.Request) -> web.Response:
        kid = parse_uint(pick(await read_body(request), "id"), "invalid pre-auth key id")
        try:
            await self.tailnet.expire_preauth_key(kid)
        except StateError as e:
            raise from_state("expiring pre-auth key", e) from None
        return web.json_response({})

    async def delete_preauth_key(self, request: web.Request) -> web.Response:
        kid = parse_uint(request.query.get("id", ""), "invalid pre-auth key id")
        try:
            await self.tailnet.delete_preauth_key(kid)
        except StateError as e:
            raise from_state("deleting pre-auth key", e) from None
        return web.json_response({})

    # api keys

    async def list_api_keys(self, request: web.Request) -> web.Response:
        return web.json_response({"apiKeys": [shapes.api_key(a)
                                              for a in self.tailnet.list_api_keys()]})

    async def create_api_key(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        exp_text = pick(body, "expiration")
        expiration = None
        if exp_text:
            try:
                expiration = shapes.parse_ts(str(exp_text))
            except ValueError as e:
                raise bad_request(f"creating api key: {e}") from None
        try:
            _, full = await self.tailnet.create_api_key(expiration)
        except StateError as e:
            raise from_state("creating api key", e) from None
        return web.json_response({"apiKey": full})

    def _lookup_api_key(self, id_value: Any, prefix: str) -> int:
        kid = parse_uint(id_value, "invalid api key id")
        if kid and prefix:
            raise bad_request("provide either id or prefix, not both")
        if kid:
            if kid not in self.tailnet.api_keys:
                raise not_found("getting api key: API key not found")
            return kid
        if prefix:
            text = prefix[:-3] if prefix.endswith("***") and "-" not in prefix else prefix
            a = self.tailnet.api_key_by_prefix(text)
            if a is None:
                raise not_found("getting api key: API key not found")
            return a.id
        raise bad_request("must provide id or prefix")

    async def expire_api_key(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        kid = self._lookup_api_key(pick(body, "id"), text_field(body, "prefix"))
        try:
            await self.tailnet.expire_api_key(kid)
        except StateError as e:
            raise from_state("expiring api key", e) from None
        return web.json_response({})

    async def delete_api_key(self, request: web.Request) -> web.Response:
        kid = self._lookup_api_key(request.query.get("id", ""), request.match_info["prefix"])
        try:
            await self.tailnet.delete_api_key(kid)
        except StateError as e:
            raise from_state("deleting api key", e) from None
        return web.json_response({})

    # policy

    async def get_policy(self, request: web.Request) -> web.Response:
        try:
            p = await self.policy.get()
        except PolicyNotFound as e:
            raise APIError(500, f"loading ACL from database: {e}") from None
        except PolicyReadError as e:
            raise APIError(500, str(e)) from None
        updated = p.updated_at if self.policy.mode == "database" else None
        return web.json_response({"policy": p.data, "updatedAt": shapes.ts(updated)})

    async def set_policy(self, request: web.Request) -> web.Response:
        text = text_field(await read_body(request), "policy")
        try:
            p = await self.policy.set(text)
        except PolicyUpdateDisabled as e:
            raise bad_request(str(e)) from None
        except PolicyError as e:
            raise bad_request(f"setting policy: {e}") from None
        return web.json_response({"policy": p.data, "updatedAt": shapes.ts(p.updated_at)})

    async def check_policy(self, request: web.Request) -> web.Response:
        text = text_field(await read_body(request), "policy")
        try:
            await self.policy.check(text)
        except PolicyError as e:
            raise bad_request(str(e)) from None
        return web.json_response({})

    # health

    async def health(self, request: web.Request) -> web.Response:
        try:
            await self.tailnet.ping_db()
        except Exception as e:  # any DB failure is the answer, not a crash
            raise APIError(500, f"pinging database: {e}") from None
        return web.json_response({"databaseConnectivity": True})

    async def not_found(self, request: web.Request) -> web.Response:
        raise APIError(404, "Not Found")


# The pending-registration store has no public way to add under a given id or to drop an
# entry without an error verdict; these two helpers are the only places that reach inside.


# --- wiring --------------------------------------------------------------------------------------


def add_api_routes(app: web.Application, control: Any, *, trusted: bool,
                   cors_origins: Sequence[str] | None = None) -> None:
    """Mount /api/v1 (plus the OpenAPI documents) on `app`. trusted=True (the unix-socket
    app) skips the API-key check. CORS origins default to cfg `cors_allowed_origins`."""
    from pyheadscale.api import openapi

    if cors_origins is None:
        cors_origins = list(getattr(control.cfg, "cors_allowed_origins", None) or ())
    cors = CORS(cors_origins)
    api = V1API(control)
    tn = control.tailnet
    for r in ROUTES:
        h = guard(getattr(api, r.handler), tn, trusted=trusted, cors=cors)
        app.router.add_route(r.method, r.path, h)
    for path, handler in openapi.public_routes():
        app.router.add_get(path, guard(handler, tn, trusted=trusted, cors=cors, public=True))
    if cors:
        async def preflight(request: web.Request) -> web.StreamResponse:
            return cors.preflight(request)

        app.router.add_route("OPTIONS", "/api/v1/{tail:.*}", preflight)
    app.router.add_route("*", "/api/v1/{tail:.*}",
                         guard(api.not_found, tn, trusted=trusted, cors=cors))
