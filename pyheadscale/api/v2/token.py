"""POST /api/v2/oauth/token: the OAuth 2.0 client-credentials grant (RFC 6749 §4.4).

Form-encoded in, `{access_token, token_type, expires_in, scope}` out, RFC 6749 §5.2 error
bodies. The secret may come in the body or as HTTP Basic (what Go's x/oauth2 tries first); it
embeds the client id, so a separate client_id is not needed. Optional space-separated `scope`
and `tags` narrow the token below the client's grant, never above it.
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import parse_qs

from aiohttp import web

from pyheadscale.api.v2.common import V2Error, read_capped
from pyheadscale.api.v2.deps import V2Deps
from pyheadscale.auth import oauth as oa
from pyheadscale.auth.oauth import Scope
from pyheadscale.state.errors import StateError
from pyheadscale.state.oauth import InvalidCredential, OAuthClient

MAX_FORM = 16 << 10
MAX_ITEMS = 64
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class OAuthError(Exception):
    def __init__(self, status: int, code: str, description: str) -> None:
        super().__init__(description)
        self.status, self.code, self.description = status, code, description

    def response(self) -> web.Response:
        return web.json_response({"error": self.code, "error_description": self.description},
                                 status=self.status, headers=NO_STORE)


async def _form(request: web.Request) -> dict[str, str]:
    try:
        raw = await read_capped(request, MAX_FORM)
    except V2Error:
        raise OAuthError(400, "invalid_request", "request body too large") from None
    try:
        parsed = parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                          max_num_fields=32)
    except (UnicodeDecodeError, ValueError):
        raise OAuthError(400, "invalid_request", "could not parse request body") from None
    out = {}
    for k, v in parsed.items():
        if len(v) != 1:  # RFC 6749 §3.2: parameters must not be repeated
            raise OAuthError(400, "invalid_request", f"parameter {k} given more than once")
        out[k] = v[0]
    return out


def _basic_secret(header: str) -> str:
    if not header.startswith("Basic "):
        return ""
    try:
        raw = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return raw.partition(":")[2]


def narrow_scopes(client: OAuthClient, requested: list[str]) -> list[str]:
    if not requested:
        return list(client.scopes)
    for s in requested:
        if not oa.grants_text(client.scopes, s):
            raise OAuthError(400, "invalid_scope", f"scope {s} is not granted to this client")
    return sorted(set(requested))


def narrow_tags(client: OAuthClient, requested: list[str]) -> list[str]:
    """An `all` client may ask for any well-formed tag, as Tailscale's."""
    if not requested:
        return list(client.tags)
    every = Scope.ALL.value in client.scopes
    for t in requested:
        if not t.startswith("tag:") or len(t) > 128 or (not every and t not in client.tags):
            raise OAuthError(400, "invalid_target", f"tag {t} is not granted to this client")
    return sorted(set(requested))


async def token(d: V2Deps, request: web.Request) -> web.Response:
    try:
        form = await _form(request)
        grant = form.get("grant_type", "")
        # Tailscale's documented curl omits grant_type; x/oauth2 always sends it.
        if grant not in ("", "client_credentials"):
            raise OAuthError(400, "unsupported_grant_type",
                             "only the client_credentials grant is supported")
        secret = form.get("client_secret") or _basic_secret(
            request.headers.get("Authorization", ""))
        if not secret:
            raise OAuthError(401, "invalid_client", "missing client credentials")
        try:
            client = await d.oauth.authenticate_client(secret)
        except InvalidCredential:
            raise OAuthError(401, "invalid_client", "invalid client credentials") from None
        scopes = form.get("scope", "").split()
        tags = form.get("tags", "").split()
        if len(scopes) > MAX_ITEMS or len(tags) > MAX_ITEMS:
            raise OAuthError(400, "invalid_request", "too many scopes or tags")
        scopes, tags = narrow_scopes(client, scopes), narrow_tags(client, tags)
        try:
            _, text = await d.oauth.mint_token(client.client_id, scopes, tags)
        except InvalidCredential:
            raise OAuthError(401, "invalid_client", "invalid client credentials") from None
        except StateError:
            raise OAuthError(500, "server_error", "could not mint access token") from None
    except OAuthError as e:
        return e.response()
    body = {"access_token": text, "token_type": "Bearer", "expires_in": oa.TOKEN_TTL_S,
            "scope": " ".join(scopes)}
    return web.json_response(body, headers=NO_STORE)
