"""Curve25519 keys: generation, Headscale's key file format and the ``prefix:hex`` text form.

Headscale stores its Noise private key as the text ``privkey:<64 lowercase hex>`` (no newline,
file mode 0600) and trims whitespace when reading it back.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

KEY_LEN = 32
PRIVATE_PREFIX = "privkey:"
MACHINE_PREFIX = "mkey:"
NODE_PREFIX = "nodekey:"
DISCO_PREFIX = "discokey:"
ZERO_KEY = bytes(KEY_LEN)


class KeyFormatError(ValueError):
    """A key string is not ``prefix`` + 64 hex characters."""


class KeyFileError(ValueError):
    """The private key file exists but does not hold a valid key."""


def generate_private_key() -> bytes:
    return X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def public_key(private_key: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key."""
    if len(private_key) != KEY_LEN:
        raise KeyFormatError("private key must be 32 bytes")
    return (
        X25519PrivateKey.from_private_bytes(bytes(private_key))
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def format_key(prefix: str, raw: bytes) -> str:
    """``prefix`` + lowercase hex, e.g. ``format_key("mkey:", pub)``."""
    if len(raw) != KEY_LEN:
        raise KeyFormatError(f"{prefix} key must be 32 bytes, got {len(raw)}")
    return prefix + bytes(raw).hex()


def parse_key(prefix: str, text: str) -> bytes:
    """Strict inverse of ``format_key`` (upper-case hex accepted, like Tailscale)."""
    if not text.startswith(prefix):
        raise KeyFormatError(f"key {text[:16]!r}... does not start with {prefix!r}")
    hexpart = text[len(prefix) :]
    if len(hexpart) != 2 * KEY_LEN:
        raise KeyFormatError(f"{prefix} key must have 64 hex characters")
    try:
        return bytes.fromhex(hexpart)
    except ValueError:
        raise KeyFormatError(f"{prefix} key is not valid hex") from None


def mkey(raw: bytes) -> str:
    return format_key(MACHINE_PREFIX, raw)


def nodekey(raw: bytes) -> str:
    return format_key(NODE_PREFIX, raw)


def discokey(raw: bytes) -> str:
    return format_key(DISCO_PREFIX, raw)


def privkey(raw: bytes) -> str:
    return format_key(PRIVATE_PREFIX, raw)


def load_or_create_private_key(path: str | os.PathLike[str]) -> bytes:
    """Read the private key at ``path``, or create it (mode 0600) if the file is missing.

    The key must stay stable across restarts: running clients keep the server key they
    fetched first (docs/protocol.md, "Discovery"), so a malformed file is an error, never silently replaced.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return _create(p)
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise KeyFileError(f"private key file {p} is not a text key file: {e}") from None
    try:
        raw = parse_key(PRIVATE_PREFIX, text)
    except KeyFormatError as e:
        raise KeyFileError(
            f"private key file {p} is malformed ({e}); expected 'privkey:' and 64 hex characters"
        ) from None
    return raw


def _create(p: Path) -> bytes:
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    raw = generate_private_key()
    # O_EXCL: if another process created the file meanwhile, use theirs instead.
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_or_create_private_key(p)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(privkey(raw))
    os.chmod(p, 0o600)  # the umask may have narrowed it; make it exact
    return raw
