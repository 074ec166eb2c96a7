"""OpenID Connect login for interactive registration (Headscale 0.29 semantics, authlib).

With `oidc.issuer` set, GET /register/<auth_id> redirects to the provider (authorization code
flow; `scope`, `extra_params`, optional PKCE plain/S256; `state` and `nonce` also set as
cookies scoped to /oidc/callback). /oidc/callback checks state (cookie + server-side, single
use), exchanges the code, verifies the ID token (JWKS signature, iss, aud/azp, exp, iat,
nonce), reads claims (UserInfo fills in when email or groups are missing), applies
`allowed_groups`, `email_verified_required`, `allowed_domains`, `allowed_users`, creates or
updates the user (provider identifier = issuer + "/" + subject) and renders a confirmation page
(hostname, OS, machine-key fingerprint). Only the POST of that page (CSRF cookie = form field)
registers the waiting node; `use_expiry_from_token` takes the node expiry from the ID token.

IdP groups (pyheadscale extension, not in Headscale): the groups claim is stored on the user
(User.groups, persisted in users.idp_groups) at every login; with `oidc.policy_groups.enabled`
the policy can use them: IdP group "Eng Team" (or "/eng team" from Keycloak) becomes
`group:<prefix>eng-team`, i.e. surrounding slashes/space stripped, lower-cased, runs of
characters outside [a-z0-9._-] replaced by "-". The mapping, precedence and validation rules
live in pyheadscale/policy/idpgroups.py (`policy_groups`/`policy_group_name` re-exported here).
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parseaddr
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
from aiohttp import web
from authlib.common.security import generate_token
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from pyheadscale.auth.webflow import AUTH_ID_PREFIX, UnknownAuthID
from pyheadscale.policy.idpgroups import policy_group_name, policy_groups
from pyheadscale.state import names
from pyheadscale.templates import oidc as pages

if TYPE_CHECKING:
    from pyheadscale.control.dispatch import ControlPlane
    from pyheadscale.state.model import Node, User

log = logging.getLogger("pyheadscale.oidc")

CALLBACK_PATH = "/oidc/callback"
CONFIRM_PATH = "/register/confirm/"
CSRF_COOKIE = "headscale_register_confirm"
COOKIE_PREFIX_LEN = 6  # leading characters of state/nonce spliced into their cookie names
SESSION_TTL_S = 15 * 60
SESSION_MAX = 1024
HTTP_TIMEOUT_S = 10.0
ID_TOKEN_ALGS = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384",
                 "PS512", "EdDSA"]


class OIDCError(Exception):
    """A refused login step; `status` and `message` are what the browser is shown."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class DiscoveryError(Exception):
    """The provider's discovery document or JWKS could not be loaded."""


# --- claims ---------------------------------------------------------------------------------


def _flex_bool(v: Any) -> bool:
    # Some providers (JumpCloud) send email_verified as the string "true".
    if isinstance(v, str):
        return v.strip().lower() in ("1", "t", "true")
    return v is True


def _flex_strs(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list):
        return tuple(x for x in v if isinstance(x, str))
    return ()


def _str(v: Any) -> str:
    return v if isinstance(v, str) else ""


def clean_identifier(ident: str) -> str:
    """Headscale's CleanIdentifier: trim, drop empty path segments, lower-case the scheme."""
    ident = ident.strip()
    if not ident:
        return ""
    parts = urlsplit(ident)
    if parts.scheme and "://" in ident:
        segs = [s.strip() for s in parts.path.split("/") if s.strip()]
        path = "/" + "/".join(segs) if segs else ""
        out = f"{parts.scheme.lower()}://{parts.netloc}{path}"
        if parts.query:
            out += "?" + parts.query
        return out + ("#" + parts.fragment if parts.fragment else "")
    return "/".join(s.strip() for s in ident.split("/") if s.strip())


@dataclass(frozen=True)
class Claims:
    sub: str
    iss: str
    name: str = ""
    groups: tuple[str, ...] = ()
    email: str = ""
    email_verified: bool = False
    picture: str = ""
    username: str = ""

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> Claims:
        return cls(sub=_str(d.get("sub")), iss=_str(d.get("iss")), name=_str(d.get("name")),
                   groups=_flex_strs(d.get("groups")), email=_str(d.get("email")),
                   email_verified=_flex_bool(d.get("email_verified")),
                   picture=_str(d.get("picture")), username=_str(d.get("preferred_username")))

    def identifier(self) -> str:
        """Provider identifier: issuer + "/" + subject (plain concatenation, then cleaned)."""
        if not self.iss and not self.sub:
            return ""
        if not self.iss:
            return "/" + clean_identifier(self.sub).lstrip("/")
        if not self.sub:
            return clean_identifier(self.iss)
        return clean_identifier(self.iss.rstrip("/") + "/" + self.sub.lstrip("/"))

    def needs_userinfo(self) -> bool:
        return not self.email or not self.groups

    def merged_with_userinfo(self, info: Mapping[str, Any]) -> Claims:
        """UserInfo values win where present; a response for another subject is ignored."""
        if _str(info.get("sub")) != self.sub:
            return self
        u = Claims.from_mapping({**info, "iss": self.iss})
        return replace(
            self, email=u.email or self.email,
            email_verified=u.email_verified or self.email_verified,
            username=u.username or self.username, name=u.name or self.name,
            picture=u.picture or self.picture,
            groups=u.groups if "groups" in info else self.groups)


