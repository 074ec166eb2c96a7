"""The change bus: state/ publishes what changed; each map poll subscribes and gets batches.

A `Change` says what a MapResponse must reflect (the mapper decides how): a `ChangeKind`, the
node (or user) it is about and, for node changes, which `Field`s changed. Each node has at most
one subscription; a newer one replaces the older (whose iterator ends).

Changes are coalesced over one batching window for the whole bus: it opens with the first
change and, when it closes, every subscriber is handed the same batch (the same list object,
so the mapper can build and encode a delta once for all viewers that are in the same
situation). In a storm (changes keep coming while sessions write the last batch) the next
window stays open STRETCH times as long as that fan-out took, capped by a length that grows
with the open sessions, so frames per session stay bounded however large the tailnet; it
closes early once no change has come for QUIET_GAP delays, and a window opened after a quiet
spell closes after the configured delay: a lone change never waits for a storm's window. A
session subscribed while a window is open does not get that window's earlier changes: the
state held them before they were published and its first map is built after it subscribed.
Sessions behind by the same batches share one merged list. A subscriber that falls behind
never blocks the publisher or the other subscribers: its bounded buffer collapses to a single
FULL change when it overflows. A session parked with nothing pending may take a batch at
once inside the fan-out (``Subscription.direct``): no task wakeup per session and change.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

DEFAULT_BATCH_DELAY = 0.1  # seconds (tuning.batch_change_delay); Headscale waits 800 ms
DEFAULT_BUFFER = 1024
# In a storm the next window lasts STRETCH x the time the last fan-out took. 6: every
# window's fan-out is worth ~1/7 of the time (1: ~1/2; a fan-out is as many frames as
# sessions and takes time in proportion, so this is what bounds frames per node and their CPU).
# It was 3 while each session's frame cost a task wakeup besides; frames written inside the
# fan-out (Subscription.direct) take about half the time, and 6 keeps windows as long.
STRETCH = 6.0
# The storm window's cap: MAX_STRETCH delays, or SESSION_STRETCH_S per open session when that
# is longer (2 s up to 2,000 sessions, 10 s at 10,000). A fixed cap let frames per node grow
# with the storm's length, which grows with the tailnet: join CPU per node grew with N.
# A window waits for a fan-out still being written at most MAX_STRETCH delays from its start.
MAX_STRETCH = 20
SESSION_STRETCH_S = 0.001
# A stretched window closes once no change has come for this many delays: the storm is over
# (its last joins go out at once) and a change after it does not wait for a long window.
QUIET_GAP = 3
MERGES_KEPT = 32  # backlogs whose merged batch is kept for other sessions behind alike


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


class _Tails:
    """The coalesced batch of each session that subscribed while the window was open: the
    window's changes from its cut on. In a storm every joiner has its own cut, and coalescing
    each one's tail anew is O(window) per joiner (thousands of changes at 10,000 nodes).
    The window's coalesced list keeps each merged change at its first occurrence, so a tail
    is that list's suffix from the first change published at or after the cut, unless a
    change it merged repeats across the cut (its fields would then be those of the tail's
    repeats alone) or the window holds a FULL: those tails are coalesced as before."""

    __slots__ = ("_pending", "_shared", "_firsts", "_straddle", "_full")

    def __init__(self, pending: list[Change], shared: list[Change]) -> None:
        self._pending, self._shared = pending, shared
        first: dict[tuple[ChangeKind, int | None, int | None, int | None], int] = {}
        last: dict[tuple[ChangeKind, int | None, int | None, int | None], int] = {}
        self._full = False
        for i, c in enumerate(pending):
            if c.kind is ChangeKind.FULL:
                self._full = True
                break
            k = c.merge_key()
            first.setdefault(k, i)
            last[k] = i
        # shared holds one change per key, in the order of their first occurrences.
        self._firsts = sorted(first.values())
        # (first, last) of the keys published more than once.
        self._straddle = [(f, last[k]) for k, f in first.items() if last[k] != f]

    def after(self, cut: int, own: list[Change]) -> list[Change]:
        """``coalesce([*pending[cut:], *own])``."""
        if own or self._full or any(f < cut <= t for f, t in self._straddle):
            return coalesce([*self._pending[cut:], *own])
        return self._shared[bisect.bisect_left(self._firsts, cut):]


class Subscription:
    """One node's feed. `async for batch in sub` yields coalesced lists of changes.

    A batch is shared with other subscribers (the bus's list, or the merged list of a backlog
    others have too): do not mutate it.
    """

    def __init__(self, bus: ChangeBus, node_id: int, max_buffer: int) -> None:
        self.bus = bus
        self.node_id = node_id
        self._max = max_buffer
        self._batches: list[list[Change]] = []
        self._count = 0  # changes in _batches
        self._overflowed = False
        self._event = asyncio.Event()
        self.closed = False
        self.overflows = 0
        self._owes = 0  # the bus fan-out whose batch this subscriber has not answered yet
        self._took = 0  # the fan-out of the last batch it took
        # When the oldest change of the pending (then of the last returned) batch was
        # published: the start of its change-to-delivery latency.
        self._first_at = 0.0
        self.batch_since = 0.0
        # Offered each batch while the session is parked in __anext__ with nothing pending:
        # (batch, when its oldest change was published) -> True when the session took it
        # there and then (its frame is written or held for its task: see nudge()).
        self.direct: Callable[[list[Change], float], bool] | None = None
        self._parked = False
        self._nudged = False

    def _deliver(self, batch: list[Change], since: float, direct: bool = False) -> bool:
        """Queue ``batch`` for the session; True when ``direct`` took it at once instead
        (offered only when the flag says so: from the window's timer, not inside publish())."""
        if self.closed or self._overflowed:
            return False  # a pending FULL already covers it
        if direct and self._parked and not self._batches and self.direct is not None \
                and self.direct(batch, since):
            return True
        if not self._batches:
            self._first_at = since
        # A batch the subscriber has nothing else waiting with is the shared list whatever
        # its size (it costs this subscriber nothing); the bound is on what piles up behind.
        if self._batches and self._count + len(batch) > self._max:
            self._batches = [[Change.full()]]
            self._count = 1
            self._overflowed = True
            self.overflows += 1
        else:
            self._batches.append(batch)
            self._count += len(batch)
        self._event.set()
        return False

    def nudge(self) -> None:
        """Wake the parked session with an empty batch: ``direct`` left it work to finish."""
        self._nudged = True
        self._event.set()

    def pending(self) -> int:
        """Changes published for this subscriber that it has not taken yet."""
        return self._count + self.bus._undelivered(self.node_id)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._batches = []
            self._count = 0
            self._event.set()
            self.bus._unsubscribe(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> list[Change]:
        self.bus._answered(self)  # whatever the last batch caused is written by now
        while not self._batches:
            if self.closed:
                raise StopAsyncIteration
            if self._nudged:
                self._nudged = False
                return []
            self._event.clear()
            self._parked = True
            try:
                await self._event.wait()
            finally:
                self._parked = False
        if self.closed:
            raise StopAsyncIteration
        self._nudged = False  # the caller finishes direct's work before this batch's
        batches, self._batches, self._count, self._overflowed = self._batches, [], 0, False
        self.batch_since = self._first_at
        self._event.clear()
        self._took = self._owes
        # One batch is taken as delivered: the shared list, already coalesced.
        return batches[0] if len(batches) == 1 else self.bus._merged(batches)


class ChangeBus:
    def __init__(self, batch_delay: float = DEFAULT_BATCH_DELAY,
                 max_buffer: int = DEFAULT_BUFFER) -> None:
        self.batch_delay = batch_delay
        self.max_buffer = max_buffer
        self._subs: dict[int, Subscription] = {}
        self.published = 0
        self.opened = 0  # subscriptions ever made: one per streaming map session
        # Called with the node ID each time a streaming map session opens (also for a node
        # that is online already: its new session replaces the old one).
        self.session_listeners: list[Callable[[int], None]] = []
        self.flushes = 0  # windows closed (batches handed out)
        self._pending: list[Change] = []  # broadcast changes of the open window
        self._targeted: dict[int, list[Change]] = {}  # node id -> its own changes
        # Sessions opened during the open window: node id -> how many of its broadcast and
        # own changes were published before (those it does not get).
        self._joined: dict[int, tuple[int, int]] = {}
        self._opened_at = 0.0  # monotonic time the open window began
        self._last_publish = 0.0  # monotonic time of the open window's latest change
        self._timer: asyncio.TimerHandle | None = None
        # The last fan-out: when it began, how many subscribers have not come back for
        # their next batch, and how long it took once they all had.
        self._fanout_id = 0
        self._fanout_start = 0.0
        self._outstanding = 0
        self._fanout_end = 0.0
        self.last_fanout_s = 0.0
        # Backlogs merged lately: key the batches' ids -> (the batches, their merged list).
        self._merges: dict[tuple[int, ...], tuple[list[list[Change]], list[Change]]] = {}
        self._prepared_at = -1.0  # _opened_at of the last window prepare_soon() served

    def cap(self) -> float:
        """The longest a storm window lasts after its fan-out: grows with the sessions."""
        return max(MAX_STRETCH * self.batch_delay, SESSION_STRETCH_S * len(self._subs))

    def window(self) -> float:
        """How long a storm window stays open, measured from the end of the last fan-out:
        the configured delay, or the last fan-out's duration x STRETCH when that is longer,
        at most cap()."""
        return max(self.batch_delay, min(STRETCH * self.last_fanout_s, self.cap()))

    def _merged(self, batches: list[list[Change]]) -> list[Change]:
        """Several batches a subscriber fell behind by, coalesced into one list. In a storm
        many sessions fall behind by the same batches: they get the same list object, so the
        mapper still builds and encodes their delta once instead of once per session."""
        key = tuple(map(id, batches))
        got = self._merges.get(key)
        if got is not None and all(a is b for a, b in zip(got[0], batches, strict=True)):
            return got[1]
        merged = coalesce(c for b in batches for c in b)
        if len(self._merges) >= MERGES_KEPT:
            del self._merges[next(iter(self._merges))]  # oldest first (insertion order)
        self._merges[key] = (batches, merged)  # holds the batches: their ids stay theirs
        return merged

    def subscribe(self, node_id: int) -> Subscription:
        self.opened += 1
        old = self._subs.get(node_id)
        sub = Subscription(self, node_id, self.max_buffer)
        self._subs[node_id] = sub
        if self._pending or node_id in self._targeted:
            # What the open window holds already is in the snapshot the session's first map
            # is built from (state changes before it is published), so it is not sent
            # again: a joining node's own NODE_ADDED would make it reconcile every peer.
            self._joined[node_id] = (len(self._pending), len(self._targeted.get(node_id, ())))
        if old is not None:
            old.close()
        for listener in self.session_listeners:
            listener(node_id)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        self._answered(sub, closing=True)
        if self._subs.get(sub.node_id) is sub:
            del self._subs[sub.node_id]

    def subscribed(self, node_id: int) -> bool:
        return node_id in self._subs

    def subscribers(self) -> list[int]:
        return list(self._subs)

    def _undelivered(self, node_id: int) -> int:
        cut = self._joined.get(node_id, (0, 0))
        return (len(self._pending) - cut[0]) + (len(self._targeted.get(node_id, ())) - cut[1])

    def publish(self, *changes: Change) -> None:
        """Never blocks: changes wait for the window to close; each subscriber's buffer takes
        its batch or collapses to FULL."""
        now = time.monotonic()
        if not (self._pending or self._targeted):
            self._opened_at = now  # this publish opens the window
        for change in changes:
            self.published += 1
            if change.target is not None:
                if change.target in self._subs:
                    self._targeted.setdefault(change.target, []).append(change)
            else:
                self._pending.append(change)
        if not (self._pending or self._targeted):
            return
        self._last_publish = now
        if self.batch_delay <= 0:
            self._flush()  # no window: every publish is its own batch
            return
        if self._timer is None:
            self._schedule()

    def _due(self) -> float:
        """When the open window closes (monotonic time); never before the configured delay."""
        due = self._opened_at + self.batch_delay
        if self._outstanding:
            # The last fan-out is still being written: wait for it (its end reschedules),
            # but never past MAX_STRETCH delays, so a stuck session cannot hold every other.
            # No quiet-gap rule here: while the loop writes a fan-out, joins stall too.
            return max(due, self._fanout_start + MAX_STRETCH * self.batch_delay)
        if self._opened_at - self._fanout_end > self.batch_delay:
            return due  # opened after a quiet spell: not a storm
        # A storm: stretched after the last fan-out, until changes stop coming.
        stretched = min(self._fanout_end + self.window(),
                        max(self._last_publish, self._fanout_end) + QUIET_GAP * self.batch_delay)
        return max(due, stretched)

    def prepare_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the current step is over, while the open window waits: work every
        session's frame will need (a policy's evaluation index) is then done before the
        window closes instead of by its first session. Only in a window opened after a
        quiet spell, once per window: in a storm later changes of the same window would
        undo the work, and each storm window's fan-out does it anyway. Not without a map
        session: no frame would read it."""
        if (self._timer is None or not self._subs or self._outstanding
                or self._prepared_at == self._opened_at
                or self._opened_at - self._fanout_end <= self.batch_delay):
            return
        self._prepared_at = self._opened_at
        asyncio.get_running_loop().call_soon(fn)

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): hand it out now
            self._flush()
            return
        wait = max(0.0, self._due() - time.monotonic())
        self._timer = loop.call_at(loop.time() + wait, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        # Changes that came since the timer was set may keep a storm window open.
        if self._due() - time.monotonic() > 0.001:
            self._schedule()
            return
        self._flush(direct=True)

    def _answered(self, sub: Subscription, closing: bool = False) -> None:
        """`sub` is back for more (or gone): its part of the current fan-out is done."""
        owes = sub._owes
        if not owes or owes != self._fanout_id or (sub._took != owes and not closing):
            return
        sub._owes = 0
        self._outstanding -= 1
        if self._outstanding == 0:
            self._fanout_end = time.monotonic()
            self.last_fanout_s = self._fanout_end - self._fanout_start
            if self._timer is not None:  # a window waited for this fan-out: re-time it
                self._timer.cancel()
                self._schedule()

    def _flush(self, direct: bool = False) -> None:
        """Hand out the window's batches. ``direct``: sessions may build and write their frames
        in this loop; only from the timer, when the publisher's state change is complete."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        targeted, self._targeted = self._targeted, {}
        joined, self._joined = self._joined, {}
        if not (pending or targeted):
            return
        self.flushes += 1
        self._fanout_id += 1
        self._fanout_start = time.monotonic()
        self._outstanding = 0
        shared = coalesce(pending) if pending else []
        tails = _Tails(pending, shared) if joined else None
        for nid, sub in list(self._subs.items()):
            own = targeted.get(nid)
            cut = joined.get(nid)
            if cut is not None and tails is not None:
                batch = tails.after(cut[0], (own or [])[cut[1]:])
                if not batch:
                    continue
            elif own:
                batch = coalesce([*shared, *own])
            elif shared:
                batch = shared
            else:
                continue
            if sub._deliver(batch, self._opened_at, direct):
                continue  # written (or held) inside this loop: nothing owed
            sub._owes = self._fanout_id
            self._outstanding += 1
        if not self._outstanding:  # every session took its batch here: the loop was the fan-out
            self._fanout_end = time.monotonic()
            self.last_fanout_s = self._fanout_end - self._fanout_start

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for sub in list(self._subs.values()):
            sub.close()
