"""Wire encodings of Tailscale's tailcfg types: keys, times, IDs, JSON, request parsing.

Facts (docs/protocol.md, "Discovery" for key and time text):
keys are ``prefix + 64 lower hex`` (upper-case hex accepted on input), the empty string is a
decode error, ``null``/absent means the zero key; times are RFC 3339 with the Go zero time
``0001-01-01T00:00:00Z`` meaning unset.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from enum import Enum
from typing import Any

import orjson

__all__ = [
    "GO_ZERO_TIME",
    "ZERO_KEY",
    "KeyKind",
    "KeyParseError",
    "MapRequest",
    "RegisterRequest",
    "RequestParseError",
    "TailcfgError",
    "TimeParseError",
    "dumps",
    "encode_key",
    "format_time",
    "host_prefix",
    "is_zero_key",
    "loads",
    "parse_key",
    "parse_map_request",
    "parse_register_request",
    "parse_time",
    "prefix_text",
    "stable_node_id",
]


class TailcfgError(ValueError):
    """Base of every decoding error in this module."""


class KeyParseError(TailcfgError):
    """A key's text form is malformed (wrong prefix, length or hex)."""


class TimeParseError(TailcfgError):
    """A time is not RFC 3339."""


class RequestParseError(TailcfgError):
    """A RegisterRequest/MapRequest body is not what a client sends."""


# ---------------------------------------------------------------------------------------------
# Keys


class KeyKind(Enum):
    NODE = "nodekey:"
    MACHINE = "mkey:"
    DISCO = "discokey:"
    NL = "nlpub:"
    CHALLENGE = "chalpub:"


ZERO_KEY = bytes(32)
_KEY_LEN = 32
_HEX_RE = re.compile(r"[0-9a-fA-F]{64}")
# Go's key.NLPublic also parses the older "tlpub:" spelling.
_ALT_PREFIXES: dict[KeyKind, tuple[str, ...]] = {KeyKind.NL: ("tlpub:",)}


def encode_key(kind: KeyKind, raw: bytes | None) -> str:
    """Text form of a 32-byte key; None encodes as the zero key (never ``""``: it is a decode error
    that discards the whole message)."""
    if raw is None:
        raw = ZERO_KEY
    if len(raw) != _KEY_LEN:
        raise KeyParseError(f"{kind.value} key must be {_KEY_LEN} bytes, got {len(raw)}")
    return kind.value + raw.hex()


def parse_key(kind: KeyKind, text: Any) -> bytes:
    """Parse ``prefix:<64 hex>``; ``None`` (JSON null/absent) yields the zero key."""
    if text is None:
        return ZERO_KEY
    if not isinstance(text, str):
        raise KeyParseError(f"{kind.value} key must be a string, got {type(text).__name__}")
    for prefix in (kind.value, *_ALT_PREFIXES.get(kind, ())):
        if text.startswith(prefix):
            body = text[len(prefix) :]
            break
    else:
        raise KeyParseError(f"key {text[:16]!r} lacks the {kind.value!r} prefix")
    if not _HEX_RE.fullmatch(body):
        raise KeyParseError(f"{kind.value} key must be 64 hex digits")
    return bytes.fromhex(body)


def is_zero_key(raw: bytes | None) -> bool:
    return raw is None or raw == ZERO_KEY


def _optional_key(kind: KeyKind, text: Any) -> bytes | None:
    raw = parse_key(kind, text)
    return None if raw == ZERO_KEY else raw


# ---------------------------------------------------------------------------------------------
# Times

GO_ZERO_TIME = "0001-01-01T00:00:00Z"
_TIME_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})"
)


def format_time(dt: datetime | None) -> str:
    """RFC 3339 in UTC like Go's RFC3339Nano (trailing fraction zeros trimmed).

    None encodes as Go's zero time. Naive datetimes are taken to be UTC (the model's convention).
    """
    if dt is None:
        return GO_ZERO_TIME
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC)
    out = f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
    if dt.microsecond:
        out += "." + f"{dt.microsecond:06d}".rstrip("0")
    return out + "Z"


