"""Reading /api/v1 requests the way Headscale's gateway does: JSON bodies with protojson's
camelCase or the proto snake_case names, uint64 as string or number, and Headscale's checks
and messages for auth IDs, tags, prefixes and timestamps."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from aiohttp import web

from pyheadscale.api import shapes
from pyheadscale.api.errors import bad_request
from pyheadscale.auth.webflow import AUTH_ID_PREFIX

AUTH_ID_LENGTH = 38  # "hskey-authreq-" + 24 random characters (Headscale types.AuthID)


async def read_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"invalid JSON body: {e}") from None
    if not isinstance(body, dict):
        raise bad_request("invalid JSON body: expected an object")
    return body


def pick(body: dict[str, Any], *names: str, default: Any = None) -> Any:
    """First present field among protojson's camelCase and the proto snake_case names."""
    for n in names:
        if n in body and body[n] is not None:
            return body[n]
    return default


def text_field(body: dict[str, Any], *names: str) -> str:
    v = pick(body, *names, default="")
    if not isinstance(v, str):
        raise bad_request(f"invalid value for field {names[0]!r}: expected a string")
    return v


def list_field(body: dict[str, Any], *names: str) -> list[str]:
    v = pick(body, *names, default=[])
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise bad_request(f"invalid value for field {names[0]!r}: expected a list of strings")
    return v


def bool_value(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "t")
    return bool(v)


def parse_uint(value: Any, context: str) -> int:
    """uint64 from a JSON string/number or a path/query text; "" and None give 0."""
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise bad_request(f"{context}: invalid value {value!r}")
    if isinstance(value, int):
        if 0 <= value < 1 << 64:
            return value
        raise bad_request(f'{context}: strconv.ParseUint: parsing "{value}": value out of range')
    s = str(value)
    if not s.isdigit() or not s.isascii():
        raise bad_request(f'{context}: strconv.ParseUint: parsing "{s}": invalid syntax')
    n = int(s)
    if n >= 1 << 64:
        raise bad_request(f'{context}: strconv.ParseUint: parsing "{s}": value out of range')
    return n


def parse_node_id(s: str) -> int:
    return parse_uint(s, "type mismatch, parameter: node_id, error")


def auth_id_error(auth_id: str) -> str | None:
    """Headscale types.AuthID validation message, or None when well-formed."""
    if not auth_id.startswith(AUTH_ID_PREFIX):
        return f'auth ID has invalid prefix: expected prefix "{AUTH_ID_PREFIX}"'
    if len(auth_id) != AUTH_ID_LENGTH:
        return f"auth ID has invalid length: expected {AUTH_ID_LENGTH}, got {len(auth_id)}"
    return None


def validate_tag(tag: str) -> str | None:
    """Headscale validateTag."""
    if not tag.startswith("tag:"):
        return "tag must start with the string 'tag:'"
    if tag.lower() != tag:
        return "tag should be lowercase"
    if len(tag.split()) > 1:
        return "tags must not contain spaces"
    return None


def parse_prefix(r: str) -> Any:
    try:
        return ipaddress.ip_network(r.strip(), strict=False) if "/" in r else None
    except ValueError:
        return None


def go_list(items: Sequence[str]) -> str:
    return "[" + " ".join(items) + "]"  # Go's %v of a []string



def check_auth_id(auth_id: str, context: str) -> None:
    """Refuse a malformed auth ID with a 400 (`context` prefixes the message)."""
    problem = auth_id_error(auth_id)
    if problem:
        raise bad_request(f"{context}: {problem}")


def check_tags(tags: Sequence[str], context: str) -> None:
    """Refuse the first malformed tag with a 400 (`context` prefixes the message)."""
    for t in tags:
        problem = validate_tag(t)
        if problem:
            raise bad_request(f"{context}: {problem}")


def expiration_field(body: dict[str, Any], context: str) -> datetime | None:
    """The optional RFC 3339 `expiration` of a create request."""
    text = pick(body, "expiration")
    if not text:
        return None
    try:
        return shapes.parse_ts(str(text))
    except ValueError as e:
        raise bad_request(f"{context}: {e}") from None
