"""Interactive (web) registration: AuthURL, the Followup long poll, and its completion.

A client without an auth key gets `AuthURL = <server_url>/register/<hskey-authreq-...>` and then
re-sends its register request with `Followup` set, which blocks here until an admin runs
`headscale auth register --auth-id ... --user ...` (or OIDC completes it). Pending entries live
in memory and expire after `tuning.register_cache_expiration`; an expired Followup gets a new
AuthURL (returning the same one would make the client back off).

Anyone can ask for a registration, so the table is bounded (docs/limits.md): each interactive
request gets its own AuthURL (as Headscale), but one machine key holds at most `per_machine`
open ones (its oldest goes first), one source address `per_source`, and the whole table
`max_entries` / `hostinfo_budget` bytes. A full table makes room by dropping the oldest entry
nobody is waiting on; an entry whose client is waiting on its Followup is never dropped for a
newcomer, so a flood of anonymous requests cannot push out a real user's registration.

All open URLs of one machine stand for one login of that machine: whichever is completed (or
rejected) first decides it with the machine's newest request (the node key its tailscaled
now waits with), answers every Followup waiting on any of them, and closes the others. The
login is the URLs open when the decision starts: one opened while it awaits the database (a
new `tailscale up`, with a new node key) is a later login and stays open.
"""

from __future__ import annotations

import asyncio
import bisect
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
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


AuthIDs = list[str]  # named here: inside the class, `list` is its method


class UnknownAuthID(Exception):
    def __init__(self, auth_id: str) -> None:
        super().__init__(f"registration {auth_id!r} not found or expired")


class RegistrationRefused(Exception):
    """No room for another pending registration (answered with HTTP 429)."""


@dataclass
class Decision:
    """A machine's login being decided: the URLs it answers, and its end."""

    urls: frozenset[str]
    ended: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)  # one registration is itself, whatever its fields
class Pending:
    auth_id: str
    machine_key: bytes
    node_key: bytes
    # Kept encoded: the table's byte budget is then what it really holds (decoded, a large
    # Hostinfo takes several times its JSON size).
    hostinfo_json: bytes
    created: float  # time.monotonic(): this instance's expiry clock
    # Wall-clock time it was opened, the same on every instance (a mirrored row's
    # created_at): orders one machine's open registrations, oldest first.
    opened: float = 0.0
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


def refusal(reason: str) -> Callable[[asyncio.Future[Any]], None]:
    """How a refused login answers its waiters."""
    def refuse(f: asyncio.Future[Any]) -> None:
        f.set_exception(PermissionError(reason))
        f.exception()  # mark retrieved: the client may have stopped waiting
    return refuse