def parse_time(text: Any) -> datetime | None:
    """Parse RFC 3339; None/null and the Go zero time (year 1) mean unset.

    Fractions beyond microseconds are truncated. ``""`` is an error, as in Go.
    """
    if text is None:
        return None
    if not isinstance(text, str):
        raise TimeParseError(f"time must be a string, got {type(text).__name__}")
    m = _TIME_RE.fullmatch(text)
    if m is None:
        raise TimeParseError(f"not an RFC 3339 time: {text[:40]!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    frac, zone = m.group(7), m.group(8)
    if year == 1:
        return None  # Go's zero time (possibly with an offset) = unset
    micro = int((frac or "0").ljust(6, "0")[:6])
    if zone == "Z":
        tz = UTC
    else:
        sign = 1 if zone[0] == "+" else -1
        hh, mm = int(zone[1:3]), int(zone[4:6])
        if hh > 23 or mm > 59:
            raise TimeParseError(f"bad zone offset in {text!r}")
        tz = timezone(sign * timedelta(hours=hh, minutes=mm))
    try:
        dt = datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError as e:
        raise TimeParseError(f"invalid time {text!r}: {e}") from None
    return dt.astimezone(UTC)


# ---------------------------------------------------------------------------------------------
# IDs, prefixes, JSON


def stable_node_id(node_id: int) -> str:
    """Headscale's StableID: the decimal node ID (``types.NodeID.StableID``)."""
    if not isinstance(node_id, int) or isinstance(node_id, bool) or node_id <= 0:
        raise TailcfgError(f"node ID must be a positive int, got {node_id!r}")
    return str(node_id)


def host_prefix(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """A node address as a host prefix (``100.64.0.1/32``, ``fd7a::1/128``)."""
    return f"{addr}/{addr.max_prefixlen}"


def prefix_text(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    return str(net)


_DUMPS_OPTS = orjson.OPT_NON_STR_KEYS


def dumps(obj: Any) -> bytes:
    """Compact JSON via orjson (int dict keys become decimal strings, as Go does)."""
    return orjson.dumps(obj, option=_DUMPS_OPTS)


def loads(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise RequestParseError(f"invalid JSON: {e}") from None


# ---------------------------------------------------------------------------------------------
# Requests


def _obj(body: Any, what: str) -> Mapping[str, Any]:
    if isinstance(body, bytes | bytearray | memoryview | str):
        body = loads(bytes(body) if not isinstance(body, str) else body)
    if not isinstance(body, Mapping):
        raise RequestParseError(f"{what} must be a JSON object")
    return body


def _int(d: Mapping[str, Any], key: str, default: int = 0) -> int:
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool):
        raise RequestParseError(f"{key} must be an integer")
    return v


def _bool(d: Mapping[str, Any], key: str) -> bool:
    v = d.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise RequestParseError(f"{key} must be a boolean")
    return v


def _str(d: Mapping[str, Any], key: str) -> str:
    v = d.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise RequestParseError(f"{key} must be a string")
    return v


def _dict(d: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, dict):
        raise RequestParseError(f"{key} must be an object")
    return v


def _endpoint(text: Any) -> str:
    """Validate an ``ip:port`` / ``[ipv6]:port`` string (netip.AddrPort text form)."""
    if not isinstance(text, str):
        raise RequestParseError("Endpoints entries must be strings")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise RequestParseError(f"bad endpoint {text[:60]!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        family = 6
    else:
        family = 4
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise RequestParseError(f"bad endpoint {text[:60]!r}") from None
    if addr.version != family:
        raise RequestParseError(f"bad endpoint {text[:60]!r}")
    return text


@dataclass(frozen=True)
class RegisterRequest:
    version: int
    node_key: bytes
    old_node_key: bytes | None  # None when zero (first registration)
    nl_key: bytes | None
    auth_key: str | None
    expiry: datetime | None  # None = no expiry requested; past = logout
    followup: str
    hostinfo: dict[str, Any]
    ephemeral: bool
    tailnet: str
    raw: Mapping[str, Any] = field(repr=False, compare=False)


def parse_register_request(body: Any) -> RegisterRequest:
    """Validate a ``/machine/register`` body (bytes or decoded dict)."""
    d = _obj(body, "RegisterRequest")
    try:
        node_key = parse_key(KeyKind.NODE, d.get("NodeKey"))
        if node_key == ZERO_KEY:
            raise RequestParseError("RegisterRequest.NodeKey is missing or zero")
        old = _optional_key(KeyKind.NODE, d.get("OldNodeKey"))
        nl = _optional_key(KeyKind.NL, d.get("NLKey"))
        expiry = parse_time(d.get("Expiry"))
    except KeyParseError as e:
        raise KeyParseError(f"RegisterRequest: {e}") from None
    auth = _dict(d, "Auth")
    auth_key: str | None = None
    if auth is not None:
        auth_key = _str(auth, "AuthKey") or None
    return RegisterRequest(
        version=_int(d, "Version"),
        node_key=node_key,
        old_node_key=old,
        nl_key=nl,
        auth_key=auth_key,
        expiry=expiry,
        followup=_str(d, "Followup"),
        hostinfo=_dict(d, "Hostinfo") or {},
        ephemeral=_bool(d, "Ephemeral"),
        tailnet=_str(d, "Tailnet"),
        raw=d,
    )


@dataclass(frozen=True)
class MapRequest:
    version: int
    node_key: bytes
    disco_key: bytes | None  # None when zero/absent: never overwrite a stored key with it
    compress: str
    keep_alive: bool
    stream: bool
    omit_peers: bool
    endpoints: tuple[str, ...]
    endpoint_types: tuple[int, ...]
    hostinfo: dict[str, Any] | None
    debug_flags: tuple[str, ...]
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def is_lite_update(self) -> bool:
        return not self.stream and self.omit_peers

    @property
    def preferred_derp(self) -> int:
        ni = (self.hostinfo or {}).get("NetInfo")
        v = ni.get("PreferredDERP") if isinstance(ni, dict) else None
        return v if isinstance(v, int) and not isinstance(v, bool) else 0


def parse_map_request(body: Any) -> MapRequest:
    """Validate a ``/machine/map`` body (bytes or decoded dict)."""
    d = _obj(body, "MapRequest")
    try:
        node_key = parse_key(KeyKind.NODE, d.get("NodeKey"))
        if node_key == ZERO_KEY:
            raise RequestParseError("MapRequest.NodeKey is missing or zero")
        disco = _optional_key(KeyKind.DISCO, d.get("DiscoKey"))
    except KeyParseError as e:
        raise KeyParseError(f"MapRequest: {e}") from None
    eps = d.get("Endpoints") or []
    types = d.get("EndpointTypes") or []
    flags = d.get("DebugFlags") or []
    if not isinstance(eps, list) or not isinstance(types, list) or not isinstance(flags, list):
        raise RequestParseError("Endpoints/EndpointTypes/DebugFlags must be arrays")
    if any(not isinstance(t, int) or isinstance(t, bool) for t in types):
        raise RequestParseError("EndpointTypes entries must be integers")
    if any(not isinstance(f, str) for f in flags):
        raise RequestParseError("DebugFlags entries must be strings")
    return MapRequest(
        version=_int(d, "Version"),
        node_key=node_key,
        disco_key=disco,
        compress=_str(d, "Compress"),
        keep_alive=_bool(d, "KeepAlive"),
        stream=_bool(d, "Stream"),
        omit_peers=_bool(d, "OmitPeers"),
        endpoints=tuple(_endpoint(e) for e in eps),
        endpoint_types=tuple(types),
        hostinfo=_dict(d, "Hostinfo"),
        debug_flags=tuple(flags),
        raw=d,
    )
