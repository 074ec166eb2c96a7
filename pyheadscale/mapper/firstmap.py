"""The first MapResponse of a stream (and a FULL resend), encoded from shared runs of peers.

A first map carries every peer the viewer may see: at 10,000 nodes several megabytes of JSON,
and a connect storm builds one per node. Most of it is the same for every viewer, so the peer
list is cut into runs (the nodes whose IDs fall in one block of ``RUN`` IDs) and each run is
encoded and zstd-compressed once, then reused by every viewer that sees the whole run. zstd
frames concatenate: a decoder decodes them one after the other into one output (RFC 8878,
section 3.1; Tailscale's client decodes a map message with zstd's DecodeAll, which does so).
So a map is a head frame (``{...,"Peers":[``, built per viewer), the runs' frames and a tail
frame (``]}``). A run the viewer sees only in part (its own run, or one a policy hides nodes
of), or one whose entries may differ between viewers (a member with routes, whose routes
depend on the viewer; hidden IPv4 addresses), is compressed for this viewer alone.

A cached run is used only while it is still right: the same node objects (nodes are replaced,
never mutated, on every change), the same context generation, and no member's key expiry
passed since it was built. The result is exactly ``full_map_and_peers``'s response
(tests/unit/test_firstmap.py). Not locked: use one per event loop, like ``PeerCache``.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime

from pyheadscale.idblocks import IdBlocks
from pyheadscale.mapper.context import visible_ids
from pyheadscale.mapper.encode import compress, compress_json, encode_json
from pyheadscale.mapper.full import (
    HOME_DERP_CAPVER,
    PLAIN_VIEW,
    KnownPeers,
    map_head,
    peer_view,
    profile_owner,
    profiles_of,
)
from pyheadscale.mapper.known import BLOCK, block_bits
from pyheadscale.mapper.snapshot import Snapshot
from pyheadscale.state.model import Node

__all__ = ["RUN", "PeerRuns"]

# Node IDs per run: small enough that a run rebuilt after a change is cheap; one block of
# KnownPeers, so every viewer a run is sent to shares the run's bits.
RUN = BLOCK
_TAIL = compress(b"]}")


@dataclass
class _Run:
    members: list[Node]
    content: bytes  # the members' entries joined by commas
    owners: frozenset[int | None]  # their profile IDs
    bits: int  # their IDs, as KnownPeers holds them (block_bits)
    valid_until: datetime | None  # the earliest member key expiry still ahead
    frames: dict[bool, bytes] = field(default_factory=dict)  # leading comma? -> zstd frame

    def frame(self, comma: bool) -> bytes:
        got = self.frames.get(comma)
        if got is None:
            got = self.frames[comma] = compress(b"," + self.content if comma else self.content)
        return got


def _sees_run(vis: AbstractSet[int] | None, block: int, run_ids: list[int]) -> bool:
    """Whether the viewer sees every member of the run: the policy index's IdBlocks answers
    with one block's bits (a test per member was most of a first map's cost under a policy)."""
    if vis is None:
        return True
    if isinstance(vis, IdBlocks):
        return vis.covers(((block, block_bits(run_ids)),))
    return vis >= set(run_ids)


class PeerRuns:
    """Compressed runs of peer entries, per (run, context generation, legacy DERP form)."""

    def __init__(self) -> None:
        self._runs: dict[tuple[int, bool], _Run] = {}
        self._generation: int | None = None
        self.reused = 0  # runs served from the cache
        self.built = 0  # runs encoded and compressed

    def first_frame(self, snap: Snapshot, viewer: Node) -> tuple[bytes, KnownPeers]:
        """The framed full map for ``viewer`` and the peers it carries with their views."""
        nodes, ctx, now, cache = snap.nodes, snap.ctx, snap.now, snap.cache
        if ctx.generation != self._generation:
            self._runs.clear()
            self._generation = ctx.generation
        legacy = 0 < viewer.capver < HOME_DERP_CAPVER
        vis = visible_ids(ctx.policy, viewer, nodes)
        ids = sorted(nodes)
        parts: list[bytes] = []
        owners: set[int | None] = {profile_owner(viewer)}
        known = KnownPeers()
        hidden = ctx.ipv4_disabled
        shareable = not hidden  # with hidden IPv4 anywhere, views may differ per viewer
        i = 0
        while i < len(ids):
            block = ids[i] // RUN
            j = bisect.bisect_left(ids, (block + 1) * RUN, i)
            run_ids = ids[i:j]
            i = j
            comma = bool(parts)
            whole = (shareable and not block * RUN <= viewer.id < (block + 1) * RUN
                     and _sees_run(vis, block, run_ids))
            run = self._run(block, legacy, run_ids, snap) if whole else None
            if run is not None:
                parts.append(run.frame(comma))
                owners |= run.owners
                known.add_plain_block(block, run.bits)
                continue
            seen = [nodes[p] for p in run_ids
                    if p != viewer.id and (vis is None or p in vis)]
            if not seen:
                continue
            entries = []
            for p in seen:
                # peer_view's common case inline: a peer without routes, no IPv4 hidden.
                view = peer_view(viewer, p, ctx) if p.approved_routes or hidden else PLAIN_VIEW
                known[p.id] = view
                entries.append(cache.encoded(p, ctx, now, legacy_derp=legacy, view=view))
            content = b",".join(entries)
            parts.append(compress(b"," + content if comma else content))
            owners.update(profile_owner(p) for p in seen)
        head = encode_json(map_head(viewer, ctx, now, profiles_of(owners, snap.users)))
        if parts:  # an empty Peers would mean "unchanged": omit instead
            parts.insert(0, compress_json(head[:-1] + b',"Peers":['))
            parts.append(_TAIL)
        else:
            parts.append(compress_json(head))
        body = b"".join(parts)
        return struct.pack("<I", len(body)) + body, known

    def _run(self, block: int, legacy: bool, run_ids: list[int], snap: Snapshot) -> _Run | None:
        """The shared run, or None when a member's entry depends on the viewer (routes)."""
        ctx, now, cache = snap.ctx, snap.now, snap.cache
        members = list(map(snap.nodes.__getitem__, run_ids))
        run = self._runs.get((block, legacy))
        # Node objects are replaced on every change, so an equal member list (identity
        # first, element by element) means unchanged members (a cached run has no router).
        if (run is not None and run.members == members
                and (run.valid_until is None or now < run.valid_until)):
            self.reused += 1
            return run
        if any(n.approved_routes for n in members):
            return None
        self.built += 1
        ahead = [n.expiry for n in members if n.expiry is not None and n.expiry > now]
        run = _Run(members,
                   b",".join(cache.encoded(p, ctx, now, legacy_derp=legacy, view=PLAIN_VIEW)
                             for p in members),
                   frozenset(profile_owner(p) for p in members),
                   block_bits(run_ids),
                   min(ahead) if ahead else None)
        self._runs[(block, legacy)] = run
        return run