def authorize(oidc: Any, c: Claims) -> None:
    """allowed_groups, then (email trusted?) allowed_domains and allowed_users; raises 401."""
    if oidc.allowed_groups and not any(g in c.groups for g in oidc.allowed_groups):
        raise OIDCError(401, "unauthorised group: you are not in any group allowed to log in")
    trust_email = not oidc.email_verified_required or c.email_verified
    if (oidc.allowed_domains or oidc.allowed_users) and not trust_email:
        raise OIDCError(401, "unverified email: your email address is not verified by the "
                             "identity provider")
    if oidc.allowed_domains:
        at = c.email.rfind("@")
        if at < 0 or c.email[at + 1:] not in oidc.allowed_domains:
            raise OIDCError(401, "unauthorised domain: your email domain is not allowed")
    if oidc.allowed_users and c.email not in oidc.allowed_users:
        raise OIDCError(401, "unauthorised user: your email address is not allowed")


def _valid_email(s: str) -> bool:
    name, addr = parseaddr(s)
    return bool(addr) and addr == s.strip() and "@" in addr and not name


def user_fields(c: Claims, email_verified_required: bool) -> dict[str, Any]:
    """Headscale's User.FromClaim: the user fields a login sets (name only when valid)."""
    out: dict[str, Any] = {"display_name": c.name, "profile_pic_url": c.picture,
                           "provider": "oidc", "provider_identifier": c.identifier(),
                           "groups": tuple(c.groups)}
    try:
        names.validate_username(c.username)
        out["name"] = c.username
    except names.InvalidName:
        pass
    if (c.email_verified or not email_verified_required) and _valid_email(c.email):
        out["email"] = c.email
    return out


def machine_key_short(machine_key: bytes) -> str:
    """Tailscale's key ShortString: the first five base64 characters in brackets."""
    if not machine_key or machine_key == bytes(len(machine_key)):
        return ""
    return "[" + base64.b64encode(machine_key).decode()[:5] + "]"


# --- provider metadata, authorization URL, ID token -----------------------------------------


