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

The parts: pure ones in claims.py (claims and the login rules) and protocol.py (discovery
document, authorization URL, ID-token verification); I/O in idp.py (HTTP to the provider) and
web.py (the aiohttp handlers, with sessions.py holding their short-lived state).
"""

from pyheadscale.auth.oidc.claims import (
    Claims,
    authorize,
    clean_identifier,
    machine_key_short,
    user_fields,
)
from pyheadscale.auth.oidc.errors import DiscoveryError, OIDCError
from pyheadscale.auth.oidc.idp import HTTP_TIMEOUT_S, IdPClient
from pyheadscale.auth.oidc.protocol import (
    ID_TOKEN_ALGS,
    ProviderMetadata,
    authorization_url,
    new_pkce_verifier,
    verify_id_token,
)
from pyheadscale.auth.oidc.sessions import (
    COOKIE_PREFIX_LEN,
    LoginInfo,
    PendingConfirmation,
    cookie_name,
)
from pyheadscale.auth.oidc.web import (
    CALLBACK_PATH,
    CONFIRM_PATH,
    CSRF_COOKIE,
    SESSION_MAX,
    SESSION_TTL_S,
    OIDCProvider,
)
from pyheadscale.policy.idpgroups import policy_group_name, policy_groups

__all__ = [
    "CALLBACK_PATH", "CONFIRM_PATH", "COOKIE_PREFIX_LEN", "CSRF_COOKIE", "HTTP_TIMEOUT_S",
    "ID_TOKEN_ALGS", "SESSION_MAX", "SESSION_TTL_S", "Claims", "DiscoveryError", "IdPClient",
    "LoginInfo", "OIDCError", "OIDCProvider", "PendingConfirmation", "ProviderMetadata",
    "authorization_url", "authorize", "clean_identifier", "cookie_name",
    "machine_key_short", "new_pkce_verifier", "policy_group_name", "policy_groups",
    "user_fields", "verify_id_token",
]
