"""(changes, viewer) -> the smallest correct MapResponse delta for one map stream.

Preference (design.md): PeersChangedPatch before PeersChanged before a full map. Rules from
control-protocol.md §5.2 and pitfalls P4-P6, and Headscale's change constructors
(``types/change/change.go``): online/offline, endpoint/DERP, key-expiry and key-rotation changes
are patches; anything else about a peer is a full PeersChanged entry; deleted or no longer
visible peers go to PeersRemoved (never an empty Peers, P5).

Changes are duck-typed: ``change.kind`` (an enum or string named like NODE_ADDED, NODE_CHANGED,
NODE_PATCH, NODE_REMOVED, NODE_ONLINE, POLICY, DNS, DERP, USER, FULL), ``change.node_id`` and
``change.fields`` (names of the changed Node attributes, or None when unknown). Patchable field
names: see PATCH_FIELDS. The snapshot (``nodes``) is the truth; changes only say where to look.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from pyheadscale.mapper.context import MapContext
from pyheadscale.mapper.full import (
    HOME_DERP_CAPVER,
    PeerCache,
    _home_derp,
    full_map_and_peers,
    self_node,
    user_profiles,
)
from pyheadscale.state.model import TAGGED_DEVICES_USER_ID, Node, User
from pyheadscale.tailcfg import KeyKind, encode_key, format_time

__all__ = ["IDENTITY_FIELDS", "PATCH_FIELDS", "delta"]

# Node attributes a PeerChange can carry (tailcfg.PeerChange).
PATCH_FIELDS = frozenset(
    {"endpoints", "disco_key", "home_derp", "online", "last_seen", "expiry", "node_key", "capver"}
)
# Self changes the client must hear about (its own Node); endpoint/disco/online echo are noise.
_SELF_NODE_FIELDS = frozenset({"expiry", "node_key", "capver"})
# Self changes that can alter what the viewer may see or receive (visibility, filter, caps).
IDENTITY_FIELDS = frozenset({"tags", "user_id", "ipv4", "ipv6", "approved_routes"})
_ALIASES = {
    "derp": "home_derp",
    "preferred_derp": "home_derp",
    "disco": "disco_key",
    "key_expiry": "expiry",
    "key": "node_key",
}
_NODE_KINDS = frozenset({"NODE_ADDED", "NODE_CHANGED", "NODE_PATCH", "NODE_REMOVED", "NODE_ONLINE"})


def _kind(change: Any) -> str:
    k = getattr(change, "kind", None)
    name = getattr(k, "name", None)
    kind = name.upper() if isinstance(name, str) else str(getattr(k, "value", k)).upper()
    # An expiry set, disabled or passed (admin, logout, periodic check): peers get the whole
    # node, because a KeyExpiry patch cannot clear the Expired flag a client already holds.
    return "NODE_CHANGED" if kind == "NODE_KEY_EXPIRY" else kind


def _fields(change: Any) -> frozenset[str] | None:
    f = getattr(change, "fields", None)
    if not f:
        return None
    if isinstance(f, str):
        f = (f,)
    return frozenset(_ALIASES.get(str(x), str(x)) for x in f)


def _patch(peer: Node, fields: frozenset[str]) -> dict[str, Any] | None:
    """A PeerChange for ``fields``, or None when it would carry nothing."""
    pc: dict[str, Any] = {"NodeID": peer.id}
    if "node_key" in fields:
        pc["Key"] = encode_key(KeyKind.NODE, peer.node_key)
    if "disco_key" in fields:
        pc["DiscoKey"] = encode_key(KeyKind.DISCO, peer.disco_key)
        pc["Online"] = True  # P4: a disco patch with Online:false may be dropped by the client
    if "endpoints" in fields:
        pc["Endpoints"] = list(peer.endpoints)
    if "home_derp" in fields and _home_derp(peer):
        pc["DERPRegion"] = _home_derp(peer)
    if "expiry" in fields:
        pc["KeyExpiry"] = format_time(peer.expiry)  # zero time un-expires (Headscale)
    if "capver" in fields and peer.capver:
        pc["Cap"] = peer.capver
    if "online" in fields:
        pc["Online"] = peer.online
    if ("online" in fields or "last_seen" in fields) and not peer.online and peer.last_seen:
        pc["LastSeen"] = format_time(peer.last_seen)
    return pc if len(pc) > 1 else None


def delta(
    changes: Iterable[Any],
    nodes: Mapping[int, Node] | Iterable[Node],
    users: Mapping[int, User] | Iterable[User],
    viewer: Node,
    ctx: MapContext,
    now: datetime,
    known_peers: set[int],
    cache: PeerCache | None = None,
) -> tuple[dict[str, Any] | None, set[int]]:
    """The delta for ``viewer`` and its updated known-peer set (input set is not mutated).

    Returns (None, known_peers) when nothing concerns this viewer. A FULL change yields a full
    map (whose peer set replaces known_peers).
    """
    changes = list(changes)
    node_map: Mapping[int, Node] = nodes if isinstance(nodes, Mapping) else {n.id: n for n in nodes}
    user_map: Mapping[int, User] = users if isinstance(users, Mapping) else {u.id: u for u in users}
    viewer = node_map.get(viewer.id, viewer)
    kinds = [_kind(c) for c in changes]
    if "FULL" in kinds:
        return full_map_and_peers(node_map, user_map, viewer, ctx, now, cache)
    if viewer.id not in node_map:
        return None, set(known_peers)  # the viewer was deleted; the app ends its stream

    cache = cache if cache is not None else PeerCache()
    legacy = 0 < viewer.capver < HOME_DERP_CAPVER
    known = set(known_peers)
    resp: dict[str, Any] = {}

    full_ids: set[int] = set()
    patch_fields: dict[int, set[str]] = {}
    touched: set[int] = set()
    policy_changed = "POLICY" in kinds
    self_node_needed = policy_changed
    reconcile_all = policy_changed
    user_change_ids: set[int] | None = set()

    for change, kind in zip(changes, kinds, strict=True):
        nid = getattr(change, "node_id", None)
        fields = _fields(change)
        if kind == "USER":
            uid = getattr(change, "user_id", None)
            if uid is None or user_change_ids is None:
                user_change_ids = None  # unknown user: resend every relevant profile
            else:
                user_change_ids.add(uid)
            continue
        if kind not in _NODE_KINDS or nid is None:
            continue
        if nid == viewer.id:
            if kind in ("NODE_ADDED", "NODE_CHANGED"):
                self_node_needed = True
                if fields is None or fields & IDENTITY_FIELDS:
                    reconcile_all = True
            elif kind == "NODE_PATCH" and (fields is None or fields & _SELF_NODE_FIELDS):
                self_node_needed = True
            continue
        touched.add(nid)
        if kind in ("NODE_ADDED", "NODE_CHANGED", "NODE_REMOVED"):
            full_ids.add(nid)
        elif kind == "NODE_ONLINE":
            patch_fields.setdefault(nid, set()).update(("online", "last_seen"))
        elif fields is None or not fields <= PATCH_FIELDS:
            full_ids.add(nid)
        else:
            patch_fields.setdefault(nid, set()).update(fields)

    candidates = set(node_map) | known if reconcile_all else touched
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
                known.discard(pid)
            continue
        if pid not in known:
            changed.append(peer)  # newly visible (added, or allowed by a new policy)
            known.add(pid)
            continue
        if pid not in touched:
            continue
        if pid in full_ids:
            changed.append(peer)
            continue
        fields = frozenset(patch_fields.get(pid, ()))
        if "disco_key" in fields and not peer.online:
            changed.append(peer)  # P4: a disco patch must say Online:true; send the node
            continue
        pc = _patch(peer, fields)
        if pc is not None:
            patches.append(pc)

    if self_node_needed:
        resp["Node"] = self_node(viewer, ctx, now)
    if changed:
        resp["PeersChanged"] = [cache.get(p, ctx, now, legacy_derp=legacy) for p in changed]
    if removed:
        resp["PeersRemoved"] = removed
    if patches:
        resp["PeersChangedPatch"] = patches

    if reconcile_all:
        resp["PacketFilter"] = list(ctx.policy.packet_filter(viewer))
        ssh = ctx.policy.ssh_policy(viewer)
        # nil means "unchanged", so an explicitly empty policy clears an earlier one.
        resp["SSHPolicy"] = ssh if ssh else {"Rules": []}
    if "DNS" in kinds or policy_changed:
        resp["DNSConfig"] = ctx.dns_fragment  # Headscale resends DNS with policy changes
    if "DERP" in kinds:
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
