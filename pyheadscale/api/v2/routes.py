"""The /api/v2 route table (the single source for the router and the OpenAPI document) and
the guard every route goes through: authentication, the route's scope, error mapping.

Credentials arrive as `Authorization: Bearer <credential>` or HTTP Basic with the credential
as the user name (what Tailscale's Go client sends). An OAuth access token (`hskey-oauthtok-`)
is limited to its scopes; an admin API key, and the unix socket, are all-access. The two are
told apart by prefix, so a token can never pass for an API key.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from pydantic import BaseModel

from pyheadscale.api.audited import audited, set_actor
from pyheadscale.api.v2 import devices, keys, policy, users
from pyheadscale.api.v2 import models as m
from pyheadscale.api.v2.common import Principal, V2Error, error_response
from pyheadscale.api.v2.deps import V2Deps
from pyheadscale.audit import CLI_SOCKET, Actor
from pyheadscale.auth.oauth import TOKEN_PREFIX, Scope
from pyheadscale.state.errors import InvalidAPIKey, StateError
from pyheadscale.state.oauth import InvalidCredential

log = logging.getLogger("pyheadscale.api.v2")

Handler = Callable[[V2Deps, Principal, web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    op_id: str
    summary: str
    tag: str
    scope: Scope | None  # checked before the handler runs; None: the handler checks
    scope_doc: str = ""  # for handlers that check their own scope (keys)
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    body_text: bool = False  # a HuJSON document rather than a JSON object
    extension: bool = False  # a Tailscale operation Headscale has not ported


_DEV = "/api/v2/device/{id}"
_TN = "/api/v2/tailnet/{tailnet}"
_KEYS_READ = "`auth_keys:read` for auth keys, `oauth_keys:read` for OAuth clients"
_KEYS_WRITE = "`auth_keys` for auth keys, `oauth_keys` for OAuth clients"

ROUTES: tuple[Route, ...] = (
    Route("GET", _DEV, devices.get_device, "getDevice", "Get a device", "Devices",
          Scope.DEVICES_CORE_READ, response=m.Device),
    Route("DELETE", _DEV, devices.delete_device, "deleteDevice", "Delete a device", "Devices",
          Scope.DEVICES_CORE, response=m.Empty),
    Route("POST", _DEV + "/authorized", devices.authorize_device, "authorizeDevice",
          "Authorize a device", "Devices", Scope.DEVICES_CORE, body=m.SetAuthorizedRequest,
          response=m.Empty),
    Route("POST", _DEV + "/name", devices.set_device_name, "setDeviceName",
          "Set a device's name", "Devices", Scope.DEVICES_CORE, body=m.SetNameRequest,
          response=m.Empty),
    Route("POST", _DEV + "/tags", devices.set_device_tags, "setDeviceTags",
          "Set a device's tags", "Devices", Scope.DEVICES_CORE, body=m.SetTagsRequest,
          response=m.Empty),
    Route("POST", _DEV + "/key", devices.set_device_key, "setDeviceKey",
          "Set a device's key expiry", "Devices", Scope.DEVICES_CORE, body=m.SetKeyRequest,
          response=m.Empty),
    Route("GET", _DEV + "/routes", devices.get_device_routes, "getDeviceRoutes",
          "Get a device's subnet routes", "Devices", Scope.DEVICES_ROUTES_READ,
          response=m.DeviceRoutes),
    Route("POST", _DEV + "/routes", devices.set_device_routes, "setDeviceRoutes",
          "Set a device's enabled subnet routes", "Devices", Scope.DEVICES_ROUTES,
          body=m.SetRoutesRequest, response=m.DeviceRoutes),
    Route("GET", _TN + "/devices", devices.list_devices, "listDevices", "List devices",
          "Devices", Scope.DEVICES_CORE_READ, response=m.DeviceList),
    Route("POST", _TN + "/keys", keys.create_key, "createKey",
          "Create an auth key or OAuth client", "Keys", None, _KEYS_WRITE,
          body=m.CreateKeyRequest, response=m.Key),
    Route("GET", _TN + "/keys", keys.list_keys, "listKeys",
          "List auth keys and OAuth clients (each kind needs its read scope)", "Keys", None,
          _KEYS_READ, response=m.KeyList),
    Route("GET", _TN + "/keys/{keyId}", keys.get_key, "getKey",
          "Get an auth key or OAuth client", "Keys", None, _KEYS_READ, response=m.Key),
    Route("DELETE", _TN + "/keys/{keyId}", keys.delete_key, "deleteKey",
          "Revoke an auth key or delete an OAuth client", "Keys", None, _KEYS_WRITE,
          response=m.Empty),
    Route("PUT", _TN + "/keys/{keyId}", keys.set_key, "setOAuthClient",
          "Replace an OAuth client's scopes, tags and description", "Keys", None,
          "`oauth_keys`", body=m.SetOAuthClientRequest, response=m.Key, extension=True),
    Route("GET", _TN + "/acl", policy.get_acl, "getACL", "Get the policy file", "Policy",
          Scope.POLICY_FILE_READ),
    Route("POST", _TN + "/acl", policy.set_acl, "setACL", "Set the policy file", "Policy",
          Scope.POLICY_FILE, body_text=True),
    Route("POST", _TN + "/acl/validate", policy.validate_acl, "validateACL",
          "Validate a policy file and its tests without saving it", "Policy",
          Scope.POLICY_FILE_READ, body_text=True, extension=True),
    Route("GET", _TN + "/settings", policy.get_settings, "getTailnetSettings",
          "Get tailnet settings", "TailnetSettings", Scope.FEATURE_SETTINGS_READ,
          response=m.TailnetSettings),
    Route("PATCH", _TN + "/settings", policy.update_settings, "updateTailnetSettings",
          "Update tailnet settings (not supported: 501)", "TailnetSettings",
          Scope.FEATURE_SETTINGS),
    Route("GET", "/api/v2/users/{id}", users.get_user, "getUser", "Get a user", "Users",
          Scope.USERS_READ, response=m.User),
    Route("GET", _TN + "/users", users.list_users, "listUsers", "List users", "Users",
          Scope.USERS_READ, response=m.UserList),
)


def credential(header: str) -> str:
    """The credential of a Bearer or Basic (credential as user name) Authorization header."""
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value
    if scheme.lower() == "basic":
        try:
            raw = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return ""
        return raw.partition(":")[0]
    return ""


async def authenticate(d: V2Deps, request: web.Request, trusted: bool) -> Principal:
    """The caller, also recorded for the audit log (the socket, a key prefix, a client)."""
    if trusted:
        set_actor(request, CLI_SOCKET)
        return Principal("local")
    cred = credential(request.headers.get("Authorization", ""))
    if not cred or len(cred) > 512:
        raise V2Error(401, "unauthorized")
    try:
        if cred.startswith(TOKEN_PREFIX):
            t = await d.oauth.authenticate_token(cred)
            set_actor(request, Actor("oauth_client", t.client_id))
            return Principal("token", scopes=t.scopes, tags=t.tags)
        a = await d.tailnet.validate_api_key(cred)
    except (InvalidCredential, InvalidAPIKey, StateError):
        raise V2Error(401, "unauthorized") from None
    set_actor(request, Actor("api_key", a.prefix))
    return Principal("apikey", user_id=a.user_id)


def guard(route: Route, d: V2Deps, *, trusted: bool) -> Callable[
        [web.Request], Awaitable[web.StreamResponse]]:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            who = await authenticate(d, request, trusted)
            if route.scope is not None:
                who.require(route.scope)
            resp = await route.handler(d, who, request)
            audited(route.op_id, request, resp)
            return resp
        except V2Error as e:
            return e.response()
        except web.HTTPException:
            raise
        except Exception:  # hostile input must never take the server down
            log.exception("v2 handler %s failed", route.op_id)
            return error_response(500, "internal error")

    return wrapped
