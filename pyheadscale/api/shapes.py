"""JSON shapes of the v1 API (protojson contract: camelCase, uint64 IDs as strings, RFC 3339
UTC times, enums by name, every field present; unset messages/timestamps are null).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from pyheadscale.auth import apikeys as ak
from pyheadscale.auth import preauthkeys as pk
from pyheadscale.state.model import TAGGED_DEVICES_USER_ID, ApiKey, Node, PreAuthKey, User
from pyheadscale.tailcfg import KeyKind, encode_key

ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)
ZERO_TIME_TEXT = "0001-01-01T00:00:00Z"
EXIT_ROUTES = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))

REGISTER_METHODS = {"authkey": "REGISTER_METHOD_AUTH_KEY", "cli": "REGISTER_METHOD_CLI",
                    "oidc": "REGISTER_METHOD_OIDC"}

# Headscale's types.TaggedDevices: how `ListNodes` presents the owner of a tagged node.
TAGGED_DEVICES_USER = User(id=TAGGED_DEVICES_USER_ID, name="tagged-devices",
                           display_name="Tagged Devices", created_at=None)

_RFC3339 = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d+))?([Zz]|[+-]\d\d:\d\d)$")


def ts(dt: datetime | None) -> str:
    """RFC 3339 in UTC with 'Z' and 0, 3 or 6 fraction digits (as protojson); None -> zero."""
    if dt is None:
        return ZERO_TIME_TEXT
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    dt = dt.astimezone(UTC)
    base = f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:" \
           f"{dt.second:02d}"
    us = dt.microsecond
    if us == 0:
        return base + "Z"
    if us % 1000 == 0:
        return f"{base}.{us // 1000:03d}Z"
    return f"{base}.{us:06d}Z"


def ts_or_null(dt: datetime | None) -> str | None:
    return None if dt is None else ts(dt)


def parse_ts(text: str) -> datetime:
    """Parse an RFC 3339 timestamp (any fraction length, Z or offset) to aware UTC."""
    m = _RFC3339.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"parsing time {text!r} as RFC 3339: invalid format")
    y, mo, d, h, mi, s, frac, tz = m.groups()
    us = int((frac or "0")[:6].ljust(6, "0"))
    if tz in ("Z", "z"):
        off = "+00:00"
    else:
        off = tz
    try:
        dt = datetime.fromisoformat(f"{y}-{mo}-{d}T{h}:{mi}:{s}.{us:06d}{off}")
    except ValueError as e:
        raise ValueError(f"parsing time {text!r} as RFC 3339: {e}") from None
    return dt.astimezone(UTC)


def user(u: User) -> dict[str, Any]:
    return {
        "id": str(u.id),
        "name": u.name,
        "createdAt": ts(u.created_at),
        "displayName": u.display_name,
        "email": u.email,
        "providerId": u.provider_identifier or "",
        "provider": u.provider,
        "profilePicUrl": u.profile_pic_url,
    }


def _pak_user(k: PreAuthKey, users: dict[int, User]) -> dict[str, Any] | None:
    if k.user_id is None:
        return None
    u = users.get(k.user_id)
    return user(u) if u is not None else None


def masked_preauth_key(k: PreAuthKey) -> str:
    # Legacy plaintext keys are shown whole, as Headscale does.
    if k.prefix:
        return pk.masked(k)
    return k.legacy_key or ""


def preauth_key(k: PreAuthKey, users: dict[int, User], *, full_key: str | None = None
                ) -> dict[str, Any]:
    """Standalone PreAuthKey (the /preauthkey endpoints): times are never null."""
    return {
        "user": _pak_user(k, users),
        "id": str(k.id),
        "key": full_key if full_key is not None else masked_preauth_key(k),
        "reusable": k.reusable,
        "ephemeral": k.ephemeral,
        "used": k.used,
        "expiration": ts(k.expiration),
        "createdAt": ts(k.created_at),
        "aclTags": list(k.tags),
    }


def node_preauth_key(k: PreAuthKey, users: dict[int, User]) -> dict[str, Any]:
    """PreAuthKey embedded in a Node: unset times are null."""
    d = preauth_key(k, users)
    d["expiration"] = ts_or_null(k.expiration)
    d["createdAt"] = ts_or_null(k.created_at)
    return d


def api_key(a: ApiKey) -> dict[str, Any]:
    return {
        "id": str(a.id),
        "prefix": ak.display(a.prefix),
        "expiration": ts_or_null(a.expiration),
        "createdAt": ts_or_null(a.created_at),
        "lastSeen": ts_or_null(a.last_seen),
    }


def routes_text(routes: Iterable[Any]) -> list[str]:
    return [str(r) for r in routes]


def exit_routes(n: Node) -> list[Any]:
    """Announced exit routes that are approved (Headscale Node.ExitRoutes)."""
    approved = set(n.approved_routes)
    return [r for r in n.announced_routes if r in EXIT_ROUTES and r in approved]


def node(n: Node, users: dict[int, User], paks: dict[int, PreAuthKey], *,
         subnet_routes: Sequence[Any] = (), tagged_as_user: bool = False) -> dict[str, Any]:
    owner: dict[str, Any] | None = None
    if n.user_id is not None and n.user_id in users and not n.is_tagged:
        owner = user(users[n.user_id])
    elif n.is_tagged and tagged_as_user:
        owner = user(TAGGED_DEVICES_USER)
    pak = paks.get(n.auth_key_id) if n.auth_key_id is not None else None
    return {
        "id": str(n.id),
        "machineKey": encode_key(KeyKind.MACHINE, n.machine_key),
        "nodeKey": encode_key(KeyKind.NODE, n.node_key),
        "discoKey": encode_key(KeyKind.DISCO, n.disco_key),
        "ipAddresses": [str(a) for a in n.addresses],
        "name": n.hostname,
        "user": owner,
        "lastSeen": ts_or_null(n.last_seen),
        "expiry": ts_or_null(n.expiry),
        "preAuthKey": node_preauth_key(pak, users) if pak is not None else None,
        "createdAt": ts(n.created_at),
        "registerMethod": REGISTER_METHODS.get(n.register_method, "REGISTER_METHOD_UNSPECIFIED"),
        "givenName": n.given_name,
        "online": n.online,
        "approvedRoutes": routes_text(n.approved_routes),
        "availableRoutes": routes_text(n.announced_routes),
        "subnetRoutes": routes_text(subnet_routes),
        "tags": list(n.tags),
    }
