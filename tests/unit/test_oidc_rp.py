"""Pure parts of the OIDC relying party: claims, authorization rules, URLs, ID tokens."""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from pyheadscale.auth.oidc import (
    Claims,
    DiscoveryError,
    OIDCError,
    ProviderMetadata,
    authorization_url,
    authorize,
    machine_key_short,
    policy_groups,
    user_fields,
    verify_id_token,
)
from pyheadscale.config import OIDCConfig
from pyheadscale.state.model import User

ISS = "https://idp.example.com"


def cfg(**kw: Any) -> OIDCConfig:
    return OIDCConfig.model_validate({"issuer": ISS, "client_id": "cid"} | kw)


@pytest.mark.parametrize("iss,sub,want", [
    ("https://idp.example.com", "123", "https://idp.example.com/123"),
    ("https://idp.example.com/", "/123", "https://idp.example.com/123"),
    ("HTTPS://idp.example.com/realms//x/", "u 1", "https://idp.example.com/realms/x/u 1"),
    ("oidc", "sub", "oidc/sub"),
    ("", "sub", "/sub"),
    ("https://idp.example.com", "", "https://idp.example.com"),
    # Plain concatenation: ".." must not eat the issuer path (identifier collisions).
    ("https://idp.example.com/a", "..", "https://idp.example.com/a/.."),
])
def test_identifier(iss: str, sub: str, want: str) -> None:
    assert Claims(sub=sub, iss=iss).identifier() == want


def test_flexible_claim_types() -> None:
    c = Claims.from_mapping({"sub": "s", "iss": ISS, "email_verified": "true", "groups": "g1"})
    assert c.email_verified is True and c.groups == ("g1",)
    c = Claims.from_mapping({"sub": "s", "email_verified": "false", "groups": ["a", 3, "b"]})
    assert c.email_verified is False and c.groups == ("a", "b")
    assert Claims.from_mapping({"sub": 5, "name": ["x"]}) == Claims(sub="", iss="")


def test_userinfo_merge_rules() -> None:
    c = Claims(sub="s", iss=ISS, name="Id Name", email="", groups=("a",))
    merged = c.merged_with_userinfo({"sub": "s", "email": "e@x.org", "email_verified": True,
                                     "groups": ["b"], "name": ""})
    assert merged.email == "e@x.org" and merged.email_verified and merged.groups == ("b",)
    assert merged.name == "Id Name"  # empty UserInfo values do not erase ID-token ones
    assert c.merged_with_userinfo({"sub": "other", "email": "evil@x.org"}) == c


@pytest.mark.parametrize("conf,claims,message", [
    (cfg(allowed_groups=["eng"]), dict(groups=("sales",)), "unauthorised group"),
    (cfg(allowed_domains=["example.com"]), dict(email="a@evil.com"), "unauthorised domain"),
    (cfg(allowed_domains=["example.com"]), dict(email="no-at-sign"), "unauthorised domain"),
    (cfg(allowed_users=["a@example.com"]), dict(email="b@example.com"), "unauthorised user"),
    (cfg(allowed_domains=["example.com"]), dict(email="a@example.com", email_verified=False),
     "unverified email"),
])
def test_authorize_refuses(conf: Any, claims: dict[str, Any], message: str) -> None:
    c = Claims(**({"sub": "s", "iss": ISS, "email_verified": True} | claims))
    with pytest.raises(OIDCError, match=message) as e:
        authorize(conf, c)
    assert e.value.status == 401


def test_authorize_accepts() -> None:
    authorize(cfg(), Claims(sub="s", iss=ISS))  # no rules: anyone
    c = Claims(sub="s", iss=ISS, email="a@example.com", groups=("eng",), email_verified=True)
    authorize(cfg(allowed_groups=["ops", "eng"], allowed_domains=["example.com"],
                  allowed_users=["a@example.com"]), c)
    unverified = Claims(sub="s", iss=ISS, email="a@example.com")
    authorize(cfg(allowed_domains=["example.com"], email_verified_required=False), unverified)
    authorize(cfg(allowed_groups=["eng"]), Claims(sub="s", iss=ISS, groups=("eng",)))


def test_user_fields() -> None:
    c = Claims(sub="42", iss=ISS, name="Ann", email="ann@example.com", email_verified=False,
               picture="https://p/ann.png", username="ann", groups=("g",))
    f = user_fields(c, email_verified_required=True)
    assert "email" not in f  # unverified and required: not taken
    assert f["name"] == "ann" and f["display_name"] == "Ann" and f["groups"] == ("g",)
    assert f["provider_identifier"] == f"{ISS}/42" and f["provider"] == "oidc"
    assert user_fields(c, email_verified_required=False)["email"] == "ann@example.com"
    bad = Claims(sub="1", iss=ISS, username="1 bad name", email="not an email",
                 email_verified=True)
    f = user_fields(bad, True)
    assert "name" not in f and "email" not in f


