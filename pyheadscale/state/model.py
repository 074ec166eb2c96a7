"""The in-memory tailnet model: what state/ owns and mapper/ and policy/ read.

Keys are kept as raw 32-byte values; their wire text forms ("nodekey:<hex>", ...) are made by
pyheadscale.tailcfg. Times are timezone-aware UTC datetimes; None means unset.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import datetime

from pyheadscale.hostinfo import Hostinfo

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

TAGGED_DEVICES_USER_ID = 2147455555  # Headscale's fixed user ID for "tagged-devices" profiles


@dataclass
class User:
    id: int
    name: str
    display_name: str = ""
    email: str = ""
    provider_identifier: str | None = None
    provider: str = ""
    profile_pic_url: str = ""
    created_at: datetime | None = None
    # IdP groups (from OIDC), usable in policy as group:<name>.
    groups: tuple[str, ...] = ()


@dataclass
class PreAuthKey:
    id: int
    prefix: str  # public part of "hskey-auth-<prefix>-<secret>"
    hash: bytes | None  # bcrypt hash of the secret; None for legacy plaintext keys
    legacy_key: str | None  # the whole key for legacy plaintext keys
    user_id: int | None  # None for tag-only keys
    reusable: bool
    ephemeral: bool
    used: bool
    tags: tuple[str, ...]
    created_at: datetime
    expiration: datetime | None
    description: str = ""  # a label set through the v2 API
    revoked: datetime | None = None  # a v2 DELETE soft-revokes: kept, listed as invalid


@dataclass
class Node:
    id: int
    machine_key: bytes
    node_key: bytes
    disco_key: bytes | None
    hostname: str  # what the client reported (Hostinfo.Hostname)
    given_name: str  # unique DNS label used in MagicDNS (Node.Name = given_name.base_domain.)
    user_id: int | None  # None for tagged nodes (they belong to no user)
    ipv4: ipaddress.IPv4Address | None
    ipv6: ipaddress.IPv6Address | None
    register_method: str  # "authkey" | "cli" | "oidc"
    created_at: datetime
    updated_at: datetime
    tags: tuple[str, ...] = ()
    auth_key_id: int | None = None
    expiry: datetime | None = None
    last_seen: datetime | None = None
    endpoints: tuple[str, ...] = ()
    hostinfo: Hostinfo = field(default_factory=dict)  # decoded and capped (hostinfo.py)
    approved_routes: tuple[IPNetwork, ...] = ()
    ephemeral: bool = False
    # Live state, never persisted:
    online: bool = False
    capver: int = 0
    # Bumped on every change of anything a peer can see; mapper caches per (id, version).
    version: int = 0

    @property
    def addresses(self) -> list[IPAddress]:
        return [a for a in (self.ipv4, self.ipv6) if a is not None]

    @property
    def is_tagged(self) -> bool:
        return bool(self.tags)

    @property
    def announced_routes(self) -> tuple[IPNetwork, ...]:
        out = []
        for r in self.hostinfo.get("RoutableIPs") or ():
            try:
                out.append(ipaddress.ip_network(r, strict=False))
            except ValueError:
                continue
        return tuple(out)

    def is_expired(self, now: datetime) -> bool:
        return self.expiry is not None and self.expiry <= now


@dataclass
class ApiKey:
    id: int
    prefix: str  # "hskey-api-<prefix>-<secret>" (12 chars) or a 7-char legacy prefix
    hash: bytes  # bcrypt hash of the secret
    created_at: datetime
    expiration: datetime | None = None
    last_seen: datetime | None = None
    user_id: int | None = None  # the user it acts for (v2 creates untagged auth keys for it)

    def is_expired(self, now: datetime) -> bool:
        return self.expiration is not None and self.expiration < now
