"""Immutable IP address sets (IPv4 and IPv6 together) as sorted, merged ranges.

Mirrors the netipx.IPSet operations Headscale's policy engine relies on, including the
exact string forms Tailscale uses on the wire: a bare address for one host, a CIDR when
the range is one prefix, and "first-last" otherwise.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable, Iterator
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# IPv6 keys live above every IPv4 key so one sorted list holds both families (v4 first,
# as netipx orders them).
_V6 = 1 << 200
_V4MAX = (1 << 32) - 1
_V6MAX = (1 << 128) - 1


def addr_key(addr: IPAddress) -> int:
    """The sort key of an address in an IPSet (usable as an `atoms` member)."""
    return _key(addr)


def _key(addr: IPAddress) -> int:
    return int(addr) if addr.version == 4 else _V6 + int(addr)


def _addr(key: int) -> IPAddress:
    if key >= _V6:
        return ipaddress.IPv6Address(key - _V6)
    return ipaddress.IPv4Address(key)


def _net_range(net: IPNetwork) -> tuple[int, int]:
    lo = _key(net.network_address)
    return lo, lo + net.num_addresses - 1


def _merge(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1 and (lo >= _V6) == (out[-1][0] >= _V6):
            if hi > out[-1][1]:
                out[-1][1] = hi
        else:
            out.append([lo, hi])
    return tuple((a, b) for a, b in out)


def _range_prefixes(lo: int, hi: int) -> Iterator[IPNetwork]:
    v6 = lo >= _V6
    base = _V6 if v6 else 0
    width = 128 if v6 else 32
    a, b = lo - base, hi - base
    while a <= b:
        # Largest aligned block starting at a that does not pass b.
        size = (a & -a).bit_length() - 1 if a else width
        while size > 0 and a + (1 << size) - 1 > b:
            size -= 1
        if v6:
            yield ipaddress.IPv6Network((a, width - size))
        else:
            yield ipaddress.IPv4Network((a, width - size))
        a += 1 << size


@lru_cache(maxsize=65536)
def _key_str(key: int) -> str:
    """str() of the address with this key; cached because ipaddress formatting (IPv6
    especially) dominates rendering a policy's node addresses over and over."""
    return str(_addr(key))


@lru_cache(maxsize=65536)
def _range_str(lo: int, hi: int) -> str:
    if lo == hi:
        return _key_str(lo)
    p = _range_as_prefix(lo, hi)
    return str(p) if p is not None else f"{_key_str(lo)}-{_key_str(hi)}"


@lru_cache(maxsize=65536)
def _range_prefix_strings(lo: int, hi: int) -> tuple[str, ...]:
    """The prefixes covering [lo, hi] as prefix_string() writes them."""
    if lo == hi:
        return (_key_str(lo),)
    return tuple(prefix_string(p) for p in _range_prefixes(lo, hi))


def _range_as_prefix(lo: int, hi: int) -> IPNetwork | None:
    n = hi - lo + 1
    if n & (n - 1) or lo % n:
        return None
    v6 = lo >= _V6
    bits = n.bit_length() - 1
    if v6:
        return ipaddress.IPv6Network((lo - _V6, 128 - bits))
    return ipaddress.IPv4Network((lo, 32 - bits))


