"""Interactive (web) registration: AuthURL, the Followup long poll, and its completion.

A client without an auth key gets `AuthURL = <server_url>/register/<hskey-authreq-...>` and then
re-sends its register request with `Followup` set, which blocks here until an admin runs
`headscale auth register --auth-id ... --user ...` (or OIDC completes it). Pending entries live
in memory and expire after `tuning.register_cache_expiration`; an expired Followup gets a new
AuthURL (returning the same one would make the client back off).

Anyone can ask for a registration, so the table is bounded (docs/limits.md): one entry per
machine key (a repeated request updates it and keeps its AuthURL), at most `per_source`
entries per source address and `max_entries` / `hostinfo_budget` bytes in all. A full table
makes room by dropping the oldest entry nobody is waiting on; an entry whose client is
waiting on its Followup is never dropped for a newcomer, so a flood of anonymous requests
cannot push out a real user's registration.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from pyheadscale.hostinfo import Hostinfo
from pyheadscale.ratelimit import TokenBuckets

AUTH_ID_PREFIX = "hskey-authreq-"


def new_auth_id() -> str:
    return AUTH_ID_PREFIX + secrets.token_hex(12)


class UnknownAuthID(Exception):
    def __init__(self, auth_id: str) -> None:
        super().__init__(f"registration {auth_id!r} not found or expired")


class RegistrationRefused(Exception):
    """No room for another pending registration (answered with HTTP 429)."""


@dataclass
class Pending:
    auth_id: str
    machine_key: bytes
    node_key: bytes
    # Kept encoded: the table's byte budget is then what it really holds (decoded, a large
    # Hostinfo takes several times its JSON size).
    hostinfo_json: bytes
    created: float
    expiry: datetime | None = None
    ephemeral: bool = False
    capver: int = 0
    source: str = ""
    waiting: int = 0  # Followup requests blocked on this entry right now
    done: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def hostinfo(self) -> Hostinfo:
        return dict(orjson.loads(self.hostinfo_json))

    @property
    def size(self) -> int:
        return len(self.hostinfo_json)


class PendingRegistrations:
    """A bounded, expiring map of auth IDs to the registrations waiting on them."""

    def __init__(self, expiration_s: float, max_entries: int, *, per_source: int = 16,
                 hostinfo_budget: int = 8 << 20, rate: float = 1.0, burst: int = 20) -> None:
        self.expiration_s = expiration_s
        # Requests that create or renew an entry, per source address (Followups are free).
        self.rate = TokenBuckets(rate, burst)
        self.max_entries = max_entries
        self.per_source = per_source
        self.hostinfo_budget = hostinfo_budget
        self._items: OrderedDict[str, Pending] = OrderedDict()
        self._by_machine: dict[bytes, str] = {}
        self._per_source: dict[str, int] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def _expire(self) -> None:
        now = time.monotonic()
        for auth_id in [a for a, p in self._items.items() if now - p.created > self.expiration_s]:
            self._drop(auth_id)

    def _remove(self, auth_id: str) -> Pending | None:
        p = self._items.pop(auth_id, None)
        if p is None:
            return None
        if self._by_machine.get(p.machine_key) == auth_id:
            del self._by_machine[p.machine_key]
        n = self._per_source.get(p.source, 0) - 1
        if n > 0:
            self._per_source[p.source] = n
        else:
            self._per_source.pop(p.source, None)
        self.bytes -= p.size
        return p

    def _drop(self, auth_id: str) -> None:
        p = self._remove(auth_id)
        if p is not None and not p.done.done():
            p.done.set_exception(UnknownAuthID(auth_id))
            p.done.exception()  # mark retrieved: nobody may be waiting

    def _evict_one(self, source: str | None = None) -> bool:
        """Drop the oldest entry (of `source`, if given) that no client is waiting on."""
        for auth_id, p in self._items.items():
            if p.waiting == 0 and (source is None or p.source == source):
                self._drop(auth_id)
                return True
        return False

    def add(self, auth_id: str | None = None, *, machine_key: bytes, node_key: bytes,
            hostinfo: Hostinfo, source: str = "", expiry: datetime | None = None,
            ephemeral: bool = False, capver: int = 0) -> Pending:
        """The pending registration for this machine: its existing entry, updated, or a new
        one. `auth_id` is chosen by the caller only for `debug create-node`, which names the
        registration it makes. Raises RegistrationRefused when there is no room."""
        self._expire()
        encoded = orjson.dumps(hostinfo)
        size = len(encoded)
        known = self._by_machine.get(machine_key) if auth_id is None else None
        if known is not None:
            p = self._items[known]
            self.bytes += size - p.size
            p.node_key, p.hostinfo_json = node_key, encoded
            p.expiry, p.ephemeral, p.capver = expiry, ephemeral, capver
            return p
        # No source: a row mirrored from the instance the client asked, which already charged
        # its address (the only place it is known); the table-wide caps still hold here.
        if (source and self._per_source.get(source, 0) >= self.per_source
                and not self._evict_one(source)):
            raise RegistrationRefused(
                f"too many pending registrations from {source or 'this address'}; "
                "complete or wait for the ones already open")
        while len(self._items) >= self.max_entries or self.bytes + size > self.hostinfo_budget:
            if not self._evict_one():
                raise RegistrationRefused("too many pending registrations; try again later")
        if auth_id is not None:
            self._drop(auth_id)
        p = Pending(auth_id=auth_id or new_auth_id(), machine_key=machine_key,
                    node_key=node_key, hostinfo_json=encoded, created=time.monotonic(),
                    expiry=expiry, ephemeral=ephemeral, capver=capver, source=source)
        self._items[p.auth_id] = p
        self._by_machine[machine_key] = p.auth_id
        self._per_source[source] = self._per_source.get(source, 0) + 1
        self.bytes += size
        return p

    @contextmanager
    def waiting(self, p: Pending) -> Iterator[None]:
        """While inside, `p`'s client is waiting on it: no newcomer may evict it."""
        p.waiting += 1
        try:
            yield
        finally:
            p.waiting -= 1

    def discard(self, auth_id: str) -> None:
        """Forget a registration; whoever waits on it gets a fresh AuthURL."""
        self._drop(auth_id)

    def get(self, auth_id: str) -> Pending:
        self._expire()
        p = self._items.get(auth_id)
        if p is None:
            raise UnknownAuthID(auth_id)
        return p

    def list(self) -> list[Pending]:
        self._expire()
        return list(self._items.values())

    def complete(self, auth_id: str, result: Any) -> None:
        p = self.get(auth_id)
        self._remove(auth_id)
        if not p.done.done():
            p.done.set_result(result)

    def reject(self, auth_id: str, reason: str) -> None:
        p = self.get(auth_id)
        self._remove(auth_id)
        if not p.done.done():
            p.done.set_exception(PermissionError(reason))
            p.done.exception()  # mark retrieved: the client may have stopped waiting
