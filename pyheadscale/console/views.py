"""Plain values the templates show: nodes, users and keys as rows, times as text."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from pyheadscale.api.shapes import EXIT_ROUTES
from pyheadscale.auth import preauthkeys as pk
from pyheadscale.state.model import IPNetwork, Node, PreAuthKey, User


def when(dt: datetime | None, now: datetime | None = None) -> str:
    """A time as people read it in a table: "3 min ago", "in 2 days", or "never"."""
    if dt is None:
        return "never"
    now = now or datetime.now(UTC)
    delta = (dt - now).total_seconds()
    ago = delta < 0
    s = abs(delta)
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            n = int(s // size)
            text = f"{n} {unit}{'s' if unit == 'day' and n != 1 else ''}"
            return f"{text} ago" if ago else f"in {text}"
    return "just now" if ago else "in under a minute"


def iso(dt: datetime | None) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if dt is not None else ""


def user_label(u: User) -> str:
    return u.name or u.display_name or u.email or f"user {u.id}"


@dataclass(frozen=True)
class RouteRow:
    prefix: str
    announced: bool
    approved: bool
    serving: bool  # the primary (or an exit route that is approved)


@dataclass(frozen=True)
class NodeRow:
    id: int
    name: str
    hostname: str
    owner: str  # user name, or "tagged"
    user_id: int | None
    tags: tuple[str, ...]
    addresses: tuple[str, ...]
    os: str
    os_version: str
    client_version: str
    online: bool
    last_seen: str
    last_seen_iso: str
    expiry: str
    expiry_iso: str
    expired: bool
    key_expiry_disabled: bool
    routes: tuple[RouteRow, ...]
    exit_announced: bool
    exit_approved: bool
    ephemeral: bool
    created: str
    register_method: str
    machine_key_short: str

    @property
    def status(self) -> str:
        return "expired" if self.expired else ("online" if self.online else "offline")

    @property
    def subnet_routes(self) -> tuple[RouteRow, ...]:
        return tuple(r for r in self.routes if r.prefix not in _EXIT_TEXT)

    @property
    def pending_routes(self) -> int:
        return sum(1 for r in self.routes if r.announced and not r.approved)


_EXIT_TEXT = {str(r) for r in EXIT_ROUTES}


def node_row(n: Node, users: dict[int, User], primary: Callable[[int], Iterable[IPNetwork]],
             now: datetime) -> NodeRow:
    hi = n.hostinfo if isinstance(n.hostinfo, dict) else {}
    announced = set(n.announced_routes)
    approved = set(n.approved_routes)
    serving = set(primary(n.id))
    prefixes = sorted(announced | approved, key=lambda r: (r.version, r))
    routes = tuple(RouteRow(str(r), r in announced, r in approved,
                            r in serving or (r in EXIT_ROUTES and r in approved and r in announced))
                   for r in prefixes)
    exit_ann = any(r in announced for r in EXIT_ROUTES)
    exit_app = all(r in approved for r in EXIT_ROUTES if r in announced) and exit_ann
    owner = "tagged" if n.is_tagged else (
        user_label(users[n.user_id]) if n.user_id is not None and n.user_id in users else "")
    return NodeRow(
        id=n.id, name=n.given_name, hostname=n.hostname, owner=owner,
        user_id=None if n.is_tagged else n.user_id, tags=n.tags,
        addresses=tuple(str(a) for a in n.addresses), os=_text(hi.get("OS")),
        os_version=_text(hi.get("OSVersion")), client_version=_text(hi.get("IPNVersion")),
        online=n.online, last_seen="now" if n.online else when(n.last_seen, now),
        last_seen_iso=iso(n.last_seen), expiry=when(n.expiry, now), expiry_iso=iso(n.expiry),
        expired=n.is_expired(now), key_expiry_disabled=n.expiry is None, routes=routes,
        exit_announced=exit_ann, exit_approved=exit_app, ephemeral=n.ephemeral,
        created=iso(n.created_at), register_method=n.register_method,
        machine_key_short=n.machine_key.hex()[:16])


def _text(v: object) -> str:
    return v[:200] if isinstance(v, str) else ""


def matches(row: NodeRow, q: str) -> bool:
    """Free-text search over name, host name, owner, addresses, tags, OS and version."""
    q = q.strip().lower()
    if not q:
        return True
    hay = [row.name, row.hostname, row.owner, row.os, row.client_version, *row.addresses,
           *row.tags]
    return any(q in h.lower() for h in hay)


@dataclass(frozen=True)
class KeyRow:
    id: int
    masked: str
    user: str
    reusable: bool
    ephemeral: bool
    used: bool
    tags: tuple[str, ...]
    created: str
    expiration: str
    valid: bool


def key_row(k: PreAuthKey, users: dict[int, User], now: datetime) -> KeyRow:
    expired = k.expiration is not None and k.expiration <= now
    valid = not expired and k.revoked is None and (k.reusable or not k.used)
    owner = user_label(users[k.user_id]) if k.user_id in users else (
        "tags only" if k.user_id is None else f"user {k.user_id}")
    return KeyRow(id=k.id, masked=pk.masked(k) if k.prefix else "(legacy key)", user=owner,
                  reusable=k.reusable, ephemeral=k.ephemeral, used=k.used, tags=k.tags,
                  created=iso(k.created_at), expiration=when(k.expiration, now), valid=valid)


def parse_routes(values: Iterable[str]) -> list[str]:
    """Route checkbox values back to prefixes ("exit" stands for both exit routes)."""
    out: list[str] = []
    for v in values:
        if v == "exit":
            out.extend(str(r) for r in EXIT_ROUTES)
        else:
            out.append(v)
    return out


def parse_tags(text: str) -> list[str]:
    """A tags field: names separated by commas and/or white space."""
    return text.replace(",", " ").split()


def is_prefix(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return "/" in text
