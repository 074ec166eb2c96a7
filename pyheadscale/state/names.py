"""MagicDNS names: hostname sanitisation, given-name validation and uniqueness, user names.

Mirrors Tailscale's `util/dnsname` (SanitizeHostname, ValidLabel), which Headscale 0.29 uses for
node given names, plus Headscale's collision rule (base, base-1, base-2, ...; empty -> "node")
and its `ValidateUsername`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Container

MAX_LABEL_LENGTH = 63
MAX_HOSTNAME_LENGTH = 255  # Headscale's MaxHostnameLength for "<given>.<base_domain>."
FALLBACK_GIVEN_NAME = "node"

_SEPARATORS = frozenset(b" .@_")
_COMMON_SUFFIXES = (".local", ".localdomain", ".lan")


class InvalidName(ValueError):
    """A name that cannot be used as given (a DNS label or a user name)."""


def _alnum(c: int) -> bool:
    return 0x30 <= c <= 0x39 or 0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A


def _dnschar(c: int) -> bool:
    return _alnum(c) or c == 0x2D


def trim_common_suffixes(hostname: str) -> str:
    # Applied in sequence, exactly like Tailscale's TrimCommonSuffixes.
    for suffix in _COMMON_SUFFIXES:
        hostname = hostname.removesuffix(suffix)
    return hostname


def sanitize_label(label: str) -> str:
    """Tailscale's SanitizeLabel: works on UTF-8 bytes, so non-ASCII characters are dropped."""
    raw = label.encode("utf-8", "surrogatepass")
    start, end = 0, min(len(raw), MAX_LABEL_LENGTH)
    while start < end and not _alnum(raw[start]):
        start += 1
    while start < end and not _alnum(raw[end - 1]):
        end -= 1
    out = bytearray()
    for i in range(start, end):
        c = raw[i]
        boundary = i in (start, end - 1)
        if not boundary and c in _SEPARATORS:
            out.append(0x2D)
        elif _dnschar(c):
            out.append(c | 0x20 if 0x41 <= c <= 0x5A else c)
    return out.decode("ascii")


def sanitize_hostname(hostname: str) -> str:
    """`Joe's Mac mini` -> `joes-mac-mini`; may return "" (callers fall back to "node")."""
    return sanitize_label(trim_common_suffixes(hostname))


def given_name_base(hostname: str) -> str:
    return sanitize_hostname(hostname) or FALLBACK_GIVEN_NAME


def label_error(label: str) -> str | None:
    """Tailscale's ValidLabel; returns the error text or None when valid."""
    raw = label.encode("utf-8", "surrogatepass")
    if not raw:
        return "empty DNS label"
    if len(raw) > MAX_LABEL_LENGTH:
        return f"{label!r} is too long, max length is {MAX_LABEL_LENGTH} bytes"
    if not _alnum(raw[0]):
        return f"{label!r} is not a valid DNS label: must start with a letter or number"
    if not _alnum(raw[-1]):
        return f"{label!r} is not a valid DNS label: must end with a letter or number"
    for c in raw[1:-1]:
        if not _dnschar(c):
            return f"{label!r} is not a valid DNS label: contains invalid character {chr(c)!r}"
    return None


def validate_given_name(name: str, base_domain: str = "") -> None:
    """Admin renames: an exact DNS label (no sanitising) whose FQDN fits 255 characters."""
    err = label_error(name)
    if err is not None:
        raise InvalidName(f"given name is not a valid DNS label: {err}")
    fqdn = f"{name}.{base_domain}." if base_domain else name
    if len(fqdn) > MAX_HOSTNAME_LENGTH:
        raise InvalidName(f"given name is not a valid DNS label: creating valid FQDN ({fqdn}): "
                          "hostname too long, cannot except 255 ASCII chars")


def unique_given_name(base: str, taken: Container[str]) -> str:
    """base, base-1, base-2, ... first free wins (Headscale's resolveGivenName).

    Unlike Headscale, the base is shortened when the suffix would push the label past 63
    bytes, so the result is always a valid label.
    """
    if not base:
        base = FALLBACK_GIVEN_NAME
    if base not in taken:
        return base
    i = 1
    while True:
        suffix = f"-{i}"
        stem = base[: MAX_LABEL_LENGTH - len(suffix)].rstrip("-") or FALLBACK_GIVEN_NAME
        candidate = stem + suffix
        if candidate not in taken:
            return candidate
        i += 1


def is_auto_derived(given_name: str, hostname: str) -> bool:
    """True when given_name is what sanitising hostname yields (maybe with a "-N" bump).

    Used to keep an admin rename when the client later reports a new hostname.
    """
    base = given_name_base(hostname)
    if given_name == base:
        return True
    m = _BUMPED.fullmatch(given_name)
    if m is None:
        return False
    stem, suffix = m.group(1), "-" + m.group(2)
    return stem in (base, base[: MAX_LABEL_LENGTH - len(suffix)].rstrip("-"))


_BUMPED = re.compile(r"(.+)-([0-9]+)")


# --- user names (Headscale util.ValidateUsername) -----------------------------------------


def validate_username(name: str) -> None:
    raw = name.encode("utf-8", "surrogatepass")
    if len(raw) < 2:
        raise InvalidName("username must be at least 2 characters long")
    # Go tests the first *byte* as a rune (Latin-1 reading), not the first character.
    if not chr(raw[0]).isalpha():
        raise InvalidName("username must start with a letter")
    ats = 0
    for ch in name:
        if ch.isalpha() or unicodedata.category(ch) == "Nd" or ch in "-._":
            continue
        if ch == "@":
            ats += 1
            if ats > 1:
                raise InvalidName("username cannot contain more than one '@'")
            continue
        raise InvalidName(f"username contains invalid character: '{ch}'")
