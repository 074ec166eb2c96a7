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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from enum import Enum
from typing import Any

import orjson

from pyheadscale.gojson import ABSENT, Bool, Bytes, DecodeError, GoType, Int, List, Ptr, Str, Struct
from pyheadscale.hostinfo import ADDRPORT, HOSTINFO_PTR, Hostinfo

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
    """Compact JSON via orjson (int dict keys become decimal strings, as Go does).

    orjson hands back its whole write buffer, sized from a guess and never shrunk: a 600-byte
    peer entry holds 4-8 KiB, 4 KiB of JSON up to 250 KiB. Much of what is encoded here is
    kept (the peer-entry cache, shared filter lists, recent frames), so the result is copied
    to its length; the copy costs a fraction of the encoding.
    """
    return bytes(memoryview(orjson.dumps(obj, option=_DUMPS_OPTS)))


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


class _ParsedText(GoType):
    """A field decoded from bounded text by `parse` (None for the zero value); null and zero
    leave it unset. A refusal keeps the parser's own error type, with the path in front."""

    what = ""
    max_len = 0
    error: type[TailcfgError] = TailcfgError

    def parse(self, value: Any) -> Any:
        raise NotImplementedError

    def decode(self, value: Any, path: str, lenient: bool) -> Any:
        if value is None:
            return ABSENT
        if isinstance(value, str) and len(value) > self.max_len:
            raise self.error(f"{path}: {self.what} text too long")
        try:
            out = self.parse(value)
        except self.error as e:
            raise self.error(f"{path}: {e}") from None
        return ABSENT if out is None else out


class _Key(_ParsedText):
    """A key.*Public field: text ``prefix:<64 hex>``, null = zero; decodes to raw bytes."""

    what, max_len, error = "key", 128, KeyParseError

    def __init__(self, kind: KeyKind) -> None:
        self.kind = kind

    def parse(self, value: Any) -> bytes | None:
        raw = parse_key(self.kind, value)
        return None if raw == ZERO_KEY else raw


class _Time(_ParsedText):
    """time.Time: an RFC 3339 string; null leaves it unset."""

    what, max_len, error = "time", 64, TimeParseError

    def parse(self, value: Any) -> datetime | None:
        return parse_time(value)


MAX_ENDPOINTS = 128
MAX_DEBUG_FLAGS = 32
_TIME = _Time()

_REGISTER_REQUEST = Struct("tailcfg.RegisterRequest", {
    "Version": Int(),
    "NodeKey": _Key(KeyKind.NODE),
    "OldNodeKey": _Key(KeyKind.NODE),
    "NLKey": _Key(KeyKind.NL),
    "Auth": Ptr(Struct("tailcfg.RegisterResponseAuth", {
        "Oauth2Token": Ptr(Struct("tailcfg.Oauth2Token", {
            "access_token": Str(4096), "token_type": Str(64), "refresh_token": Str(4096),
            "expiry": _TIME,
        })),
        "AuthKey": Str(512),
    })),
    "Expiry": _TIME,
    "Followup": Str(2048),
    "Hostinfo": HOSTINFO_PTR,
    "Ephemeral": Bool,
    "NodeKeySignature": Bytes(4096),
    "SignatureType": Int(),
    "Timestamp": _TIME,
    "DeviceCert": Bytes(16384),
    "Signature": Bytes(4096),
    "Tailnet": Str(256),
})

_MAP_REQUEST = Struct("tailcfg.MapRequest", {
    "Version": Int(),
    "Compress": Str(16),
    "KeepAlive": Bool,
    "NodeKey": _Key(KeyKind.NODE),
    "DiscoKey": _Key(KeyKind.DISCO),
    "HardwareAttestationKey": Str(512),
    "HardwareAttestationKeySignature": Bytes(1024),
    "HardwareAttestationKeySignatureTimestamp": _TIME,
    "Stream": Bool,
    "Hostinfo": HOSTINFO_PTR,
    "MapSessionHandle": Str(256),
    "MapSessionSeq": Int(),
    "Endpoints": List(ADDRPORT, MAX_ENDPOINTS),
    "EndpointTypes": List(Int(), MAX_ENDPOINTS),
    "TKAHead": Str(512),
    "ReadOnly": Bool,
    "OmitPeers": Bool,
    "DebugFlags": List(Str(64), MAX_DEBUG_FLAGS),
    "ConnectionHandleForTest": Str(256),
})


def _decode(schema: Struct, body: Any) -> dict[str, Any]:
    d = _obj(body, schema.name.removeprefix("tailcfg."))
    try:
        return schema.decode_object(d, schema.name.removeprefix("tailcfg."), lenient=False)
    except (KeyParseError, TimeParseError):
        raise
    except DecodeError as e:
        raise RequestParseError(str(e)) from None


@dataclass(frozen=True)
class RegisterRequest:
    version: int
    node_key: bytes
    old_node_key: bytes | None  # None when zero (first registration)
    nl_key: bytes | None
    auth_key: str | None
    expiry: datetime | None  # None = no expiry requested; past = logout
    followup: str
    hostinfo: Hostinfo  # decoded and capped (pyheadscale.hostinfo)
    ephemeral: bool
    tailnet: str


def parse_register_request(body: Any) -> RegisterRequest:
    """Decode a ``/machine/register`` body (bytes or decoded dict) as Go would, with caps."""
    d = _decode(_REGISTER_REQUEST, body)
    node_key = d.get("NodeKey")
    if node_key is None:
        raise RequestParseError("RegisterRequest.NodeKey is missing or zero")
    auth = d.get("Auth") or {}
    return RegisterRequest(
        version=d.get("Version", 0),
        node_key=node_key,
        old_node_key=d.get("OldNodeKey"),
        nl_key=d.get("NLKey"),
        auth_key=auth.get("AuthKey") or None,
        expiry=d.get("Expiry"),
        followup=d.get("Followup", ""),
        hostinfo=d.get("Hostinfo") or {},
        ephemeral=d.get("Ephemeral", False),
        tailnet=d.get("Tailnet", ""),
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
    endpoints: tuple[str, ...]  # canonical netip.AddrPort text
    endpoint_types: tuple[int, ...]
    hostinfo: Hostinfo | None  # None when the client sent none (keep the stored one)
    debug_flags: tuple[str, ...]

    @property
    def is_lite_update(self) -> bool:
        return not self.stream and self.omit_peers

    @property
    def preferred_derp(self) -> int:
        ni = (self.hostinfo or {}).get("NetInfo") or {}
        v = ni.get("PreferredDERP", 0)
        return v if isinstance(v, int) else 0


def parse_map_request(body: Any) -> MapRequest:
    """Decode a ``/machine/map`` body (bytes or decoded dict) as Go would, with caps."""
    d = _decode(_MAP_REQUEST, body)
    node_key = d.get("NodeKey")
    if node_key is None:
        raise RequestParseError("MapRequest.NodeKey is missing or zero")
    return MapRequest(
        version=d.get("Version", 0),
        node_key=node_key,
        disco_key=d.get("DiscoKey"),
        compress=d.get("Compress", ""),
        keep_alive=d.get("KeepAlive", False),
        stream=d.get("Stream", False),
        omit_peers=d.get("OmitPeers", False),
        endpoints=tuple(d.get("Endpoints", ())),
        endpoint_types=tuple(d.get("EndpointTypes", ())),
        hostinfo=d.get("Hostinfo"),
        debug_flags=tuple(d.get("DebugFlags", ())),
    )
