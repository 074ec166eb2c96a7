"""Interactive (web) registration: AuthURL, the Followup long poll, and its completion.

A client without an auth key gets `AuthURL = <server_url>/register/<hskey-authreq-...>` and then
re-sends its register request with `Followup` set, which blocks here until an admin runs
`headscale auth register --auth-id ... --user ...` (or OIDC completes it). Pending entries live
in memory and expire after `tuning.register_cache_expiration`; an expired Followup gets a new
AuthURL (returning the same one would make the client back off).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

AUTH_ID_PREFIX = "hskey-authreq-"


def new_auth_id() -> str:
    return AUTH_ID_PREFIX + secrets.token_hex(12)


class UnknownAuthID(Exception):
    def __init__(self, auth_id: str) -> None:
        super().__init__(f"registration {auth_id!r} not found or expired")


@dataclass
class Pending:
    auth_id: str
    machine_key: bytes
    node_key: bytes
    hostinfo: dict[str, Any]
    created: float
    expiry: datetime | None = None
    ephemeral: bool = False
    capver: int = 0
    done: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class PendingRegistrations:
    """A bounded, expiring map of auth IDs to the registrations waiting on them."""

    def __init__(self, expiration_s: float, max_entries: int) -> None:
        self.expiration_s = expiration_s
        self.max_entries = max_entries
        self._items: OrderedDict[str, Pending] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def _evict(self) -> None:
        now = time.monotonic()
        for auth_id in [a for a, p in self._items.items() if now - p.created > self.expiration_s]:
            self._drop(auth_id)
        while len(self._items) > self.max_entries:
            self._drop(next(iter(self._items)))

    def _drop(self, auth_id: str) -> None:
        p = self._items.pop(auth_id, None)
        if p is not None and not p.done.done():
            p.done.set_exception(UnknownAuthID(auth_id))
            p.done.exception()  # mark retrieved: nobody may be waiting

    def add(self, auth_id: str | None = None, **kw: Any) -> Pending:
        """A new pending registration; `auth_id` is chosen by the caller only for
        `debug create-node`, which names the registration it makes."""
        self._evict()
        p = Pending(auth_id=auth_id or new_auth_id(), created=time.monotonic(), **kw)
        self._items[p.auth_id] = p
        return p

    def discard(self, auth_id: str) -> None:
        """Forget a registration; whoever waits on it gets a fresh AuthURL."""
        self._drop(auth_id)

    def get(self, auth_id: str) -> Pending:
        self._evict()
        p = self._items.get(auth_id)
        if p is None:
            raise UnknownAuthID(auth_id)
        return p

    def list(self) -> list[Pending]:
        self._evict()
        return list(self._items.values())

    def complete(self, auth_id: str, result: Any) -> None:
        p = self.get(auth_id)
        del self._items[auth_id]
        if not p.done.done():
            p.done.set_result(result)

    def reject(self, auth_id: str, reason: str) -> None:
        p = self.get(auth_id)
        del self._items[auth_id]
        if not p.done.done():
            p.done.set_exception(PermissionError(reason))
