"""What a map stream has told its client about each peer, in O(peers with routes) objects.

Every map session holds one ``KnownPeers`` for as long as its client is connected, and it
covers every peer the client sees: N sessions of an N-node tailnet hold N² entries. Nearly
all of them carry the one view every viewer shares (``PLAIN_VIEW``: no routes, nothing
hidden), so those peers are kept as bits, 128 node IDs per block, one small int per block;
only peers sent with another view (routes offered to this viewer, IPv4 hidden) get a dict
entry. Blocks are keyed by ID, so sparse IDs (a long history of deleted nodes) cost one
block per live peer at worst, never memory in proportion to the highest ID. Ints are
immutable, so sessions that got the same block (a shared run of a first map) share one int
object until one of them changes it. A dict per session instead was ~37 bytes per peer per
viewer (~3.7 GB at 10,000 nodes; tests/bench/mapstate.py), and the cyclic GC walked all of
it on every full collection.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, KeysView, Mapping, MutableMapping
from typing import NamedTuple

from pyheadscale.idblocks import BLOCK, LOW, SHIFT, IdBlocks, blocks_of, offsets
from pyheadscale.state.model import IPNetwork

__all__ = ["BLOCK", "PLAIN_VIEW", "KnownPeers", "PeerView", "block_bits", "plain_blocks"]


class PeerView(NamedTuple):
    """What of a peer's entry depends on who looks: the routes it offers this viewer
    (sorted) and whether its IPv4 address is hidden. Viewers with equal views share one
    encoded entry, so a tailnet encodes each peer once per distinct view, not per viewer.
    (A tuple: it is hashed for every peer of every map.)"""

    routes: tuple[IPNetwork, ...] = ()
    hide_v4: bool = False


PLAIN_VIEW = PeerView()

_SHIFT = SHIFT
_LOW = LOW


def block_bits(ids: Iterable[int]) -> int:
    """The bits of ``ids`` within their block (all of them in one block)."""
    bits = 0
    for i in ids:
        bits |= 1 << (i & _LOW)
    return bits


def plain_blocks(ids: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """``ids`` as (block, bits) pairs for ``KnownPeers.add_plain_blocks``: worked out once
    for a batch, then applied to every viewer with a dict operation per block."""
    return tuple(blocks_of(ids).items())


_offsets = offsets


class KnownPeers(MutableMapping[int, PeerView]):
    """Peer ID -> the view the stream sent it with; iterates in ascending ID order.

    Invariant: an ID is either a bit of ``_plain`` (its view is PLAIN_VIEW) or a key of
    ``_other`` (any other view), never both, and no block is stored as 0, so two equal
    instances have equal fields."""

    __slots__ = ("_other", "_plain")

    def __init__(self, views: Mapping[int, PeerView] | None = None) -> None:
        self._plain: dict[int, int] = {}  # block -> bits of the peers known with PLAIN_VIEW
        self._other: dict[int, PeerView] = {}
        if views:
            for pid, view in views.items():
                self[pid] = view

    def _has_plain(self, pid: int) -> bool:
        return bool(self._plain.get(pid >> _SHIFT, 0) >> (pid & _LOW) & 1)

    def _drop_plain(self, pid: int) -> bool:
        block = pid >> _SHIFT
        bits = self._plain.get(block, 0)
        bit = 1 << (pid & _LOW)
        if not bits & bit:
            return False
        if bits == bit:
            del self._plain[block]
        else:
            self._plain[block] = bits ^ bit
        return True

    def __contains__(self, pid: object) -> bool:
        if not isinstance(pid, int):
            return False
        return self._has_plain(pid) or pid in self._other

    def __getitem__(self, pid: int) -> PeerView:
        if self._has_plain(pid):
            return PLAIN_VIEW
        return self._other[pid]

    def __setitem__(self, pid: int, view: PeerView) -> None:
        if view == PLAIN_VIEW:
            if self._other:
                self._other.pop(pid, None)
            block = pid >> _SHIFT
            self._plain[block] = self._plain.get(block, 0) | 1 << (pid & _LOW)
        else:
            self._drop_plain(pid)
            self._other[pid] = view

    def __delitem__(self, pid: int) -> None:
        if not self._drop_plain(pid):
            del self._other[pid]

    def __len__(self) -> int:
        return sum(b.bit_count() for b in self._plain.values()) + len(self._other)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.ids()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, KnownPeers):
            return self._plain == other._plain and self._other == other._other
        return super().__eq__(other)

    def __repr__(self) -> str:
        return f"KnownPeers({dict(self.items())!r})"

    def ids(self) -> set[int]:
        """Every known peer's ID, as a new set (for set operations over a whole peer set)."""
        out = set(self._other)
        for block, bits in self._plain.items():
            out.update(map((block << _SHIFT).__add__, _offsets(bits)))
        return out

    def known_of(self, ids: Iterable[int]) -> set[int]:
        """The IDs of ``ids`` that are known, with any view: one call for a batch's nodes
        instead of a ``in`` test (a method call) per node."""
        plain_get, other = self._plain.get, self._other
        return {pid for pid in ids
                if plain_get(pid >> _SHIFT, 0) >> (pid & _LOW) & 1 or pid in other}

    def has_all_blocks(self, blocks: Iterable[tuple[int, int]]) -> bool:
        """Are all the IDs of ``blocks`` (``plain_blocks``) known, with any view? Once per
        viewer per batch: a mask test per block, so a viewer checks a storm batch of hundreds
        of peers in a few dict look-ups."""
        plain, other = self._plain, self._other
        for block, bits in blocks:
            missing = bits & ~plain.get(block, 0)
            if missing and not (other and all((block << _SHIFT) + off in other
                                              for off in _offsets(missing))):
                return False
        return True

    def diff(self, visible: IdBlocks) -> tuple[list[int], list[int]]:
        """(IDs in ``visible`` not known, known IDs not in ``visible``), ascending: a block
        at a time, so a viewer whose peer set did not change costs O(blocks), not O(peers)."""
        plain = self._plain
        if self._other:
            plain = dict(plain)
            for pid in self._other:
                block = pid >> _SHIFT
                plain[block] = plain.get(block, 0) | 1 << (pid & _LOW)
        vis = visible.blocks
        if plain == vis:
            return [], []
        added: list[int] = []
        removed: list[int] = []
        for block in sorted(plain.keys() | vis.keys()):
            have, want = plain.get(block, 0), vis.get(block, 0)
            if have == want:
                continue
            base = block << _SHIFT
            if want & ~have:
                added.extend(map(base.__add__, _offsets(want & ~have)))
            if have & ~want:
                removed.extend(map(base.__add__, _offsets(have & ~want)))
        return added, removed

    def non_plain(self) -> KeysView[int]:
        """The IDs known with a view other than PLAIN_VIEW (a view of this viewer's own)."""
        return self._other.keys()

    def add_plain(self, ids: Iterable[int]) -> None:
        """Record ``ids`` as known with PLAIN_VIEW."""
        plain, other = self._plain, self._other
        for pid in ids:
            if other:
                other.pop(pid, None)
            block = pid >> _SHIFT
            plain[block] = plain.get(block, 0) | 1 << (pid & _LOW)

    def add_plain_blocks(self, blocks: Iterable[tuple[int, int]]) -> None:
        """``add_plain_block`` for each (block, bits) of ``plain_blocks``."""
        for block, bits in blocks:
            self.add_plain_block(block, bits)

    def add_plain_block(self, block: int, bits: int) -> None:
        """Record the IDs of ``bits`` in ``block`` (``block_bits``) as known with PLAIN_VIEW.
        The int is stored as given when the block was empty: callers share one per run."""
        if not bits:
            return
        other = self._other
        if other:
            base = block << _SHIFT
            for off in _offsets(bits):
                other.pop(base + off, None)
        old = self._plain.get(block)
        self._plain[block] = bits if old is None else old | bits

    def assign(self, other: KnownPeers) -> None:
        """Become a copy of ``other`` (a full map replaced everything the client held)."""
        self._plain = dict(other._plain)
        self._other = dict(other._other)

    def copy(self) -> KnownPeers:
        out = KnownPeers()
        out.assign(self)
        return out
