"""The relay's DERP private key on disk.

Accepted formats: derper's config JSON ``{"PrivateKey":"privkey:<64 hex>"}`` (key matched
case-insensitively, other keys ignored) and a bare ``privkey:<64 hex>`` line.  New keys are
written in derper's JSON format with mode 0600.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nacl.public import PrivateKey

PRIVKEY_PREFIX = "privkey:"
NODEKEY_PREFIX = "nodekey:"


class KeyFileError(ValueError):
    pass


def parse_private_key(text: str) -> bytes:
    """32 raw bytes from either accepted file format."""
    s = text.strip()
    if s.startswith("{"):
        try:
            obj = json.loads(s)
        except ValueError as e:
            raise KeyFileError(f"bad key JSON: {e}") from None
        val = None
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k.lower() == "privatekey":
                    val = v
        if not isinstance(val, str):
            raise KeyFileError("no PrivateKey in key file")
        s = val.strip()
    if not s.startswith(PRIVKEY_PREFIX):
        raise KeyFileError("private key must look like privkey:<64 hex>")
    hexpart = s[len(PRIVKEY_PREFIX):]
    try:
        raw = bytes.fromhex(hexpart)
    except ValueError:
        raise KeyFileError("private key is not hex") from None
    if len(raw) != 32 or len(hexpart) != 64:
        raise KeyFileError("private key must be 32 bytes")
    return raw


def format_private_key(raw: bytes) -> str:
    return PRIVKEY_PREFIX + raw.hex()


def format_node_key(pub: bytes) -> str:
    return NODEKEY_PREFIX + pub.hex()


def generate_private_key() -> bytes:
    return bytes(PrivateKey.generate())


def public_key(raw_private: bytes) -> bytes:
    return bytes(PrivateKey(raw_private).public_key)


def load_or_create_private_key(path: str | os.PathLike[str]) -> bytes:
    """Load the DERP key from ``path``; create it (derper JSON format, 0600) if missing."""
    p = Path(path)
    if p.exists():
        return parse_private_key(p.read_text())
    raw = generate_private_key()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"PrivateKey": format_private_key(raw)}, indent="\t") + "\n")
    os.replace(tmp, p)
    return raw