class IPSet:
    __slots__ = ("ranges", "_los")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self.ranges: tuple[tuple[int, int], ...] = _merge(ranges)
        self._los = [r[0] for r in self.ranges]

    # construction
    @classmethod
    def of(cls, items: Iterable[IPNetwork | IPAddress]) -> IPSet:
        rs = []
        for it in items:
            if isinstance(it, ipaddress.IPv4Network | ipaddress.IPv6Network):
                rs.append(_net_range(it))
            else:
                k = _key(it)
                rs.append((k, k))
        return cls(rs)

    @classmethod
    def union(cls, sets: Iterable[IPSet | None]) -> IPSet:
        rs: list[tuple[int, int]] = []
        for s in sets:
            if s is not None:
                rs.extend(s.ranges)
        return cls(rs)

    def __or__(self, other: IPSet) -> IPSet:
        return IPSet(self.ranges + other.ranges)

    def __sub__(self, other: IPSet) -> IPSet:
        out: list[tuple[int, int]] = []
        for lo, hi in self.ranges:
            cur = lo
            for olo, ohi in other.ranges:
                if ohi < cur or olo > hi:
                    continue
                if olo > cur:
                    out.append((cur, olo - 1))
                cur = max(cur, ohi + 1)
                if cur > hi:
                    break
            if cur <= hi:
                out.append((cur, hi))
        return IPSet(out)

    # queries
    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IPSet) and self.ranges == other.ranges

    def __hash__(self) -> int:
        return hash(self.ranges)

    def __repr__(self) -> str:
        return f"IPSet({self.strings()!r})"

    def _contains_key(self, k: int) -> bool:
        i = bisect.bisect_right(self._los, k) - 1
        return i >= 0 and self.ranges[i][1] >= k

    def contains(self, addr: IPAddress) -> bool:
        return self._contains_key(_key(addr))

    def contains_any(self, addrs: Iterable[IPAddress]) -> bool:
        return any(self._contains_key(_key(a)) for a in addrs)

    def _overlaps_range(self, lo: int, hi: int) -> bool:
        i = bisect.bisect_right(self._los, hi) - 1
        return i >= 0 and self.ranges[i][1] >= lo

    def overlaps_prefix(self, net: IPNetwork) -> bool:
        return self._overlaps_range(*_net_range(net))

    def overlaps(self, other: IPSet) -> bool:
        return any(self._overlaps_range(lo, hi) for lo, hi in other.ranges)

    def contains_prefix(self, net: IPNetwork) -> bool:
        lo, hi = _net_range(net)
        i = bisect.bisect_right(self._los, lo) - 1
        return i >= 0 and self.ranges[i][1] >= hi

    def issubset(self, other: IPSet) -> bool:
        for lo, hi in self.ranges:
            i = bisect.bisect_right(other._los, lo) - 1
            if i < 0 or other.ranges[i][1] < hi:
                return False
        return True

    # renderings
    def _split(self, atoms: frozenset[int] | None) -> Iterator[tuple[int, int]]:
        """Ranges, with runs made only of `atoms` (node addresses) split into single
        addresses: the hosted plane lists node addresses one by one, never merged."""
        for lo, hi in self.ranges:
            if (
                atoms is not None
                and lo != hi
                and hi - lo < 4096
                and all(k in atoms for k in range(lo, hi + 1))
            ):
                for k in range(lo, hi + 1):
                    yield k, k
            else:
                yield lo, hi

    def strings(self, atoms: frozenset[int] | None = None) -> list[str]:
        return [_range_str(lo, hi) for lo, hi in self._split(atoms)]

    def prefix_strings(self, atoms: frozenset[int] | None = None) -> list[str]:
        """prefix_string() of every prefix in prefixes(atoms), without building networks."""
        out: list[str] = []
        for lo, hi in self._split(atoms):
            out.extend(_range_prefix_strings(lo, hi))
        return out

    def prefixes(self, atoms: frozenset[int] | None = None) -> list[IPNetwork]:
        out: list[IPNetwork] = []
        for lo, hi in self._split(atoms):
            out.extend(_range_prefixes(lo, hi))
        return out

    def range_strings(self) -> list[str]:
        """Every range as "first-last" (single addresses bare), the Internet's wire form."""
        return [
            _key_str(lo) if lo == hi else f"{_key_str(lo)}-{_key_str(hi)}"
            for lo, hi in self.ranges
        ]

    def addresses(self) -> Iterator[IPAddress]:
        for lo, hi in self.ranges:
            for k in range(lo, hi + 1):
                yield _addr(k)


def prefix_string(net: IPNetwork) -> str:
    """A prefix as Headscale writes a destination: bare address for a single host."""
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


# Sized for every node address of a large tailnet (two per node) plus the policy's own.
@lru_cache(maxsize=1 << 16)
def parse_wire(text: str) -> IPSet | None:
    """Parse a FilterRule address string ("*", CIDR, "a-b" range or address); None if bad."""
    try:
        if text == "*":
            return IPSet([(0, _V4MAX), (_V6, _V6 + _V6MAX)])
        if "/" in text:
            net = ipaddress.ip_network(text, strict=True)
            return IPSet([_net_range(net)])
        if text.count("-") == 1:
            a, b = text.split("-")
            la, lb = _key(ipaddress.ip_address(a)), _key(ipaddress.ip_address(b))
            if la > lb or (la >= _V6) != (lb >= _V6):
                return None
            return IPSet([(la, lb)])
        k = _key(ipaddress.ip_address(text))
        return IPSet([(k, k)])
    except ValueError:
        return None


CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
TAILSCALE_ULA = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")
CHROMEOS_VM = ipaddress.IPv4Network("100.115.92.0/23")
ALL_V4 = ipaddress.IPv4Network("0.0.0.0/0")
ALL_V6 = ipaddress.IPv6Network("::/0")

# "*" in a policy: the tailnet address space (CGNAT + Tailscale ULA) minus ChromeOS VMs.
WILDCARD = IPSet.of([CGNAT, TAILSCALE_ULA]) - IPSet.of([CHROMEOS_VM])

# Headscale's "the Internet": all public unicast space.
THE_INTERNET = IPSet.of([ipaddress.IPv6Network("2000::/3"), ALL_V4]) - IPSet.of(
    [
        ipaddress.IPv6Network("fc00::/7"),
        ipaddress.IPv4Network("10.0.0.0/8"),
        ipaddress.IPv4Network("172.16.0.0/12"),
        ipaddress.IPv4Network("192.168.0.0/16"),
        TAILSCALE_ULA,
        CGNAT,
        ipaddress.IPv6Network("fe80::/10"),
        ipaddress.IPv4Network("169.254.0.0/16"),
    ]
)

ALL_IPS = IPSet.of([ALL_V4, ALL_V6])


def is_exit_route(net: IPNetwork) -> bool:
    return net.prefixlen == 0
