"""The pure protocol steps of the relying party: discovery document, authorization URL (with
PKCE) and ID-token verification. No I/O: idp.py fetches, these functions decide."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyheadscale.auth.oidc.claims import as_str, flex_strs
from pyheadscale.auth.oidc.errors import DiscoveryError, OIDCError
from pyheadscale.config import OIDCConfig

if TYPE_CHECKING:
    from joserfc.jwk import KeySet

# authlib and joserfc (~170 modules, ~4 MiB resident) are imported when a login first needs
# them: a server without OIDC never loads them.

ID_TOKEN_ALGS = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384",
                 "PS512", "EdDSA"]


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
        if as_str(doc.get("issuer")) != expected_issuer:
            raise DiscoveryError(f"issuer did not match the issuer returned by provider, "
                                 f"expected {expected_issuer!r} got {doc.get('issuer')!r}")
        for k in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not as_str(doc.get(k)):
                raise DiscoveryError(f"discovery document has no {k}")
        algs = tuple(a for a in flex_strs(doc.get("id_token_signing_alg_values_supported"))
                     if a in ID_TOKEN_ALGS) or ("RS256",)
        methods = flex_strs(doc.get("token_endpoint_auth_methods_supported"))
        return cls(issuer=doc["issuer"], authorization_endpoint=doc["authorization_endpoint"],
                   token_endpoint=doc["token_endpoint"], jwks_uri=doc["jwks_uri"],
                   userinfo_endpoint=as_str(doc.get("userinfo_endpoint")),
                   token_auth_methods=methods or ("client_secret_basic",), id_token_algs=algs)


def new_pkce_verifier() -> str:
    from authlib.common.security import generate_token

    return str(generate_token(64))  # 64 chars of [A-Za-z0-9], within RFC 7636's 43..128


def authorization_url(meta: ProviderMetadata, oidc: OIDCConfig, redirect_uri: str, state: str,
                      nonce: str, verifier: str | None) -> str:
    from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
    from authlib.oauth2.rfc7636 import create_s256_code_challenge

    extra: dict[str, str] = {}
    if verifier is not None:
        extra["access_type"] = "offline"
        if oidc.pkce.method == "plain":
            extra |= {"code_challenge_method": "plain", "code_challenge": verifier}
        else:
            extra |= {"code_challenge_method": "S256",
                      "code_challenge": create_s256_code_challenge(verifier)}
    extra |= oidc.extra_params
    extra["nonce"] = nonce
    return str(prepare_grant_uri(meta.authorization_endpoint, oidc.client_id, "code",
                                 redirect_uri=redirect_uri, scope=" ".join(oidc.scope),
                                 state=state, **extra))


def verify_id_token(raw: str, keys: KeySet, *, issuer: str, client_id: str,
                    algorithms: Iterable[str], now: float | None = None) -> dict[str, Any]:
    """Signature (JWKS), iss, aud (and azp with several audiences), exp and iat.

    The nonce is checked by the caller against what it sent. Raises OIDCError(403).
    """
    from joserfc import jwt
    from joserfc.errors import JoseError

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
