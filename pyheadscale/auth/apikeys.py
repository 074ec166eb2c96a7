"""API key format and hashing (Headscale `db/api_key.go`).

New keys are `hskey-api-<12 hex prefix>-<64 hex secret>`, legacy keys `<7 char prefix>.<secret>`;
both store the prefix and a bcrypt hash of the secret only.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from pyheadscale.auth.preauthkeys import (
    PREFIX_LENGTH,
    SECRET_LENGTH,
    KeyFormatError,
    check_secret,
    hash_secret,
    parse_prefixed,
)

API_KEY_PREFIX = "hskey-api-"
LEGACY_PREFIX_LENGTH = 7

__all__ = ["API_KEY_PREFIX", "ParsedAPIKey", "check_secret", "hash_secret", "new_key",
           "parse_api_key", "parse_display_prefix", "KeyFormatError"]


@dataclass(frozen=True)
class ParsedAPIKey:
    prefix: str
    secret: str
    legacy: bool


def parse_api_key(key: str) -> ParsedAPIKey:
    if not key:
        raise KeyFormatError("failed to parse ApiKey: empty")
    _, found, rest = key.partition(API_KEY_PREFIX)
    if found:
        prefix, secret = parse_prefixed(rest, "ApiKey")
        return ParsedAPIKey(prefix, secret, False)
    prefix, dot, secret = key.partition(".")
    if not dot or len(prefix) != LEGACY_PREFIX_LENGTH:
        raise KeyFormatError("failed to parse ApiKey")
    return ParsedAPIKey(prefix, secret, True)


def parse_display_prefix(text: str) -> str:
    """Accepts a bare prefix or "hskey-api-<prefix>-***" (what `apikeys list` shows)."""
    if text.startswith(API_KEY_PREFIX):
        rest = text[len(API_KEY_PREFIX):]
        if len(rest) < PREFIX_LENGTH:
            raise KeyFormatError("failed to parse ApiKey: prefix too short")
        return rest[:PREFIX_LENGTH]
    return text


def new_key() -> tuple[str, str, str]:
    prefix = secrets.token_hex(PREFIX_LENGTH // 2)
    secret = secrets.token_hex(SECRET_LENGTH // 2)
    return f"{API_KEY_PREFIX}{prefix}-{secret}", prefix, secret


def display(prefix: str) -> str:
    return f"{API_KEY_PREFIX}{prefix}-***" if len(prefix) == PREFIX_LENGTH else f"{prefix}***"
