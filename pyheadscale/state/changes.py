"""The change bus: state/ publishes what changed; each map poll subscribes and gets batches.

A `Change` says what a MapResponse must reflect (the mapper decides how): a `ChangeKind`, the
node (or user) it is about and, for node changes, which `Field`s changed. Each node has at most
one subscription; a newer one replaces the older (whose iterator ends). Changes are coalesced
over a batching window. A subscriber that falls behind never blocks the publisher or other
subscribers: its bounded buffer collapses to a single FULL change when it overflows.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

DEFAULT_BATCH_DELAY = 0.1  # seconds (tuning.batch_change_delay); Headscale waits 800 ms
DEFAULT_BUFFER = 1024
SESSIONS_PER_DELAY = 250


class ChangeKind(enum.Enum):
    NODE_ADDED = "node_added"
    NODE_CHANGED = "node_changed"  # peer-visible node fields changed: resend the peer entry
    NODE_PATCH = "node_patch"  # only PATCH_FIELDS changed: peers get a PeerChange
    NODE_REMOVED = "node_removed"
    NODE_ONLINE = "node_online"  # online/offline flip, fields={ONLINE} or {OFFLINE}
    NODE_KEY_EXPIRY = "node_key_expiry"  # an expiry set, disabled or reached
    SELF = "self"  # only the node itself must see a new self entry
    POLICY = "policy"
    DNS = "dns"
    DERP = "derp"
    USER = "user"  # a user was added, changed or removed (Change.user_id says which)
    FULL = "full"

    # Members are singletons compared by identity, so identity hashing is correct; Enum's own
    # __hash__ is Python code, and the mapper hashes kinds and fields for every viewer.
    __hash__ = object.__hash__


class Field(enum.Enum):
    """What about a node changed: the one vocabulary state/ publishes and mapper/ reads."""

    ENDPOINTS = "endpoints"
    DISCO_KEY = "disco_key"
    HOME_DERP = "home_derp"  # Hostinfo.NetInfo.PreferredDERP
    NODE_KEY = "node_key"
    EXPIRY = "expiry"
    ONLINE = "online"  # came online (NODE_ONLINE); in a PeerChange: the Online flag
    OFFLINE = "offline"  # went offline (NODE_ONLINE)
    LAST_SEEN = "last_seen"
    HOSTINFO = "hostinfo"  # Hostinfo besides Hostname, RoutableIPs and the preferred DERP
    HOSTNAME = "hostname"
    GIVEN_NAME = "given_name"
    ROUTES = "routes"  # announced routes (Hostinfo.RoutableIPs)
    APPROVED_ROUTES = "approved_routes"
    PRIMARY_ROUTES = "primary_routes"  # the routes this node serves as elected primary
    TAGS = "tags"
    USER = "user"  # the owning user
    ADDRESSES = "addresses"
    PING = "ping"  # a server message (PingRequest) waits for the node's next frame

    __hash__ = object.__hash__  # as ChangeKind's


# What a tailcfg.PeerChange can carry: a change of only these is a NODE_PATCH.
PATCH_FIELDS = frozenset({Field.ENDPOINTS, Field.DISCO_KEY, Field.HOME_DERP, Field.NODE_KEY,
                          Field.EXPIRY, Field.ONLINE, Field.LAST_SEEN})
# Changes of the viewer itself that can alter what it may see or receive (visibility,
# packet filter, SSH policy).
IDENTITY_FIELDS = frozenset({Field.TAGS, Field.USER, Field.ADDRESSES, Field.APPROVED_ROUTES})


@dataclass(frozen=True)
class Change:
    kind: ChangeKind
    node_id: int | None = None  # the node the change is about
    fields: frozenset[Field] = field(default_factory=frozenset)  # empty: not known
    # When set, only this node's subscription receives the change (self-only updates).
    target: int | None = None
    user_id: int | None = None  # the user a USER change is about

    @classmethod
    def full(cls) -> Change:
        return cls(ChangeKind.FULL)

    def merge_key(self) -> tuple[ChangeKind, int | None, int | None, int | None]:
        return (self.kind, self.node_id, self.target, self.user_id)


def coalesce(changes: Iterable[Change]) -> list[Change]:
    """Merge repeats of the same (kind, node, target, user) by uniting their fields; keep
    order. A FULL anywhere in the batch subsumes everything else.
    """
    merged: dict[tuple[ChangeKind, int | None, int | None, int | None], Change] = {}
    for c in changes:
        if c.kind is ChangeKind.FULL:
            return [Change.full()]
        k = c.merge_key()
        prev = merged.get(k)
        if prev is None:
            merged[k] = c
        elif not c.fields <= prev.fields:
            merged[k] = Change(c.kind, c.node_id, prev.fields | c.fields, c.target, c.user_id)
    return list(merged.values())


class Subscription:
    """One node's feed. `async for batch in sub` yields coalesced lists of changes."""

    def __init__(self, bus: ChangeBus, node_id: int, max_buffer: int) -> None:
        self.bus = bus
        self.node_id = node_id
        self._max = max_buffer
        self._buf: list[Change] = []
        self._overflowed = False
        self._event = asyncio.Event()
        self.closed = False
        self.overflows = 0
        # When the oldest change of the pending (then of the last returned) batch arrived:
        # the start of its change-to-delivery latency.
        self._first_at = 0.0
        self.batch_since = 0.0

    def _push(self, change: Change) -> None:
        if self.closed or self._overflowed:
            return  # a pending FULL already covers it
        if not self._buf:
            self._first_at = time.monotonic()
        if len(self._buf) >= self._max:
            self._buf = [Change.full()]
            self._overflowed = True
            self.overflows += 1
        else:
            self._buf.append(change)
        self._event.set()

    def pending(self) -> int:
        return len(self._buf)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._buf = []
            self._event.set()
            self.bus._unsubscribe(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> list[Change]:
        while not self._buf:
            if self.closed:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()
        if self.closed:
            raise StopAsyncIteration
        delay = self.bus.window()
        if delay > 0 and not self._overflowed:
            # The window opens with the first change: later ones ride along.
            await asyncio.sleep(delay)
            if self.closed:
                raise StopAsyncIteration
        batch, self._buf, self._overflowed = self._buf, [], False
        self.batch_since = self._first_at
        self._event.clear()
        return coalesce(batch)


class ChangeBus:
    def __init__(self, batch_delay: float = DEFAULT_BATCH_DELAY,
                 max_buffer: int = DEFAULT_BUFFER) -> None:
        self.batch_delay = batch_delay
        self.max_buffer = max_buffer
        self._subs: dict[int, Subscription] = {}
        self.published = 0
        self.opened = 0  # subscriptions ever made: one per streaming map session

    def window(self) -> float:
        """How long a batch collects. The configured delay, widened by one more delay per
        SESSIONS_PER_DELAY sessions: each change reaches every session, so during a storm
        (many nodes joining) frames grow with sessions x windows and a wider window keeps
        that linear. A quiet tailnet of a few hundred nodes keeps the configured delay."""
        return self.batch_delay * (1 + len(self._subs) // SESSIONS_PER_DELAY)

    def subscribe(self, node_id: int) -> Subscription:
        self.opened += 1
        old = self._subs.get(node_id)
        sub = Subscription(self, node_id, self.max_buffer)
        self._subs[node_id] = sub
        if old is not None:
            old.close()
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.get(sub.node_id) is sub:
            del self._subs[sub.node_id]

    def subscribed(self, node_id: int) -> bool:
        return node_id in self._subs

    def subscribers(self) -> list[int]:
        return list(self._subs)

    def publish(self, *changes: Change) -> None:
        """Never blocks: each subscriber's buffer takes the change or collapses to FULL."""
        for change in changes:
            self.published += 1
            if change.target is not None:
                sub = self._subs.get(change.target)
                if sub is not None:
                    sub._push(change)
                continue
            for sub in list(self._subs.values()):
                sub._push(change)

    def close(self) -> None:
        for sub in list(self._subs.values()):
            sub.close()
