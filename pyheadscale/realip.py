"""``trusted_proxies``: the client's address behind a reverse proxy, as Headscale finds it.

Only when the TCP peer is inside one of the trusted prefixes are the proxy headers read, in
Headscale's order: ``True-Client-IP``, then ``X-Real-IP`` (each must appear once and hold one
address), then ``X-Forwarded-For`` read from the right, skipping addresses inside the trusted
prefixes (so a client cannot win by prepending a value).  From any other peer the headers
are removed before a handler sees them.  The front door resolves every request this way
(takeovers and aiohttp alike); ``/ts2021`` and ``/derp`` connections keep the address their
upgrade request resolved to.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
PROXY_HEADERS = ("true-client-ip", "x-real-ip", "x-forwarded-for")


def _addr(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address from a header item: bare, with a port, or [v6]:port."""
    v = value.strip()
    if v.startswith("["):
        v = v[1:].partition("]")[0]
    elif v.count(":") == 1:
        v = v.partition(":")[0]
    try:
        a = ipaddress.ip_address(v.partition("%")[0])
    except ValueError:
        return None
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


@dataclass(frozen=True, slots=True)
class RealIP:
    trusted: tuple[IPNetwork, ...]

    @classmethod
    def from_config(cls, prefixes: Iterable[IPNetwork]) -> RealIP:
        return cls(tuple(prefixes))

    def is_trusted(self, peer: str) -> bool:
        a = _addr(peer)
        return a is not None and any(a in net for net in self.trusted)

    def client(self, peer: str, headers: Sequence[tuple[str, str]]) -> str:
        """The client's address for a request from ``peer`` with ``headers`` (lower-case
        names); ``peer`` itself unless a trusted proxy names someone else."""
        if not self.trusted or not self.is_trusted(peer):
            return peer
        for name in ("true-client-ip", "x-real-ip"):
            values = [v for k, v in headers if k == name]
            if len(values) == 1 and "," not in values[0]:
                a = _addr(values[0])
                if a is not None:
                    return str(a)
        items = [i for k, v in headers if k == "x-forwarded-for" for i in v.split(",")]
        for item in reversed(items):
            a = _addr(item)
            if a is None:
                break  # garbage: stop rather than trust what lies left of it
            if not any(a in net for net in self.trusted):
                return str(a)
        return peer

    def strip(self, peer: str, headers: Sequence[tuple[str, str]]
              ) -> tuple[tuple[str, str], ...] | None:
        """Headers without the proxy ones when ``peer`` is not trusted; None: keep them."""
        if self.trusted and self.is_trusted(peer):
            return None
        if not any(k in PROXY_HEADERS for k, _ in headers):
            return None
        return tuple((k, v) for k, v in headers if k not in PROXY_HEADERS)
