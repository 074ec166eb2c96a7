"""The relying party's HTTP client to one OpenID provider: discovery and JWKS at startup (keys
refetched when a token names one we lack), the code exchange, and UserInfo."""

from __future__ import annotations

import base64
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp

from pyheadscale.auth.oidc.errors import DiscoveryError, OIDCError
from pyheadscale.auth.oidc.protocol import ProviderMetadata, verify_id_token
from pyheadscale.config import OIDCConfig

if TYPE_CHECKING:
    from joserfc.jwk import KeySet

log = logging.getLogger("pyheadscale.oidc")

HTTP_TIMEOUT_S = 10.0
KEY_REFETCH_S = 60  # at most one JWKS refetch a minute, however many bad tokens arrive


class IdPClient:
    """Talks to the provider configured in `oidc` (the config section); `meta` is None until
    `discover` succeeds."""

    def __init__(self, oidc: OIDCConfig, redirect_uri: str) -> None:
        self.oidc = oidc
        self.redirect_uri = redirect_uri
        self.meta: ProviderMetadata | None = None
        self._keys: KeySet | None = None
        self._keys_fetched = 0.0
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S))
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def _get_json(self, url: str) -> Any:
        """GET a JSON document of the discovery phase; any failure is a DiscoveryError."""
        try:
            async with self._session().get(url) as r:
                if r.status != 200:
                    raise DiscoveryError(f"{url}: HTTP {r.status}")
                return await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise DiscoveryError(f"{url}: {str(e) or type(e).__name__}") from None

    async def discover(self) -> ProviderMetadata:
        url = self.oidc.issuer.rstrip("/") + "/.well-known/openid-configuration"
        doc = await self._get_json(url)
        self.meta = ProviderMetadata.from_document(doc, self.oidc.issuer)
        await self._load_keys()
        return self.meta

    async def _load_keys(self) -> KeySet:
        assert self.meta is not None
        doc = await self._get_json(self.meta.jwks_uri)
        from joserfc.errors import JoseError  # only when OIDC is on (see protocol.py)
        from joserfc.jwk import KeySet

        try:
            self._keys = KeySet.import_key_set(doc)
        except (JoseError, ValueError) as e:
            raise DiscoveryError(f"{self.meta.jwks_uri}: {str(e) or type(e).__name__}") from None
        self._keys_fetched = time.monotonic()
        return self._keys

    async def exchange(self, code: str, verifier: str | None) -> dict[str, Any]:
        """The token endpoint's answer to an authorization code (raises OIDCError)."""
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

    async def verify(self, raw: str) -> dict[str, Any]:
        """The claims of a verified ID token (raises OIDCError)."""
        meta = self.meta
        assert meta is not None and self._keys is not None

        def check(keys: KeySet) -> dict[str, Any]:
            return verify_id_token(raw, keys, issuer=meta.issuer, client_id=self.oidc.client_id,
                                   algorithms=meta.id_token_algs)

        try:
            return check(self._keys)
        except OIDCError:
            # An unknown key id may mean the provider rotated keys: refetch once a minute.
            if time.monotonic() - self._keys_fetched < KEY_REFETCH_S:
                raise
            try:
                keys = await self._load_keys()
            except DiscoveryError as e:
                raise OIDCError(502, f"could not load the provider's keys: {e}") from None
            return check(keys)

    async def userinfo(self, access_token: str) -> dict[str, Any]:
        """UserInfo claims, or {} when the endpoint fails (the ID token's claims then stand)."""
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
