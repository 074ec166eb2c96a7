"""Token buckets per source address, for work anonymous peers can make the server do.

Keys are source addresses (IPv6 grouped by /64, as one host usually holds a whole /64). The
table of buckets is bounded: past `max_keys`, the least recently used bucket is forgotten
(a forgotten source starts again with a full bucket, which only errs on the generous side).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from derp.gate import source_of

__all__ = ["TokenBuckets", "source_key"]


def source_key(remote: str | None) -> str:
    """The rate-limit and quota key of a peer address: the IPv4 address or the IPv6 /64."""
    return source_of(remote) if remote else ""


class TokenBuckets:
    def __init__(self, rate: float, burst: int, *, max_keys: int = 65536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, time

    def allow(self, key: str, cost: float = 1.0) -> bool:
        """Take `cost` tokens from `key`'s bucket if it has them."""
        now = self._clock()
        tokens, then = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        ok = tokens >= cost
        if ok:
            tokens -= cost
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return ok

    def __len__(self) -> int:
        return len(self._buckets)
