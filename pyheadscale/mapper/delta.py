"""(changes, viewer) -> the smallest correct MapResponse delta for one map stream.

Preference: PeersChangedPatch before PeersChanged before a full map (docs/protocol.md, "Map
streaming"). As in Headscale's change constructors (``types/change/change.go``):
online/offline, endpoint/DERP, key-expiry and key-rotation changes are patches; anything else
about a peer is a full PeersChanged entry; deleted or no longer visible peers go to
PeersRemoved (never an empty Peers: the client reads that as "no change").

The changes are the ones state/ publishes (``pyheadscale.state.changes``): a ``ChangeKind``,
the node or user concerned and the ``Field``s that changed (empty: not known, so everything
is assumed). The snapshot (``nodes``) is the truth; changes only say where to look.

What a batch says is worked out once (``BatchView``) and then applied per viewer; the viewer's
work follows the batch's size, except where its whole peer set must be reconciled (policy,
its own identity), and that is done with set operations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pyheadscale.idblocks import IdBlocks
from pyheadscale.mapper.context import AllowAllPolicy, MapContext, visible_ids
from pyheadscale.mapper.full import (
    HOME_DERP_CAPVER,
    PLAIN_VIEW,
    KnownPeers,
    PeerCache,
    PeerView,
    _home_derp,
    full_map_and_peers,
    peer_view,
    user_profiles,
)
from pyheadscale.state.changes import IDENTITY_FIELDS, PATCH_FIELDS, Change, ChangeKind, Field
from pyheadscale.state.model import TAGGED_DEVICES_USER_ID, Node, User
from pyheadscale.tailcfg import KeyKind, encode_key, format_time

__all__ = ["BatchView", "delta", "delta_into", "route_nodes"]

# Self changes the client must hear about (its own Node); endpoint/disco/online echo are noise.
_SELF_NODE_FIELDS = frozenset({Field.EXPIRY, Field.NODE_KEY})
_NODE_KINDS = frozenset({ChangeKind.NODE_ADDED, ChangeKind.NODE_CHANGED, ChangeKind.NODE_PATCH,
                         ChangeKind.NODE_REMOVED, ChangeKind.NODE_ONLINE})
_WHOLE_NODE = frozenset({ChangeKind.NODE_ADDED, ChangeKind.NODE_CHANGED})
# The same, as BatchView.of reads a change's own kind. An expiry set, disabled or passed
# (admin, logout, periodic check) is a whole node: peers get the whole node, because a
# KeyExpiry patch cannot clear the Expired flag a client already holds.
_NODE_KINDS_READ = _NODE_KINDS | {ChangeKind.NODE_KEY_EXPIRY}
_WHOLE_NODE_READ = _WHOLE_NODE | {ChangeKind.NODE_KEY_EXPIRY}
# BatchView.own's values: (the node's own Node is due, it reconciles every peer).
_UNTOUCHED = (False, False)
_DUE = (True, False)
_DUE_RECONCILE = (True, True)


def _patch(peer: Node, fields: frozenset[Field]) -> dict[str, Any] | None:
    """A PeerChange for ``fields``, or None when it would carry nothing."""
    pc: dict[str, Any] = {"NodeID": peer.id}
    if Field.NODE_KEY in fields:
        pc["Key"] = encode_key(KeyKind.NODE, peer.node_key)
    if Field.DISCO_KEY in fields:
        pc["DiscoKey"] = encode_key(KeyKind.DISCO, peer.disco_key)
        # A disco-key patch saying Online:false may be dropped by the client.
        pc["Online"] = True
    if Field.ENDPOINTS in fields:
        pc["Endpoints"] = list(peer.endpoints)
    if Field.HOME_DERP in fields and _home_derp(peer):
        pc["DERPRegion"] = _home_derp(peer)
    if Field.EXPIRY in fields:
        pc["KeyExpiry"] = format_time(peer.expiry)  # zero time un-expires (Headscale)
    if Field.ONLINE in fields:
        pc["Online"] = peer.online
    if ((Field.ONLINE in fields or Field.LAST_SEEN in fields) and not peer.online
            and peer.last_seen):
        pc["LastSeen"] = format_time(peer.last_seen)
    return pc if len(pc) > 1 else None


@dataclass
class BatchView:
    """What one batch of changes says, for any viewer (the viewer's own changes included:
    ``own`` keeps them apart so each viewer can tell them from its peers')."""

    full: bool = False  # a FULL change: every viewer gets a full map
    policy: bool = False
    dns: bool = False
    derp: bool = False
    # Users whose profile changed; None: unknown, resend every relevant profile.
    user_ids: set[int] | None = field(default_factory=set)
    full_ids: set[int] = field(default_factory=set)  # peers to resend whole (or remove)
    patch_fields: dict[int, set[Field]] = field(default_factory=dict)
    touched: set[int] = field(default_factory=set)  # every node a node change is about
    # Per node: does a change about it make that node's own Node entry due, and must that
    # node reconcile everything it sees (its identity changed)?
    own: dict[int, tuple[bool, bool]] = field(default_factory=dict)
    kinds: frozenset[ChangeKind] = frozenset()  # the changes' kinds (the response type)

    @classmethod
    def of(cls, changes: Iterable[Change]) -> BatchView:
        # Every joiner of a storm window looks at its own batch (the window's changes since
        # it subscribed): hundreds to thousands of changes each at 10,000 nodes, so the
        # common case (a change about one node) takes as few steps as it can.
        b = cls()
        kinds: set[ChangeKind] = set()
        own, full_ids, patch_fields = b.own, b.full_ids, b.patch_fields
        for change in changes:
            kind = change.kind
            kinds.add(kind)
            nid = change.node_id
            if nid is not None and kind in _NODE_KINDS_READ:
                fields = change.fields  # empty: not known
                node_due, reconcile = prev = own.get(nid, _UNTOUCHED)
                if kind in _WHOLE_NODE_READ:
                    own[nid] = (_DUE_RECONCILE if reconcile or not fields
                                or not fields.isdisjoint(IDENTITY_FIELDS) else _DUE)
                    full_ids.add(nid)
                elif kind is ChangeKind.NODE_ONLINE:
                    own[nid] = prev
                    got = patch_fields.get(nid)
                    if got is None:
                        patch_fields[nid] = {Field.ONLINE, Field.LAST_SEEN}
                    else:
                        got.update((Field.ONLINE, Field.LAST_SEEN))
                elif kind is ChangeKind.NODE_PATCH:
                    if not node_due and (not fields or not fields.isdisjoint(_SELF_NODE_FIELDS)):
                        own[nid] = (True, reconcile)
                    else:
                        own[nid] = prev
                    if not fields or not fields <= PATCH_FIELDS:
                        full_ids.add(nid)
                    else:
                        got = patch_fields.get(nid)
                        if got is None:
                            patch_fields[nid] = set(fields)
                        else:
                            got.update(fields)
                else:  # NODE_REMOVED
                    own[nid] = prev
                    full_ids.add(nid)
                continue
            if kind is ChangeKind.FULL:
                b.full = True
            elif kind is ChangeKind.POLICY:
                b.policy = True
            elif kind is ChangeKind.DNS:
                b.dns = True
            elif kind is ChangeKind.DERP:
                b.derp = True
            elif kind is ChangeKind.USER:
                uid = change.user_id
                if uid is None or b.user_ids is None:
                    b.user_ids = None
                else:
                    b.user_ids.add(uid)
        b.touched = set(own)
        b.kinds = frozenset(kinds)
        return b


def delta(
    changes: Iterable[Change],
    nodes: Mapping[int, Node] | Iterable[Node],
    users: Mapping[int, User] | Iterable[User],
    viewer: Node,
    ctx: MapContext,
    now: datetime,
    known_peers: Mapping[int, PeerView],
    cache: PeerCache | None = None,
) -> tuple[dict[str, Any] | None, KnownPeers]:
    """The delta for ``viewer`` and its updated known peers (the input is not mutated).

    ``known_peers`` maps each peer the client holds to the view it was sent (what
    full_map_and_peers and earlier deltas returned). After a policy change, or a change of
    the viewer's own identity, a peer whose view changed (its routes for this viewer) is
    sent again. Returns (None, known_peers) when nothing concerns this viewer. A FULL
    change yields a full map (whose peers replace known_peers).
    """
    node_map: Mapping[int, Node] = nodes if isinstance(nodes, Mapping) else {n.id: n for n in nodes}
    user_map: Mapping[int, User] = users if isinstance(users, Mapping) else {u.id: u for u in users}
    known = known_peers.copy() if isinstance(known_peers, KnownPeers) else KnownPeers(known_peers)
    resp = delta_into(BatchView.of(changes), node_map, user_map, viewer, ctx, now, known, cache)
    return resp, known


def route_nodes(nodes: Mapping[int, Node]) -> frozenset[int]:
    """Nodes with approved routes: the only ones whose view can differ between viewers
    (besides disable-ipv4)."""
    return frozenset(i for i, n in nodes.items() if n.approved_routes)


def _reconcile_sets(vis: AbstractSet[int] | None, viewer: Node, node_map: Mapping[int, Node],
                    ctx: MapContext, known: KnownPeers, routers: AbstractSet[int] | None,
                    touched: AbstractSet[int], changed_ids: set[int],
                    removed: set[int]) -> tuple[Iterable[int], list[int]]:
    """The viewer's whole peer set against what it holds, with set operations (it may be
    every node): fills changed_ids (newly visible) and removed; returns the held peers
    whose view must be checked and the touched held peers."""
    visible = (node_map.keys() - {viewer.id}) if vis is None else vis & node_map.keys()
    known_ids = known.ids()
    removed.update(known_ids - visible)
    changed_ids.update(visible - known_ids)
    # Peers whose view (routes for this viewer, hidden IPv4) may have changed: those
    # with routes, those sent with a non-plain view, or all when IPv4 is hidden anywhere.
    held = known_ids & visible
    if ctx.ipv4_disabled:
        check: Iterable[int] = held
    else:
        if routers is None:
            routers = route_nodes(node_map)
        check = (held & routers) | (held & known.non_plain())
    return check, sorted((touched & held) - changed_ids)


def delta_into(
    b: BatchView,
    node_map: Mapping[int, Node],
    user_map: Mapping[int, User],
    viewer: Node,
    ctx: MapContext,
    now: datetime,
    known: KnownPeers,
    cache: PeerCache | None = None,
    routers: AbstractSet[int] | None = None,
) -> dict[str, Any] | None:
    """``delta`` for a batch already looked at; updates ``known`` in place. ``routers``:
    ``route_nodes(node_map)`` when the caller has it (it is shared by a batch's viewers)."""
    viewer = node_map.get(viewer.id, viewer)
    if b.full:
        full, peers = full_map_and_peers(node_map, user_map, viewer, ctx, now, cache)
        if not peers and known:
            # No Peers means "unchanged" to the client: the peers it held must be removed.
            full["PeersRemoved"] = sorted(known.ids())
        known.assign(peers)
        return full
    if viewer.id not in node_map:
        return None  # the viewer was deleted; the app ends its stream

    cache = cache if cache is not None else PeerCache()
    legacy = 0 < viewer.capver < HOME_DERP_CAPVER
    resp: dict[str, Any] = {}
    node_due, reconcile = b.own.get(viewer.id, (False, False))
    self_node_needed = b.policy or node_due
    reconcile_all = b.policy or reconcile
    touched = b.touched - {viewer.id} if viewer.id in b.touched else b.touched

    changed_ids: set[int] = set()
    removed: set[int] = set()
    patches: list[dict[str, Any]] = []
    if reconcile_all:
        vis = visible_ids(ctx.policy, viewer, node_map)
        if isinstance(vis, IdBlocks) and not ctx.ipv4_disabled:
            # The policy's own blocks, over exactly node_map's IDs: diffed against what the
            # stream holds a block at a time, so an unchanged peer set costs O(blocks).
            added, gone = known.diff(vis)
            changed_ids.update(added)
            removed.update(gone)
            if routers is None:
                routers = route_nodes(node_map)
            check: Iterable[int] = [p for p in (*routers, *known.non_plain())
                                    if p in vis and p in known]
            candidates: list[int] = sorted(
                p for p in touched if p in vis and p in known and p not in changed_ids)
        else:
            check, candidates = _reconcile_sets(vis, viewer, node_map, ctx, known, routers,
                                                touched, changed_ids, removed)
        for pid in check:
            if known[pid] != peer_view(viewer, node_map[pid], ctx):
                changed_ids.add(pid)  # the policy now gives this viewer other routes of it
        if check:
            candidates = [p for p in candidates if p not in changed_ids]
    else:
        candidates = sorted(touched)
    # Which candidates the stream holds, in one call (a joiner's batch is every change of
    # the window since it subscribed: up to thousands of nodes at 10,000). A list, not any
    # iterable: it is read twice.
    held_now = known.known_of(candidates)
    see_all = reconcile_all or type(ctx.policy) is AllowAllPolicy
    can_see = ctx.policy.can_see
    full_ids = b.full_ids
    for pid in candidates:
        peer = node_map.get(pid)
        if peer is None or not (see_all or can_see(viewer, peer)):
            if pid in held_now:
                removed.add(pid)
            continue
        if pid not in held_now or pid in full_ids:
            changed_ids.add(pid)  # newly visible (added, or allowed by a new policy), or whole
            continue
        fields = frozenset(b.patch_fields.get(pid, ()))
        if Field.DISCO_KEY in fields and not peer.online:
            changed_ids.add(pid)  # a disco patch must say Online:true; send the node instead
            continue
        pc = _patch(peer, fields)
        if pc is not None:
            patches.append(pc)
    for pid in removed:
        del known[pid]
    changed = [node_map[p] for p in sorted(changed_ids)]

    if self_node_needed:
        resp["Node"] = cache.self_node(viewer, ctx, now)
    if changed:
        entries = []
        plain: list[int] = []
        hidden = ctx.ipv4_disabled
        for p in changed:
            # peer_view's common case inline: a peer without routes, no IPv4 hidden.
            if p.approved_routes or hidden:
                view = known[p.id] = peer_view(viewer, p, ctx)
            else:
                view = PLAIN_VIEW
                plain.append(p.id)
            entries.append(cache.get(p, ctx, now, legacy_derp=legacy, view=view))
        known.add_plain(plain)
        resp["PeersChanged"] = entries
    if removed:
        resp["PeersRemoved"] = sorted(removed)
    if patches:
        resp["PeersChangedPatch"] = patches

    if reconcile_all:
        resp["PacketFilter"] = list(ctx.policy.packet_filter(viewer))
        ssh = ctx.policy.ssh_policy(viewer)
        # nil means "unchanged", so an explicitly empty policy clears an earlier one.
        resp["SSHPolicy"] = ssh if ssh else {"rules": []}
    if b.dns or b.policy:
        resp["DNSConfig"] = ctx.dns_fragment  # Headscale resends DNS with policy changes
    if b.derp:
        resp["DERPMap"] = ctx.derp_fragment

    profile_nodes: list[Node] = list(changed)
    if b.user_ids is None or b.user_ids:
        relevant = [viewer, *(node_map[p] for p in sorted(known.ids()) if p in node_map)]
        if b.user_ids is not None:
            wanted = b.user_ids
            relevant = [n for n in relevant
                        if (TAGGED_DEVICES_USER_ID if n.is_tagged else n.user_id) in wanted]
        profile_nodes += relevant
    if profile_nodes:
        profiles = user_profiles(profile_nodes, user_map)
        if profiles:
            resp["UserProfiles"] = profiles

    if not resp:
        return None
    resp["ControlTime"] = format_time(now)
    return resp
