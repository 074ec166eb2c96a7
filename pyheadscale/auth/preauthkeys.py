"""Pre-auth key format, hashing and usability rules (Headscale `db/preauth_keys.go`,
`types/preauth_key.go`).

New keys are `hskey-auth-<12 hex prefix>-<64 hex secret>`; only the prefix and a bcrypt hash of
the secret are stored and the full key is shown once. Legacy keys are stored in plaintext and
matched whole. bcrypt is slow on purpose: callers run `hash_secret`/`check_secret` in a thread.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import bcrypt

from pyheadscale.state.model import PreAuthKey

AUTH_KEY_PREFIX = "hskey-auth-"
PREFIX_LENGTH = 12
SECRET_LENGTH = 64
BCRYPT_ROUNDS = 10  # Go's bcrypt.DefaultCost

# Error texts clients see as "backend error: <text>" (Headscale auth.go / PAKError).
ERR_UNKNOWN = "invalid pre auth key"
ERR_EXPIRED = "authkey expired"
ERR_USED = "authkey already used"
ERR_INVALID = "invalid authkey"
ERR_REVOKED = "authkey revoked"
ERR_NOT_TAGGED_OR_OWNED = "auth-key must be either tagged or owned by user"

_URLSAFE = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class ParsedKey:
    prefix: str | None  # None for a legacy plaintext key
    secret: str  # the secret part, or the whole legacy key


class KeyFormatError(ValueError):
    pass


def parse_prefixed(rest: str, what: str) -> tuple[str, str]:
    """Split "<prefix>-<secret>" by fixed lengths (the alphabet allows '-')."""
    if len(rest) < PREFIX_LENGTH + 1 + SECRET_LENGTH:
        raise KeyFormatError(f"failed to parse {what}: key too short")
    prefix, sep, secret = rest[:PREFIX_LENGTH], rest[PREFIX_LENGTH], rest[PREFIX_LENGTH + 1:]
    if sep != "-":
        raise KeyFormatError(f"failed to parse {what}: expected separator '-'")
    if len(secret) != SECRET_LENGTH:
        raise KeyFormatError(f"failed to parse {what}: secret length mismatch")
    if not _URLSAFE.fullmatch(prefix) or not _URLSAFE.fullmatch(secret):
        raise KeyFormatError(f"failed to parse {what}: invalid characters")
    return prefix, secret


def parse_key(key: str) -> ParsedKey:
    if not key:
        raise KeyFormatError("failed to parse auth-key: empty")
    _, found, rest = key.partition(AUTH_KEY_PREFIX)
    if not found:
        return ParsedKey(None, key)
    prefix, secret = parse_prefixed(rest, "auth-key")
    return ParsedKey(prefix, secret)


def new_key() -> tuple[str, str, str]:
    """(full key, prefix, secret) from the OS CSPRNG."""
    prefix = secrets.token_hex(PREFIX_LENGTH // 2)
    secret = secrets.token_hex(SECRET_LENGTH // 2)
    return f"{AUTH_KEY_PREFIX}{prefix}-{secret}", prefix, secret


def hash_secret(secret: str, rounds: int = BCRYPT_ROUNDS) -> bytes:
    return bcrypt.hashpw(secret.encode(), bcrypt.gensalt(rounds))


def check_secret(secret: str, hashed: bytes | None) -> bool:
    if not hashed:
        return False
    try:
        return bcrypt.checkpw(secret.encode(), hashed)
    except ValueError:  # a corrupt stored hash must not crash registration
        return False


def validate_tags(tags: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Deduplicate, sort, require the "tag:" prefix (Headscale validateACLTags)."""
    out = sorted(set(tags))
    for t in out:
        if not t.startswith("tag:"):
            raise ValueError(f"auth-key tag is invalid: '{t}' did not begin with 'tag:'")
    return tuple(out)


def unusable_reason(pak: PreAuthKey, now: datetime) -> str | None:
    """Headscale's PreAuthKey.Validate: None when the key may register a node."""
    if pak.revoked is not None:
        return ERR_REVOKED
    if pak.expiration is not None and pak.expiration < now:
        return ERR_EXPIRED
    if pak.reusable:
        return None
    if pak.used:
        return ERR_USED
    return None


def masked(pak: PreAuthKey) -> str:
    return f"{AUTH_KEY_PREFIX}{pak.prefix}-***" if pak.prefix else "***"
