"""Short-lived per-login state: the bounded, expiring stores behind the callback and the
confirmation page, and the cookie names that carry state and nonce."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

    from pyheadscale.auth.oidc.claims import Claims

# A login that is not a node registration (the admin console's sign-in) finishes here with
# the verified claims instead of registering a node.
FinishLogin = Callable[["web.Request", "Claims"], Awaitable["web.Response"]]

COOKIE_PREFIX_LEN = 6  # leading characters of state/nonce spliced into their cookie names


@dataclass
class LoginInfo:
    auth_id: str  # "" for a login that `finish` completes
    nonce: str
    verifier: str | None
    created: float = field(default_factory=time.monotonic)
    finish: FinishLogin | None = None


@dataclass
class PendingConfirmation:
    user_id: int
    expiry: datetime | None
    csrf: str


class Expiring(OrderedDict[str, Any]):
    """A bounded map whose entries expire (unauthenticated GETs create entries)."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        super().__init__()
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._at: dict[str, float] = {}

    def put(self, key: str, value: Any) -> None:
        self.sweep()
        self[key] = value
        self._at[key] = time.monotonic()
        while len(self) > self.max_entries:
            old, _ = self.popitem(last=False)
            self._at.pop(old, None)

    def peek(self, key: str) -> Any:
        self.sweep()
        return self.get(key)

    def take(self, key: str) -> Any:
        self.sweep()
        self._at.pop(key, None)
        return self.pop(key, None)

    def sweep(self) -> None:
        now = time.monotonic()
        for k in [k for k, t in self._at.items() if now - t > self.ttl_s]:
            self.pop(k, None)
            self._at.pop(k, None)


def cookie_name(base: str, value: str) -> str:
    return f"{base}_{value[:COOKIE_PREFIX_LEN]}"
