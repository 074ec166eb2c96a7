"""Tailnet address allocation from the configured v4/v6 prefixes (Headscale `db/ip.go`).

Never handed out: the prefix's first (network) and last (broadcast) address, Tailscale's
reserved addresses (the ChromeOS VM range 100.115.92.0/23, the quad-100 service address
100.100.100.100 and its IPv6 twin fd7a:115c:a1e0::53), and anything already in use.

Strategies: "sequential" walks forward from the last address handed out; "random" starts at a
random address and walks forward, wrapping inside the prefix. Unlike Headscale, sequential
wraps once to reuse freed addresses instead of reporting exhaustion at the end of the prefix.
A per-family count of free addresses makes exhaustion an O(1) answer.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterable

from pyheadscale.state.model import IPAddress, IPNetwork

SEQUENTIAL = "sequential"
RANDOM = "random"

CHROMEOS_VM_RANGE = ipaddress.ip_network("100.115.92.0/23")
SERVICE_IP_V4 = ipaddress.ip_address("100.100.100.100")
SERVICE_IP_V6 = ipaddress.ip_address("fd7a:115c:a1e0::53")


class IPAllocationError(Exception):
    """No free address is left in a prefix."""


class _Pool:
    """One prefix: a used set of ints, a cursor and a free counter."""

    def __init__(self, prefix: IPNetwork, strategy: str) -> None:
        self.prefix = prefix
        self.strategy = strategy
        self.first = int(prefix.network_address)
        self.last = int(prefix.broadcast_address)
        self.used: set[int] = set()
        # Reserved ranges as inclusive int intervals, clipped to the prefix.
        ranges: list[tuple[int, int]] = [(self.first, self.first), (self.last, self.last)]
        for r in (CHROMEOS_VM_RANGE, ipaddress.ip_network(f"{SERVICE_IP_V4}/32"),
                  ipaddress.ip_network(f"{SERVICE_IP_V6}/128")):
            if r.version == prefix.version and r.overlaps(prefix):
                lo = max(int(r.network_address), self.first)
                hi = min(int(r.broadcast_address), self.last)
                ranges.append((lo, hi))
        self.reserved = _merge(ranges)
        reserved_count = sum(hi - lo + 1 for lo, hi in self.reserved)
        self.free = (self.last - self.first + 1) - reserved_count
        self.cursor = self.first  # last handed out (sequential); starts at the network address

    def _reserved_end(self, v: int) -> int | None:
        for lo, hi in self.reserved:
            if lo <= v <= hi:
                return hi
        return None

    def usable(self, v: int) -> bool:
        return self.first <= v <= self.last and self._reserved_end(v) is None

    def mark(self, v: int) -> bool:
        if not self.usable(v) or v in self.used:
            return False
        self.used.add(v)
        self.free -= 1
        return True

    def release(self, v: int) -> None:
        if v in self.used:
            self.used.remove(v)
            self.free += 1

    def allocate(self) -> int:
        if self.free <= 0:
            raise IPAllocationError(f"failed to allocate IP: {self.prefix} is exhausted")
        if self.strategy == RANDOM:
            v = self.first + secrets.randbelow(self.last - self.first + 1)
        else:
            v = self.cursor + 1
        # free > 0 guarantees this terminates within one lap of the prefix.
        while True:
            if v > self.last:
                v = self.first
            end = self._reserved_end(v)
            if end is not None:
                v = end + 1
                continue
            if v not in self.used:
                break
            v += 1
        self.used.add(v)
        self.free -= 1
        self.cursor = v
        return v


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(hi, out[-1][1]))
        else:
            out.append((lo, hi))
    return out


class IPAllocator:
    """Hands out one address per configured family; pure (no I/O, no clock)."""

    def __init__(
        self,
        prefix4: ipaddress.IPv4Network | str | None,
        prefix6: ipaddress.IPv6Network | str | None,
        strategy: str = SEQUENTIAL,
        used: Iterable[IPAddress | None] = (),
    ) -> None:
        strategy = (strategy or SEQUENTIAL).lower()
        if strategy not in (SEQUENTIAL, RANDOM):
            raise ValueError(f"unknown IP allocation strategy {strategy!r}")
        self.strategy = strategy
        p4 = ipaddress.ip_network(prefix4, strict=False) if prefix4 else None
        p6 = ipaddress.ip_network(prefix6, strict=False) if prefix6 else None
        if p4 is not None and p4.version != 4:
            raise ValueError(f"prefixes.v4 {p4} is not an IPv4 prefix")
        if p6 is not None and p6.version != 6:
            raise ValueError(f"prefixes.v6 {p6} is not an IPv6 prefix")
        if p4 is None and p6 is None:
            raise ValueError("at least one of prefixes.v4 and prefixes.v6 is required")
        self.v4 = _Pool(p4, strategy) if p4 is not None else None
        self.v6 = _Pool(p6, strategy) if p6 is not None else None
        for a in used:
            if a is not None:
                self.reserve(a)

    @property
    def prefix4(self) -> ipaddress.IPv4Network | None:
        return self.v4.prefix if self.v4 else None  # type: ignore[return-value]

    @property
    def prefix6(self) -> ipaddress.IPv6Network | None:
        return self.v6.prefix if self.v6 else None  # type: ignore[return-value]

    def _pool(self, addr: IPAddress) -> _Pool | None:
        return self.v4 if addr.version == 4 else self.v6

    def reserve(self, addr: IPAddress) -> bool:
        """Mark an address as in use (loaded from the DB); False if outside or reserved."""
        pool = self._pool(addr)
        return pool.mark(int(addr)) if pool is not None else False

    def release(self, *addrs: IPAddress | None) -> None:
        """Return addresses (node deleted, or a failed write rolled back)."""
        for a in addrs:
            if a is None:
                continue
            pool = self._pool(a)
            if pool is not None:
                pool.release(int(a))

    def allocate(self) -> tuple[ipaddress.IPv4Address | None, ipaddress.IPv6Address | None]:
        """One address per configured family; all-or-nothing."""
        v4 = ipaddress.IPv4Address(self.v4.allocate()) if self.v4 else None
        try:
            v6 = ipaddress.IPv6Address(self.v6.allocate()) if self.v6 else None
        except IPAllocationError:
            self.release(v4)
            raise
        return v4, v6

    def allocate_v4(self) -> ipaddress.IPv4Address | None:
        return ipaddress.IPv4Address(self.v4.allocate()) if self.v4 else None

    def allocate_v6(self) -> ipaddress.IPv6Address | None:
        return ipaddress.IPv6Address(self.v6.allocate()) if self.v6 else None

    def in_use(self, addr: IPAddress) -> bool:
        pool = self._pool(addr)
        return pool is not None and int(addr) in pool.used

    def free_count(self) -> tuple[int | None, int | None]:
        return (self.v4.free if self.v4 else None, self.v6.free if self.v6 else None)
