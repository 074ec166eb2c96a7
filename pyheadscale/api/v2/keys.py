"""/api/v2 keys: auth keys (Headscale's pre-auth keys) and, as `keyType: "client"`, OAuth
clients, exactly as Tailscale multiplexes them on one resource.

The scope an operation needs depends on the key kind, so these handlers check it themselves.
Whether an id is an OAuth client is only looked up for a caller that may see clients, so a
token without oauth_keys cannot tell a client id from an unknown key. DELETE of an auth key
soft-revokes it (listed as invalid until reaped); an OAuth client is deleted outright.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from aiohttp import web

from pyheadscale.api.v2 import models as m
from pyheadscale.api.v2.common import (
    Principal,
    V2Error,
    from_state,
    go_time,
    json_ok,
    model_json,
    parse_id,
    read_model,
    require_tailnet,
)
from pyheadscale.api.v2.deps import V2Deps
from pyheadscale.auth import oauth as oa
from pyheadscale.auth.oauth import Scope
from pyheadscale.auth.preauthkeys import unusable_reason
from pyheadscale.state.errors import StateError
from pyheadscale.state.model import PreAuthKey
from pyheadscale.state.oauth import OAuthClient

DEFAULT_EXPIRY = timedelta(days=90)  # Tailscale's and the Terraform provider's default


def _caps(reusable: bool, ephemeral: bool, preauthorized: bool,
          tags: list[str]) -> m.KeyCapabilities:
    return m.KeyCapabilities(devices=m.KeyDevices(create=m.KeyDeviceCreate(
        reusable=reusable, ephemeral=ephemeral, preauthorized=preauthorized, tags=tags)))


def auth_key(k: PreAuthKey, secret: str | None = None, now: datetime | None = None) -> m.Key:
    """A stored pre-auth key. preauthorized is always true: Headscale has no device
    approval, and a stable value keeps the Terraform provider from planning a replacement."""
    tags = sorted(k.tags)
    out = m.Key(id=str(k.id), keyType="auth", key=secret, description=k.description or None,
                created=go_time(k.created_at),
                invalid=unusable_reason(k, now or datetime.now(UTC)) is not None,
                capabilities=_caps(k.reusable, k.ephemeral, True, tags), tags=tags or None)
    if k.expiration is not None:
        out.expires = go_time(k.expiration)
        out.expirySeconds = max(0, round((k.expiration - k.created_at).total_seconds()))
    if k.revoked is not None:
        out.revoked = go_time(k.revoked)
    if not tags and k.user_id is not None:
        out.userId = str(k.user_id)
    return out


def client_key(c: OAuthClient, secret: str | None = None) -> m.Key:
    return m.Key(id=c.client_id, keyType="client", key=secret,
                 description=c.description or None, created=go_time(c.created_at),
                 revoked=go_time(c.revoked) if c.revoked else None, invalid=c.revoked is not None,
                 capabilities=_caps(False, False, False, []), scopes=list(c.scopes) or None,
                 tags=list(c.tags) or None,
                 userId=str(c.user_id) if c.user_id is not None else None)


def _check_tags_for_token(d: V2Deps, who: Principal, tags: list[str], what: str) -> None:
    """A token may only hand out tags that exist and that it holds or owns via tagOwners."""
    if not who.is_token:
        return
    for t in tags:
        if not d.policy.tag_exists(t):
            raise V2Error(400, f"tag {t} is not defined in policy")
        if not d.policy.tag_owned_by_tags(t, who.tags):
            raise V2Error(403, f"{what} tag {t}")


async def _create_auth_key(d: V2Deps, who: Principal, body: m.CreateKeyRequest) -> m.Key:
    who.require(Scope.AUTH_KEYS)
    create = (body.capabilities or m.CreateKeyCapabilities()).devices.create
    tags = list(create.tags or [])
    user_id: int | None = None
    if tags:
        _check_tags_for_token(d, who, tags, "token may not assign")
    elif who.is_token:
        raise V2Error(403, "an OAuth client must create tagged auth keys")
    elif who.user_id is None:
        raise V2Error(400, "an auth key without tags must be created with a user-owned API key")
    else:
        user_id = who.user_id
    lifetime = timedelta(seconds=body.expirySeconds) if body.expirySeconds else DEFAULT_EXPIRY
    try:
        k, full = await d.tailnet.create_preauth_key(
            user_id, reusable=create.reusable, ephemeral=create.ephemeral,
            expiration=datetime.now(UTC) + lifetime, tags=tags, description=body.description)
    except StateError as e:
        raise from_state("creating auth key", e) from None
    return auth_key(k, full)


def _check_client_grant(d: V2Deps, who: Principal, scopes: list[str], tags: list[str]) -> None:
    """A client made by a token gets no authority the token lacks (else oauth_keys could
    mint an all-access client)."""
    if not who.is_token:
        return
    for s in scopes:
        if not oa.grants_text(who.scopes, s):
            raise V2Error(403, f"client may not be granted scope {s} beyond the creating token")
    _check_tags_for_token(d, who, tags, "client may not be granted beyond the creating token,")


async def _create_client(d: V2Deps, who: Principal, body: m.CreateKeyRequest) -> m.Key:
    who.require(Scope.OAUTH_KEYS)
    scopes, tags = list(body.scopes or []), list(body.tags or [])
    _check_client_grant(d, who, scopes, tags)
    try:
        c, secret = await d.oauth.create_client(scopes, tags, body.description, who.user_id)
    except StateError as e:
        raise from_state("creating oauth client", e) from None
    return client_key(c, secret)


async def create_key(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    require_tailnet(request)
    body = await read_model(request, m.CreateKeyRequest, allow_empty=True)
    if body.keyType == "client":
        return json_ok(model_json(await _create_client(d, who, body)))
    return json_ok(model_json(await _create_auth_key(d, who, body)))


async def list_keys(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    require_tailnet(request)
    out: list[m.Key] = []
    if who.allows(Scope.AUTH_KEYS_READ):
        now = datetime.now(UTC)
        out += [auth_key(k, now=now) for k in d.tailnet.list_preauth_keys()]
    if who.allows(Scope.OAUTH_KEYS_READ):
        out += [client_key(c) for c in d.oauth.list_clients()]
    return json_ok({"keys": [model_json(k) for k in out]})


def _client_for(d: V2Deps, who: Principal, key_id: str, need: Scope) -> OAuthClient | None:
    if not who.allows(need) or not oa.is_client_id(key_id):
        return None
    return d.oauth.clients.get(key_id)


def _auth_key_for(d: V2Deps, who: Principal, key_id: str, need: Scope) -> PreAuthKey:
    who.require(need)
    k = d.tailnet.preauth_keys.get(parse_id(key_id, "auth key"))
    if k is None:
        raise V2Error(404, "auth key not found")
    return k


async def get_key(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    require_tailnet(request)
    key_id = request.match_info["keyId"]
    c = _client_for(d, who, key_id, Scope.OAUTH_KEYS_READ)
    if c is not None:
        return json_ok(model_json(client_key(c)))
    return json_ok(model_json(auth_key(_auth_key_for(d, who, key_id, Scope.AUTH_KEYS_READ))))


async def delete_key(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    require_tailnet(request)
    key_id = request.match_info["keyId"]
    try:
        c = _client_for(d, who, key_id, Scope.OAUTH_KEYS)
        if c is not None:
            await d.oauth.delete_client(c.client_id)
            return json_ok({})
        k = _auth_key_for(d, who, key_id, Scope.AUTH_KEYS)
        await d.tailnet.revoke_preauth_key(k.id)
    except StateError as e:
        raise from_state("deleting key", e) from None
    return json_ok({})


async def set_key(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    """PUT: replace an OAuth client's scopes, tags and description (Tailscale's
    SetOAuthClient; Headscale has not ported it)."""
    require_tailnet(request)
    key_id = request.match_info["keyId"]
    c = _client_for(d, who, key_id, Scope.OAUTH_KEYS)
    if c is None:
        who.require(Scope.OAUTH_KEYS)
        raise V2Error(404, "oauth client not found")
    body = await read_model(request, m.SetOAuthClientRequest)
    scopes, tags = list(body.scopes or []), list(body.tags or [])
    _check_client_grant(d, who, scopes, tags)
    try:
        c = await d.oauth.update_client(c.client_id, scopes, tags, body.description)
    except StateError as e:
        raise from_state("updating oauth client", e) from None
    return json_ok(model_json(client_key(c)))
