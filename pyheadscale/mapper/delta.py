"""(changes, viewer) -> the smallest correct MapResponse delta for one map stream.

Preference: PeersChangedPatch before PeersChanged before a full map (docs/protocol.md, "Map
streaming"). As in Headscale's change constructors (``types/change/change.go``):
online/offline, endpoint/DERP, key-expiry and key-rotation changes are patches; anything else
about a peer is a full PeersChanged entry; deleted or no longer visible peers go to
PeersRemoved (never an empty Peers: the client reads that as "no change").

The changes are the ones state/ publishes (``pyheadscale.state.changes``): a ``ChangeKind``,
the node or user concerned and the ``Field``s that changed (empty: not known, so everything
is assumed). The snapshot (``nodes``) is the truth; changes only say where to look.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from pyheadscale.mapper.context import MapContext
from pyheadscale.mapper.full import (
    HOME_DERP_CAPVER,
    KnownPeers,
    PeerCache,
    PeerView,
    _home_derp,
    full_map_and_peers,
    peer_view,
    self_node,
    user_profiles,
)
from pyheadscale.state.changes import IDENTITY_FIELDS, PATCH_FIELDS, Change, ChangeKind, Field
from pyheadscale.state.model import TAGGED_DEVICES_USER_ID, Node, User
from pyheadscale.tailcfg import KeyKind, encode_key, format_time

__all__ = ["delta"]

# Self changes the client must hear about (its own Node); endpoint/disco/online echo are noise.
_SELF_NODE_FIELDS = frozenset({Field.EXPIRY, Field.NODE_KEY})
_NODE_KINDS = frozenset({ChangeKind.NODE_ADDED, ChangeKind.NODE_CHANGED, ChangeKind.NODE_PATCH,
                         ChangeKind.NODE_REMOVED, ChangeKind.NODE_ONLINE})
_WHOLE_NODE = frozenset({ChangeKind.NODE_ADDED, ChangeKind.NODE_CHANGED})


def _kind(change: Change) -> ChangeKind:
    # An expiry set, disabled or passed (admin, logout, periodic check): peers get the whole
    # node, because a KeyExpiry patch cannot clear the Expired flag a client already holds.
    if change.kind is ChangeKind.NODE_KEY_EXPIRY:
        return ChangeKind.NODE_CHANGED
    return change.kind


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
    changes = list(changes)
    node_map: Mapping[int, Node] = nodes if isinstance(nodes, Mapping) else {n.id: n for n in nodes}
    user_map: Mapping[int, User] = users if isinstance(users, Mapping) else {u.id: u for u in users}
    viewer = node_map.get(viewer.id, viewer)
    kinds = [_kind(c) for c in changes]
    if ChangeKind.FULL in kinds:
        return full_map_and_peers(node_map, user_map, viewer, ctx, now, cache)
    known: KnownPeers = dict(known_peers)
    if viewer.id not in node_map:
        return None, known  # the viewer was deleted; the app ends its stream

    cache = cache if cache is not None else PeerCache()
    legacy = 0 < viewer.capver < HOME_DERP_CAPVER
    resp: dict[str, Any] = {}

    full_ids: set[int] = set()
    patch_fields: dict[int, set[Field]] = {}
    touched: set[int] = set()
    policy_changed = ChangeKind.POLICY in kinds
    self_node_needed = policy_changed
    reconcile_all = policy_changed
    user_change_ids: set[int] | None = set()

    for change, kind in zip(changes, kinds, strict=True):
        nid = change.node_id
        fields = change.fields or None  # empty: not known
        if kind is ChangeKind.USER:
            uid = change.user_id
            if uid is None or user_change_ids is None:
                user_change_ids = None  # unknown user: resend every relevant profile
            else:
                user_change_ids.add(uid)
            continue
        if kind not in _NODE_KINDS or nid is None:
            continue
        if nid == viewer.id:
            if kind in _WHOLE_NODE:
                self_node_needed = True
                if fields is None or fields & IDENTITY_FIELDS:
                    reconcile_all = True
            elif kind is ChangeKind.NODE_PATCH and (fields is None or fields & _SELF_NODE_FIELDS):
                self_node_needed = True
            continue
        touched.add(nid)
        if kind in _WHOLE_NODE or kind is ChangeKind.NODE_REMOVED:
            full_ids.add(nid)
        elif kind is ChangeKind.NODE_ONLINE:
            patch_fields.setdefault(nid, set()).update((Field.ONLINE, Field.LAST_SEEN))
        elif fields is None or not fields <= PATCH_FIELDS:
            full_ids.add(nid)
        else:
            patch_fields.setdefault(nid, set()).update(fields)

    candidates = set(node_map) | set(known) if reconcile_all else touched
    changed: list[Node] = []
    removed: list[int] = []
    patches: list[dict[str, Any]] = []
    can_see = ctx.policy.can_see
    for pid in sorted(candidates):
        if pid == viewer.id:
            continue
        peer = node_map.get(pid)
        if peer is None or not can_see(viewer, peer):
            if pid in known:
                removed.append(pid)
                del known[pid]
            continue
        if pid not in known or pid in full_ids:
            changed.append(peer)  # newly visible (added, or allowed by a new policy), or new
            continue
        if reconcile_all:
            view = peer_view(viewer, peer, ctx)
            if known[pid] != view:
                changed.append(peer)  # the policy now gives this viewer other routes of it
                continue
        if pid not in touched:
            continue
        fields = frozenset(patch_fields.get(pid, ()))
        if Field.DISCO_KEY in fields and not peer.online:
            changed.append(peer)  # a disco patch must say Online:true; send the node instead
            continue
        pc = _patch(peer, fields)
        if pc is not None:
            patches.append(pc)

    if self_node_needed:
        resp["Node"] = self_node(viewer, ctx, now)
    if changed:
        entries = []
        for p in changed:
            view = known[p.id] = peer_view(viewer, p, ctx)
            entries.append(cache.get(p, ctx, now, legacy_derp=legacy, view=view))
        resp["PeersChanged"] = entries
    if removed:
        resp["PeersRemoved"] = removed
    if patches:
        resp["PeersChangedPatch"] = patches

    if reconcile_all:
        resp["PacketFilter"] = list(ctx.policy.packet_filter(viewer))
        ssh = ctx.policy.ssh_policy(viewer)
        # nil means "unchanged", so an explicitly empty policy clears an earlier one.
        resp["SSHPolicy"] = ssh if ssh else {"rules": []}
    if ChangeKind.DNS in kinds or policy_changed:
        resp["DNSConfig"] = ctx.dns_fragment  # Headscale resends DNS with policy changes
    if ChangeKind.DERP in kinds:
        resp["DERPMap"] = ctx.derp_fragment

    profile_nodes: list[Node] = list(changed)
    if user_change_ids is None or user_change_ids:
        relevant = [viewer, *(node_map[p] for p in sorted(known) if p in node_map)]
        if user_change_ids is not None:
            relevant = [
                n
                for n in relevant
                if (TAGGED_DEVICES_USER_ID if n.is_tagged else n.user_id) in user_change_ids
            ]
        profile_nodes += relevant
    if profile_nodes:
        profiles = user_profiles(profile_nodes, user_map)
        if profiles:
            resp["UserProfiles"] = profiles

    if not resp:
        return None, known
    resp["ControlTime"] = format_time(now)
    return resp, known