class PendingRegistrations:
    """A bounded, expiring map of auth IDs to the registrations waiting on them."""

    def __init__(self, expiration_s: float, max_entries: int, *, per_source: int = 16,
                 per_machine: int = 4, hostinfo_budget: int = 8 << 20, rate: float = 1.0,
                 burst: int = 20) -> None:
        self.expiration_s = expiration_s
        # Requests that create or renew an entry, per source address (Followups are free).
        self.rate = TokenBuckets(rate, burst)
        self.max_entries = max_entries
        self.per_source = per_source
        self.per_machine = per_machine
        self.hostinfo_budget = hostinfo_budget
        self._items: OrderedDict[str, Pending] = OrderedDict()
        self._by_machine: dict[bytes, list[Pending]] = {}  # oldest opened first
        self._per_source: dict[str, int] = {}
        # Machine keys whose login is being registered -> that decision.
        self._deciding: dict[bytes, Decision] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def _expire(self) -> None:
        # Not while the machine's login is being decided: the decision answers these URLs'
        # waiters (it is one database write away), and must find them to do so.
        now = time.monotonic()
        for auth_id in [a for a, p in self._items.items() if now - p.created > self.expiration_s
                        and p.machine_key not in self._deciding]:
            self._drop(auth_id)

    def _remove(self, auth_id: str) -> Pending | None:
        p = self._items.pop(auth_id, None)
        if p is None:
            return None
        mine = self._by_machine.get(p.machine_key)
        if mine is not None and p in mine:
            mine.remove(p)
            if not mine:
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

    def _room(self, closing: list[Pending], source: str, size: int) -> list[Pending]:
        """The idle entries (nobody waits on them) to evict, oldest first, so that a new
        entry of `size` bytes from `source` fits once `closing` is closed too; nothing is
        dropped here. Raises RegistrationRefused when it cannot fit."""
        gone = {p.auth_id for p in closing}
        evict: list[Pending] = []

        def pick(src: str | None) -> bool:
            # Never a URL of a login being decided: the decision answers and closes them.
            for p in self._items.values():
                if p.waiting == 0 and p.auth_id not in gone and (src is None or p.source == src) \
                        and p.machine_key not in self._deciding:
                    gone.add(p.auth_id)
                    evict.append(p)
                    return True
            return False

        # No source: a row mirrored from the instance the client asked, which already
        # charged its address (the only place it is known); the table-wide caps still hold.
        held = self._per_source.get(source, 0) - sum(p.source == source for p in closing)
        if source and held >= self.per_source and not pick(source):
            raise RegistrationRefused(
                f"too many pending registrations from {source}; "
                "complete or wait for the ones already open")
        freed = [*closing, *evict]
        entries, used = len(self._items) - len(freed), self.bytes - sum(p.size for p in freed)
        while entries >= self.max_entries or used + size > self.hostinfo_budget:
            if not pick(None):
                raise RegistrationRefused("too many pending registrations; try again later")
            entries, used = entries - 1, used - evict[-1].size
        return evict

    def add(self, auth_id: str | None = None, *, machine_key: bytes, node_key: bytes,
            hostinfo: Hostinfo, source: str = "", expiry: datetime | None = None,
            ephemeral: bool = False, capver: int = 0, opened: float | None = None) -> Pending:
        """A new pending registration with its own auth ID. `auth_id` is chosen by the caller
        only for `debug create-node`, which names the registration it makes, and, with
        `opened`, for a row mirrored from another instance. Raises RegistrationRefused when
        there is no room."""
        self._expire()
        encoded = orjson.dumps(hostinfo)
        size = len(encoded)
        # An entry of the same ID is replaced, but like everything else it closes only once
        # the new one is admitted.
        same = self._items.get(auth_id) if auth_id is not None else None
        # The machine's own oldest URL goes first, waited on or not: only the holder of the
        # machine key can ask in its name, and its tailscaled waits on the newest one.
        mine = [q for q in self._by_machine.get(machine_key, []) if q is not same]
        if opened is not None and len(mine) >= self.per_machine and opened < mine[0].opened:
            raise RegistrationRefused("replaced by newer login URLs of the same machine")
        closing = mine[: max(0, len(mine) - self.per_machine + 1)]
        if (closing and machine_key in self._deciding) or \
                (same is not None and same.machine_key in self._deciding):
            # Keep what the decision answers.
            raise RegistrationRefused("a login of this machine is being completed; try again")
        evict = self._room([*closing, *([same] if same else [])], source, size)
        # Admitted: only now does anything close, so a refusal costs nobody a URL. The
        # machine's own are discarded, not just dropped, so every instance closes them
        # (sharedreg.py).
        if same is not None:
            self._drop(same.auth_id)
        for q in closing:
            self.discard(q.auth_id)
        for q in evict:
            self._drop(q.auth_id)
        p = Pending(auth_id=auth_id or new_auth_id(), machine_key=machine_key,
                    node_key=node_key, hostinfo_json=encoded, created=time.monotonic(),
                    opened=time.time() if opened is None else opened, expiry=expiry,
                    ephemeral=ephemeral, capver=capver, source=source)
        self._items[p.auth_id] = p
        bisect.insort(self._by_machine.setdefault(machine_key, []), p, key=lambda q: q.opened)
        self._per_source[source] = self._per_source.get(source, 0) + 1
        self.bytes += size
        return p

    def newest(self, p: Pending) -> Pending:
        """The machine's newest open registration: what completing any of its URLs registers
        (each interactive login of a tailscaled brings a new node key, and it waits on the
        newest URL only)."""
        mine = self._by_machine.get(p.machine_key)
        return mine[-1] if mine else p

    @contextmanager
    def waiting(self, p: Pending) -> Iterator[None]:
        """While inside, `p`'s client is waiting on it: no newcomer may evict it."""
        p.waiting += 1
        try:
            yield
        finally:
            p.waiting -= 1

    @contextmanager
    def deciding(self, auth_id: str) -> Iterator[Pending]:
        """Hold the machine's login while it is being decided (registering awaits the
        database): meanwhile another completion of any of its URLs is refused as if already
        used, so a machine is registered once. Yields the machine's newest registration;
        completing or rejecting it closes the URLs open now, not newer ones."""
        p = self.get(auth_id)
        if p.machine_key in self._deciding:
            raise UnknownAuthID(auth_id)
        urls = frozenset(q.auth_id for q in self._by_machine.get(p.machine_key, ()))
        decision = self._deciding[p.machine_key] = Decision(urls)
        try:
            yield self.newest(p)
        finally:
            del self._deciding[p.machine_key]
            decision.ended.set()

    def is_deciding(self, p: Pending) -> bool:
        """Whether `p`'s machine's login is being decided on this instance."""
        return p.machine_key in self._deciding

    async def decided(self, p: Pending) -> None:
        """Return once no login of `p`'s machine is being decided on this instance."""
        decision = self._deciding.get(p.machine_key)
        if decision is not None:
            await decision.ended.wait()

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

    def complete(self, auth_id: str, result: Any) -> AuthIDs:
        """Decide the machine's login: every open registration of `auth_id`'s machine is
        answered with `result` and closed. Returns the auth IDs closed."""
        return self._settle(auth_id, lambda f: f.set_result(result))

    def reject(self, auth_id: str, reason: str) -> AuthIDs:
        """Refuse the machine's login: like `complete`, every waiting client is told."""
        return self._settle(auth_id, refusal(reason))

    def _settle(self, auth_id: str, answer: Callable[[asyncio.Future[Any]], None], *,
                whole_login: bool = True) -> AuthIDs:
        """Answer and close `auth_id` and (`whole_login`) every other open URL of its
        machine's login: while a decision runs, the URLs it started with, or (a newer URL
        rejected meanwhile) the ones opened since."""
        # Gone meanwhile (expired while a decision awaited the database): nothing to answer.
        p = self._items.get(auth_id)
        if p is None:
            return []
        login = list(self._by_machine.get(p.machine_key, ())) if whole_login else [p]
        decision = self._deciding.get(p.machine_key)
        if decision is not None:
            ours = auth_id in decision.urls
            login = [q for q in login if (q.auth_id in decision.urls) == ours]
        closed = []
        for q in login:
            self._remove(q.auth_id)
            closed.append(q.auth_id)
            if not q.done.done():
                answer(q.done)
        return closed