def test_policy_groups_mapping() -> None:
    users = [User(id=1, name="ann", email="ann@example.com", groups=("/Eng Team", "ops")),
             User(id=2, name="bob", groups=("ops", "//")),
             User(id=3, name="", email="", groups=("ops",))]
    assert policy_groups(users) == {"group:eng-team": ["ann@example.com"],
                                    "group:ops": ["ann@example.com", "bob@"]}
    assert list(policy_groups(users, prefix="idp-")) == ["group:idp-eng-team", "group:idp-ops"]


def test_machine_key_short() -> None:
    key = bytes(range(32))
    assert machine_key_short(key) == "[" + base64.b64encode(key).decode()[:5] + "]"
    assert machine_key_short(bytes(32)) == ""


META = ProviderMetadata(issuer=ISS, authorization_endpoint=ISS + "/authorize?tenant=1",
                        token_endpoint=ISS + "/token", jwks_uri=ISS + "/jwks")


@pytest.mark.parametrize("method", ["S256", "plain", None])
def test_authorization_url(method: str | None) -> None:
    conf = cfg(extra_params={"domain_hint": "example.com", "prompt": "login"},
               pkce={"enabled": method is not None, "method": method or "S256"})
    verifier = "v" * 50 if method else None
    url = authorization_url(META, conf, "https://hs.example.com/oidc/callback", "st8",
                            "n0nce", verifier)
    parts = urlsplit(url)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == ISS + "/authorize"
    assert q["tenant"] == "1"  # the endpoint's own query survives
    assert q["response_type"] == "code" and q["client_id"] == "cid"
    assert q["redirect_uri"] == "https://hs.example.com/oidc/callback"
    assert q["scope"] == "openid profile email" and q["state"] == "st8" and q["nonce"] == "n0nce"
    assert q["domain_hint"] == "example.com" and q["prompt"] == "login"
    if method == "S256":
        want = base64.urlsafe_b64encode(hashlib.sha256(b"v" * 50).digest()).rstrip(b"=")
        assert q["code_challenge"] == want.decode() and q["code_challenge_method"] == "S256"
    elif method == "plain":
        assert q["code_challenge"] == "v" * 50 and q["code_challenge_method"] == "plain"
    else:
        assert "code_challenge" not in q


def test_discovery_issuer_must_match() -> None:
    doc = {"issuer": ISS, "authorization_endpoint": "a", "token_endpoint": "t",
           "jwks_uri": "j", "id_token_signing_alg_values_supported": ["none", "RS256"]}
    meta = ProviderMetadata.from_document(doc, ISS)
    assert meta.id_token_algs == ("RS256",)  # "none" is never accepted
    with pytest.raises(DiscoveryError, match="issuer did not match"):
        ProviderMetadata.from_document(doc | {"issuer": ISS + "/"}, ISS)
    with pytest.raises(DiscoveryError, match="jwks_uri"):
        ProviderMetadata.from_document({k: v for k, v in doc.items() if k != "jwks_uri"}, ISS)


# --- ID tokens signed here, with the provider's key or with one it never published ---------

KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)
OTHER = RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)
JWKS = KeySet.import_key_set({"keys": [KEY.as_dict(private=False)]})


def token(key: RSAKey = KEY, alg: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISS, "aud": "cid", "sub": "s", "iat": now, "exp": now + 300,
            "nonce": "n"} | claims
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode({"alg": alg, "kid": "k1"}, body, key, algorithms=[alg])


def verify(raw: str, now: float | None = None) -> dict[str, Any]:
    return verify_id_token(raw, JWKS, issuer=ISS, client_id="cid", algorithms=["RS256"],
                           now=now)


def test_valid_token() -> None:
    assert verify(token())["sub"] == "s"
    assert verify(token(aud=["cid", "other"], azp="cid"))["sub"] == "s"


@pytest.mark.parametrize("raw,why", [
    (lambda: token(OTHER), "bad_signature"),
    (lambda: token(exp=int(time.time()) - 1), "expired"),
    (lambda: token(exp=None), "no expiry"),
    (lambda: token(iat=None), "issued-at"),
    (lambda: token(iss=ISS + "/"), "wrong issuer"),
    (lambda: token(aud="someone-else"), "wrong audience"),
    (lambda: token(aud=["cid", "other"], azp="other"), "authorized party"),
    (lambda: token(alg="RS384"), "failed to verify"),  # not an allowed algorithm
    (lambda: token().rsplit(".", 1)[0] + ".", "failed to verify"),  # signature stripped
    (lambda: "not.a.jwt", "failed to verify"),
])
def test_bad_tokens_refused(raw: Any, why: str) -> None:
    with pytest.raises(OIDCError, match=why) as e:
        verify(raw())
    assert e.value.status == 403


def test_unsigned_token_refused() -> None:
    header = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
    payload = base64.urlsafe_b64encode(
        f'{{"iss":"{ISS}","aud":"cid","exp":{int(time.time()) + 60},"iat":1}}'.encode()
    ).rstrip(b"=").decode()
    with pytest.raises(OIDCError):
        verify(f"{header}.{payload}.")
