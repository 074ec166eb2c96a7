"""OAuth client-credentials for the v2 API: the scope vocabulary, credential formats, hashing.

Scopes are Tailscale's API scopes (what its Terraform provider and Kubernetes operator ask
for); a write scope grants its own `:read` subset, `all` grants everything and `all:read` every
read scope. Unknown scope strings are kept but never satisfy a requirement.

Credentials follow Headscale 0.30: a client secret is `hskey-client-<client id>-<secret>` (the
id is public and embedded so the token endpoint can derive it from the secret alone), an access
token `hskey-oauthtok-<prefix>-<secret>`. Only an Argon2id hash of the secret part is stored, in
PHC form with OWASP's minimum parameters, so hashes are interchangeable with Headscale's.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from enum import StrEnum

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

CLIENT_PREFIX = "hskey-client-"
TOKEN_PREFIX = "hskey-oauthtok-"
ID_LENGTH = 12
SECRET_LENGTH = 64
TOKEN_TTL_S = 3600  # Tailscale's fixed one-hour access-token lifetime

_HEX = frozenset("0123456789abcdef")


class KeyFormatError(ValueError):
    """A client secret or access token that is not well-formed."""


class Scope(StrEnum):
    ALL = "all"
    ALL_READ = "all:read"
    AUTH_KEYS = "auth_keys"
    AUTH_KEYS_READ = "auth_keys:read"
    OAUTH_KEYS = "oauth_keys"
    OAUTH_KEYS_READ = "oauth_keys:read"
    DEVICES_CORE = "devices:core"
    DEVICES_CORE_READ = "devices:core:read"
    DEVICES_ROUTES = "devices:routes"
    DEVICES_ROUTES_READ = "devices:routes:read"
    POLICY_FILE = "policy_file"
    POLICY_FILE_READ = "policy_file:read"
    FEATURE_SETTINGS = "feature_settings"
    FEATURE_SETTINGS_READ = "feature_settings:read"
    USERS = "users"
    USERS_READ = "users:read"

    @property
    def is_read(self) -> bool:
        return self.value.endswith(":read")


KNOWN_SCOPES: frozenset[str] = frozenset(s.value for s in Scope)


def _satisfies(have: str, want: Scope) -> bool:
    if have == want.value or have == Scope.ALL:
        return True
    if have == Scope.ALL_READ:
        return want.is_read
    return want.value == have + ":read"


def grants(granted: Iterable[str], want: Scope) -> bool:
    """Do the held scopes satisfy `want`?"""
    return any(_satisfies(g, want) for g in granted)


def grants_text(granted: Iterable[str], want: str) -> bool:
    """As grants(), for a scope given as text (an unknown one is never granted)."""
    return want in KNOWN_SCOPES and grants(granted, Scope(want))


def requires_tags(scopes: Iterable[str]) -> bool:
    """A client that may create devices or auth keys mints tagged, tailnet-owned
    credentials, so Tailscale makes it declare tags."""
    return any(s in (Scope.DEVICES_CORE, Scope.AUTH_KEYS) for s in scopes)


# --- credentials -----------------------------------------------------------------------------


def _new(prefix: str) -> tuple[str, str, str]:
    public = secrets.token_hex(ID_LENGTH // 2)
    secret = secrets.token_hex(SECRET_LENGTH // 2)
    return f"{prefix}{public}-{secret}", public, secret


def new_client_secret() -> tuple[str, str, str]:
    """(full secret, client id, secret part)."""
    return _new(CLIENT_PREFIX)


def new_access_token() -> tuple[str, str, str]:
    """(full token, prefix, secret part)."""
    return _new(TOKEN_PREFIX)


def _parse(text: str, prefix: str, what: str) -> tuple[str, str]:
    if not text.startswith(prefix):
        raise KeyFormatError(f"failed to parse {what}")
    rest = text[len(prefix):]
    if len(rest) != ID_LENGTH + 1 + SECRET_LENGTH or rest[ID_LENGTH] != "-":
        raise KeyFormatError(f"failed to parse {what}")
    public, secret = rest[:ID_LENGTH], rest[ID_LENGTH + 1:]
    if not set(public) <= _HEX or not set(secret) <= _HEX:
        raise KeyFormatError(f"failed to parse {what}")
    return public, secret


def parse_client_secret(text: str) -> tuple[str, str]:
    """(client id, secret part). Tailscale lets a secret carry `?key=value` attributes when
    it is used as an auth key; they are dropped here."""
    return _parse(text.partition("?")[0], CLIENT_PREFIX, "oauth client secret")


def parse_access_token(text: str) -> tuple[str, str]:
    return _parse(text, TOKEN_PREFIX, "oauth access token")


def is_client_id(text: str) -> bool:
    return len(text) == ID_LENGTH and set(text) <= _HEX


# --- hashing ---------------------------------------------------------------------------------

# OWASP's minimum Argon2id cost (19 MiB, 2 passes, 1 lane), as Headscale uses. The parameters
# travel in each PHC string, so raising them later still verifies older hashes.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32,
                         salt_len=16, type=Type.ID)


def hash_secret(secret: str) -> bytes:
    """Argon2id PHC string of the secret part. Slow on purpose: run it in a thread."""
    return _HASHER.hash(secret).encode()


def check_secret(secret: str, hashed: bytes | None) -> bool:
    if not hashed:
        return False
    try:
        return _HASHER.verify(hashed.decode("ascii", "replace"), secret)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