@dataclass(frozen=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str = ""
    token_auth_methods: tuple[str, ...] = ("client_secret_basic",)
    id_token_algs: tuple[str, ...] = ("RS256",)

    @classmethod
    def from_document(cls, doc: Any, expected_issuer: str) -> ProviderMetadata:
        if not isinstance(doc, dict):
            raise DiscoveryError("discovery document is not a JSON object")
        # Like go-oidc: the document must name exactly the issuer we were configured with.
        if _str(doc.get("issuer")) != expected_issuer:
            raise DiscoveryError(f"issuer did not match the issuer returned by provider, "
                                 f"expected {expected_issuer!r} got {doc.get('issuer')!r}")
        for k in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not _str(doc.get(k)):
                raise DiscoveryError(f"discovery document has no {k}")
        algs = tuple(a for a in _flex_strs(doc.get("id_token_signing_alg_values_supported"))
                     if a in ID_TOKEN_ALGS) or ("RS256",)
        methods = _flex_strs(doc.get("token_endpoint_auth_methods_supported"))
        return cls(issuer=doc["issuer"], authorization_endpoint=doc["authorization_endpoint"],
                   token_endpoint=doc["token_endpoint"], jwks_uri=doc["jwks_uri"],
                   userinfo_endpoint=_str(doc.get("userinfo_endpoint")),
                   token_auth_methods=methods or ("client_secret_basic",), id_token_algs=algs)


def new_pkce_verifier() -> str:
    return generate_token(64)  # 64 chars of [A-Za-z0-9], within RFC 7636's 43..128


def authorization_url(meta: ProviderMetadata, oidc: Any, redirect_uri: str, state: str,
                      nonce: str, verifier: str | None) -> str:
    extra: dict[str, str] = {}
    if verifier is not None:
        extra["access_type"] = "offline"
        if oidc.pkce.method == "plain":
            extra |= {"code_challenge_method": "plain", "code_challenge": verifier}
        else:
            extra |= {"code_challenge_method": "S256",
                      "code_challenge": create_s256_code_challenge(verifier)}
    extra |= {str(k): str(v) for k, v in (oidc.extra_params or {}).items()}
    extra["nonce"] = nonce
    return str(prepare_grant_uri(meta.authorization_endpoint, oidc.client_id, "code",
                                 redirect_uri=redirect_uri, scope=" ".join(oidc.scope),
                                 state=state, **extra))


def verify_id_token(raw: str, keys: KeySet, *, issuer: str, client_id: str,
                    algorithms: Iterable[str], now: float | None = None) -> dict[str, Any]:
    """Signature (JWKS), iss, aud (and azp with several audiences), exp and iat.

    The nonce is checked by the caller against what it sent. Raises OIDCError(403).
    """
    try:
        tok = jwt.decode(raw, keys, algorithms=list(algorithms))
    except (JoseError, ValueError) as e:
        raise OIDCError(403, f"failed to verify id_token: {e}") from None
    claims = dict(tok.claims)
    if claims.get("iss") != issuer:
        raise OIDCError(403, "failed to verify id_token: wrong issuer")
    aud = claims.get("aud")
    auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if client_id not in auds:
        raise OIDCError(403, "failed to verify id_token: wrong audience")
    if len(auds) > 1 and claims.get("azp", client_id) != client_id:
        raise OIDCError(403, "failed to verify id_token: wrong authorized party")
    t = time.time() if now is None else now
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise OIDCError(403, "failed to verify id_token: no expiry")
    if t >= exp:
        raise OIDCError(403, "failed to verify id_token: token is expired")
    if not isinstance(claims.get("iat"), int | float):
        raise OIDCError(403, "failed to verify id_token: no issued-at time")
    return claims


# --- per-login state ------------------------------------------------------------------------


@dataclass
class LoginInfo:
    auth_id: str
    nonce: str
    verifier: str | None
    created: float = field(default_factory=time.monotonic)


@dataclass
class PendingConfirmation:
    user_id: int
    expiry: datetime | None
    csrf: str


class _Expiring(OrderedDict[str, Any]):
    """A bounded map whose entries expire (unauthenticated GETs create entries)."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        super().__init__()
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._at: dict[str, float] = {}

    def put(self, key: str, value: Any) -> None:
        self.sweep()
        self[key] = value
        self._at[key] = time.monotonic()
        while len(self) > self.max_entries:
            old, _ = self.popitem(last=False)
            self._at.pop(old, None)

    def peek(self, key: str) -> Any:
        self.sweep()
        return self.get(key)

    def take(self, key: str) -> Any:
        self.sweep()
        self._at.pop(key, None)
        return self.pop(key, None)

    def sweep(self) -> None:
        now = time.monotonic()
        for k in [k for k, t in self._at.items() if now - t > self.ttl_s]:
            self.pop(k, None)
            self._at.pop(k, None)


def cookie_name(base: str, value: str) -> str:
    return f"{base}_{value[:COOKIE_PREFIX_LEN]}"


# --- the web side ---------------------------------------------------------------------------


class OIDCProvider:
    """The OIDC relying party of one server: discovery, redirect, callback, confirmation."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        self.oidc = control.cfg.oidc
        self.server_url = str(control.cfg.server_url).rstrip("/")
        self.redirect_uri = self.server_url + CALLBACK_PATH
        self.secure_cookies = self.server_url.startswith("https://")
        self.meta: ProviderMetadata | None = None
        self._keys: KeySet | None = None
        self._keys_fetched = 0.0
        self._http: aiohttp.ClientSession | None = None
        self.logins = _Expiring(SESSION_TTL_S, SESSION_MAX)
        self.confirmations = _Expiring(SESSION_TTL_S, SESSION_MAX)

    @property
    def available(self) -> bool:
        return self.meta is not None

    # -- lifecycle -----------------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S))
        return self._http

    async def discover(self) -> ProviderMetadata:
        url = self.oidc.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            async with self._session().get(url) as r:
                if r.status != 200:
                    raise DiscoveryError(f"{url}: HTTP {r.status}")
                doc = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise DiscoveryError(f"{url}: {e or type(e).__name__}") from None
        self.meta = ProviderMetadata.from_document(doc, self.oidc.issuer)
        await self._load_keys()
        return self.meta

    async def _load_keys(self) -> KeySet:
        assert self.meta is not None
        try:
            async with self._session().get(self.meta.jwks_uri) as r:
                if r.status != 200:
                    raise DiscoveryError(f"{self.meta.jwks_uri}: HTTP {r.status}")
                self._keys = KeySet.import_key_set(await r.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValueError, JoseError) as e:
            raise DiscoveryError(f"{self.meta.jwks_uri}: {e or type(e).__name__}") from None
        self._keys_fetched = time.monotonic()
        return self._keys

    async def on_startup(self, app: web.Application) -> None:
        try:
            await self.discover()
        except DiscoveryError as e:
            if self.oidc.only_start_if_oidc_is_available:
                raise RuntimeError(
                    f"OIDC provider {self.oidc.issuer} is not available ({e}); set "
                    "oidc.only_start_if_oidc_is_available: false to start without it") from None
            log.warning("failed to set up OIDC provider, falling back to CLI based "
                        "authentication: %s", e)

    async def on_cleanup(self, app: web.Application) -> None:
        if self._http is not None:
            await self._http.close()

    # -- GET /register/{auth_id} ---------------------------------------------------------

    async def redirect(self, request: web.Request, auth_id: str) -> web.Response:
        assert self.meta is not None
        state, nonce = secrets.token_urlsafe(48), secrets.token_urlsafe(48)
        verifier = new_pkce_verifier() if self.oidc.pkce.enabled else None
        self.logins.put(state, LoginInfo(auth_id, nonce, verifier))
        url = authorization_url(self.meta, self.oidc, self.redirect_uri, state, nonce, verifier)
        resp = web.Response(status=302, headers={"Location": url})
        for base, value in (("state", state), ("nonce", nonce)):
            resp.set_cookie(cookie_name(base, value), value, path=CALLBACK_PATH, max_age=3600,
                            httponly=True, samesite="Lax", secure=self.secure_cookies)
        return resp

    # -- GET /oidc/callback ------------------------------------------------------------

    def _error(self, e: OIDCError) -> web.Response:
        return web.Response(status=e.status, text=pages.auth_error(status=e.status,
                                                                   message=e.message),
                            content_type="text/html")

    async def callback(self, request: web.Request) -> web.Response:
        try:
            return await self._callback(request)
        except OIDCError as e:
            log.info("OIDC login refused: %s", e.message)
            return self._error(e)

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

        token = await self._exchange(code, info.verifier)
        raw = token.get("id_token")
        if not isinstance(raw, str):
            raise OIDCError(400, "no id_token")
        id_claims = await self._verify(raw)
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
            claims = claims.merged_with_userinfo(await self._userinfo(access))
        authorize(self.oidc, claims)

        try:
            pending = self.control.pending.get(info.auth_id)
        except UnknownAuthID:
            raise OIDCError(410, "login session expired, try again") from None
        user = await self._upsert_user(claims)
        expiry = (datetime.fromtimestamp(id_claims["exp"], UTC)
                  if self.oidc.use_expiry_from_token else None)
        csrf = secrets.token_urlsafe(32)
        self.confirmations.put(info.auth_id, PendingConfirmation(user.id, expiry, csrf))
        action = CONFIRM_PATH + info.auth_id
        page = pages.register_confirm(
            form_action=action, csrf_name=CSRF_COOKIE, csrf_token=csrf, user=_display(user),
            hostname=str(pending.hostinfo.get("Hostname") or ""),
            os_name=str(pending.hostinfo.get("OS") or ""),
            machine_key=machine_key_short(pending.machine_key))
        resp = web.Response(text=page, content_type="text/html")
        for base, value in (("state", state), ("nonce", nonce)):
            resp.del_cookie(cookie_name(base, value), path=CALLBACK_PATH)
        resp.set_cookie(CSRF_COOKIE, csrf, path=action, max_age=SESSION_TTL_S, httponly=True,
                        samesite="Strict", secure=self.secure_cookies)
        return resp

    async def _exchange(self, code: str, verifier: str | None) -> dict[str, Any]:
        assert self.meta is not None
        form = {"grant_type": "authorization_code", "code": code,
                "redirect_uri": self.redirect_uri}
        if verifier is not None:
            form["code_verifier"] = verifier
        headers = {"Accept": "application/json"}
        secret = self.oidc.client_secret
        if "client_secret_basic" in self.meta.token_auth_methods:
            # RFC 6749 2.3.1: id and secret are form-encoded before base64.
            cred = f"{quote(self.oidc.client_id, safe='')}:{quote(secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
        else:
            form |= {"client_id": self.oidc.client_id, "client_secret": secret}
        try:
            async with self._session().post(self.meta.token_endpoint, data=form,
                                            headers=headers) as r:
                body = await r.json(content_type=None)
                status = r.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise OIDCError(502, f"could not reach the identity provider: {e}") from None
        if status != 200 or not isinstance(body, dict):
            err = body.get("error") if isinstance(body, dict) else None
            raise OIDCError(403, f"invalid code ({err or f'HTTP {status}'})")
        return body

    async def _verify(self, raw: str) -> dict[str, Any]:
        assert self.meta is not None and self._keys is not None
        kw = {"issuer": self.meta.issuer, "client_id": self.oidc.client_id,
              "algorithms": self.meta.id_token_algs}
        try:
            return verify_id_token(raw, self._keys, **kw)  # type: ignore[arg-type]
        except OIDCError:
            # An unknown key id may mean the provider rotated keys: refetch once a minute.
            if time.monotonic() - self._keys_fetched < 60:
                raise
            try:
                keys = await self._load_keys()
            except DiscoveryError as e:
                raise OIDCError(502, f"could not load the provider's keys: {e}") from None
            return verify_id_token(raw, keys, **kw)  # type: ignore[arg-type]

    async def _userinfo(self, access_token: str) -> dict[str, Any]:
        assert self.meta is not None
        try:
            async with self._session().get(
                    self.meta.userinfo_endpoint,
                    headers={"Authorization": f"Bearer {access_token}"}) as r:
                if r.status == 200 and r.content_type == "application/json":
                    body = await r.json()
                    return body if isinstance(body, dict) else {}
                log.warning("userinfo: HTTP %s %s; using ID token claims only", r.status,
                            r.content_type)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.warning("could not get userinfo; only using claims from id token: %s", e)
        return {}

    async def _upsert_user(self, c: Claims) -> User:
        tn = self.control.tailnet
        fields = user_fields(c, self.oidc.email_verified_required)
        ident = fields.pop("provider_identifier")
        user = next((u for u in tn.list_users() if u.provider_identifier == ident), None)
        if user is None:
            user = await tn.create_user(
                name=fields.get("name", ""), display_name=fields["display_name"],
                email=fields.get("email", ""), provider_identifier=ident, provider="oidc",
                profile_pic_url=fields["profile_pic_url"])
        # Groups (and every later change of profile) go through update_user, which publishes
        # a USER change so policies using IdP groups are recompiled live.
        return await tn.update_user(user.id, **fields)

    # -- POST /register/confirm/{auth_id} ----------------------------------------------

    async def confirm(self, request: web.Request) -> web.Response:
        try:
            return await self._confirm(request)
        except OIDCError as e:
            log.info("OIDC registration confirmation refused: %s", e.message)
            return self._error(e)

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
            pending = self.control.pending.get(auth_id)
        except UnknownAuthID:
            self.confirmations.take(auth_id)
            raise OIDCError(410, "registration session expired") from None
        self.confirmations.take(auth_id)
        tn = self.control.tailnet
        user = tn.get_user(pc.user_id)
        had = {n.id for n in tn.nodes_by_machine_key(pending.machine_key)
               if n.user_id == user.id}
        node: Node = await tn.register_for_user(
            machine_key=pending.machine_key, node_key=pending.node_key, user_id=user.id,
            hostinfo=pending.hostinfo, requested_expiry=pc.expiry or pending.expiry,
            register_method="oidc", capver=pending.capver)
        self.control.pending.complete(auth_id, node)
        resp = web.Response(text=pages.auth_success(new_node=node.id not in had,
                                                    user=_display(user)),
                            content_type="text/html")
        resp.del_cookie(CSRF_COOKIE, path=CONFIRM_PATH + auth_id)
        return resp


def _display(u: User) -> str:
    return u.display_name or u.email or u.name or (u.provider_identifier or "") or str(u.id)


def add_oidc_routes(app: web.Application, control: ControlPlane) -> OIDCProvider | None:
    """With oidc.issuer set: /oidc/callback, POST /register/confirm/{auth_id}, discovery at
    startup, and the register page's redirect (WebAuth.oidc). Returns None without OIDC."""
    if not getattr(getattr(control.cfg, "oidc", None), "issuer", ""):
        return None
    provider = OIDCProvider(control)
    control.webflow.oidc = provider
    app.router.add_get(CALLBACK_PATH, provider.callback)
    app.router.add_post(CONFIRM_PATH + "{auth_id}", provider.confirm)
    app.on_startup.append(provider.on_startup)
    app.on_cleanup.append(provider.on_cleanup)
    return provider


__all__ = ["Claims", "OIDCError", "OIDCProvider", "ProviderMetadata", "add_oidc_routes",
           "authorization_url", "authorize", "policy_group_name", "policy_groups",
           "user_fields", "verify_id_token"]
