"""Per-source connection limits for a listener, also across socket takeovers.

A connection taken over (Noise, DERP) leaves the front door, so nothing would tell a counter
when it ends. The gate therefore remembers each admitted connection's socket and counts a
source's sockets that are still open: when a source reaches its limit, its closed sockets
are swept first, and only if it is still at the limit is the newcomer refused.
"""

from __future__ import annotations

import ipaddress
from typing import Any

__all__ = ["SourceGate", "source_of"]


def source_of(ip: str) -> str:
    """The address a limit counts: the IPv4 address, or the IPv6 /64 (one host's share)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip[:64]
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
    return str(addr)


def _open(sock: Any) -> bool:
    try:
        return int(sock.fileno()) >= 0
    except (OSError, ValueError, AttributeError):
        return False


class SourceGate:
    def __init__(self, per_source: int) -> None:
        self.per_source = per_source
        self._socks: dict[str, list[Any]] = {}
        self._admitted = 0
        self.refused = 0

    def admit(self, ip: str, sock: Any) -> bool:
        """Count `sock` against `ip`'s source; False when the source is at its limit."""
        if sock is None:
            return True
        key = source_of(ip)
        held = self._socks.setdefault(key, [])
        if len(held) >= self.per_source:
            held[:] = [s for s in held if _open(s)]
        if len(held) >= self.per_source:
            self.refused += 1
            return False
        held.append(sock)
        self._admitted += 1
        if self._admitted % 1024 == 0:  # forget sources whose connections all ended
            self._sweep()
        return True

    def _sweep(self) -> None:
        for key in list(self._socks):
            held = [s for s in self._socks[key] if _open(s)]
            if held:
                self._socks[key] = held
            else:
                del self._socks[key]

    def open_count(self, ip: str) -> int:
        return sum(1 for s in self._socks.get(source_of(ip), ()) if _open(s))
