"""(tailnet snapshot, viewer) -> the first, complete MapResponse of a map stream.

Field choices follow Headscale's ``types/node.go TailNode`` and ``mapper/builder.go``; what
the client makes of each field is in docs/protocol.md ("Map streaming"). Large parts shared between viewers (peer entries,
DERPMap, DNSConfig) are pre-encoded ``orjson.Fragment`` values; ``encode.to_plain`` turns a
response into plain JSON values for inspection.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import orjson

from pyheadscale.mapper.context import NODE_ATTR_SUGGEST_EXIT_NODE, MapContext
from pyheadscale.mapper.known import PLAIN_VIEW, KnownPeers, PeerView
from pyheadscale.state.model import TAGGED_DEVICES_USER_ID, IPNetwork, Node, User
from pyheadscale.tailcfg import (
    KeyKind,
    dumps,
    encode_key,
    format_time,
    host_prefix,
    stable_node_id,
)

__all__ = [
    "CAP_ADMIN",
    "CAP_FILE_SHARING",
    "CAP_SSH",
    "HOME_DERP_CAPVER",
    "KnownPeers",
    "NODE_ATTR_DEFAULT_AUTO_UPDATE",
    "NODE_ATTR_SUGGEST_EXIT_NODE",
    "PeerCache",
    "PLAIN_VIEW",
    "PeerView",
    "TAGGED_DEVICES_PROFILE",
    "fqdn",
    "full_map",
    "full_map_and_peers",
    "map_head",
    "node_entry",
    "peer_entry",
    "peer_view",
    "profile_owner",
    "profiles_of",
    "self_node",
    "user_profile",
    "user_profiles",
    "visible_peers",
]

CAP_ADMIN = "https://tailscale.com/cap/is-admin"
CAP_SSH = "https://tailscale.com/cap/ssh"
CAP_FILE_SHARING = "https://tailscale.com/cap/file-sharing"
NODE_ATTR_DEFAULT_AUTO_UPDATE = "default-auto-update"
HOME_DERP_CAPVER = 111  # clients below this need the legacy "DERP": "127.3.3.40:N" string
# Clients below this read the tailnet's auto-update default only from the MapResponse's
# top-level DefaultAutoUpdate, not from the default-auto-update cap.
AUTO_UPDATE_CAP_CAPVER = 131
LEGACY_DERP_IP = "127.3.3.40"

TAGGED_DEVICES_PROFILE: dict[str, Any] = {
    "ID": TAGGED_DEVICES_USER_ID,
    "LoginName": "tagged-devices",
    "DisplayName": "Tagged Devices",
}


def fqdn(node: Node, base_domain: str) -> str:
    """MagicDNS name with a trailing dot (Headscale ``GetFQDN``; bare label without a domain)."""
    if not base_domain:
        return node.given_name
    return f"{node.given_name}.{base_domain.rstrip('.')}."


def _prefix_key(n: IPNetwork) -> tuple[int, int, int]:
    # netip.Prefix.Compare order: family, address, then length.
    return (n.version, int(n.network_address), n.prefixlen)


def _home_derp(node: Node) -> int:
    ni = node.hostinfo.get("NetInfo") if isinstance(node.hostinfo, dict) else None
    v = ni.get("PreferredDERP") if isinstance(ni, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


_PLAIN_NO_V4 = PeerView((), True)


@functools.lru_cache(maxsize=1 << 16)
def _host_net(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> IPNetwork:
    # Parsing the prefix text is most of a node entry's cost; addresses rarely change.
    return ipaddress.ip_network(host_prefix(addr))


def _is_exit(r: IPNetwork) -> bool:
    return r.prefixlen == 0


def peer_view(viewer: Node, peer: Node, ctx: MapContext) -> PeerView:
    hidden = ctx.ipv4_disabled
    hide_v4 = bool(hidden) and (viewer.id in hidden or peer.id in hidden)
    if not peer.approved_routes:  # no route to offer anyone (most peers)
        return _PLAIN_NO_V4 if hide_v4 else PLAIN_VIEW
    primaries = [r for r in ctx.routes_of(peer.id) if not _is_exit(r)]
    offered = ctx.policy.routes_for_peer(viewer, peer, primaries)
    return PeerView(tuple(sorted(set(offered), key=_prefix_key)), hide_v4)


def _served_routes(node: Node) -> list[IPNetwork]:
    """Approved and announced routes, exit routes included: what the node itself serves."""
    announced = set(node.announced_routes)
    return [r for r in node.approved_routes if r in announced]


def node_entry(
    node: Node,
    ctx: MapContext,
    now: datetime,
    *,
    legacy_derp: bool,
    routes: Iterable[IPNetwork],
    hide_v4: bool,
) -> dict[str, Any]:
    """tailcfg.Node without CapMap (which differs between the self and the peer view).
    ``routes``: what goes into AllowedIPs besides the addresses (PrimaryRoutes are the
    non-exit ones of them)."""
    addrs = [_host_net(a) for a in node.addresses if not (hide_v4 and a.version == 4)]
    allowed: list[IPNetwork] = []
    for p in (*addrs, *routes):
        if p not in allowed:
            allowed.append(p)
    allowed.sort(key=_prefix_key)
    primary = [r for r in allowed if r not in addrs and not _is_exit(r)]
    expired = node.is_expired(now)

    out: dict[str, Any] = {
        "ID": node.id,
        "StableID": stable_node_id(node.id),
        "Name": fqdn(node, ctx.base_domain),
        "User": TAGGED_DEVICES_USER_ID if node.is_tagged else (node.user_id or 0),
        "Key": encode_key(KeyKind.NODE, node.node_key),
        "KeyExpiry": format_time(node.expiry),
        "Machine": encode_key(KeyKind.MACHINE, node.machine_key),
        "DiscoKey": encode_key(KeyKind.DISCO, node.disco_key),
        "Addresses": [str(a) for a in addrs],
        "AllowedIPs": [str(p) for p in allowed],  # always explicit (capver < 112 needs it)
    }
    if node.endpoints:
        out["Endpoints"] = list(node.endpoints)
    home = _home_derp(node)
    if home:
        if legacy_derp:
            out["DERP"] = f"{LEGACY_DERP_IP}:{home}"
        out["HomeDERP"] = home
    out["Hostinfo"] = node.hostinfo
    out["Created"] = format_time(node.created_at)
    if node.capver:
        out["Cap"] = node.capver
    if node.tags:
        out["Tags"] = list(node.tags)
    if primary:
        out["PrimaryRoutes"] = [str(p) for p in primary]
    # LastSeen only for offline nodes: with Online=true it confuses clients (Headscale).
    if not node.online and node.last_seen is not None:
        out["LastSeen"] = format_time(node.last_seen)
    out["Online"] = node.online
    out["MachineAuthorized"] = True  # false would park the client in NeedsMachineAuth
    if expired:
        out["Expired"] = True
    return out


def self_node(viewer: Node, ctx: MapContext, now: datetime) -> dict[str, Any]:
    """The viewer's own Node with its CapMap: Headscale's baseline overlaid by policy attrs.

    Its AllowedIPs hold every route it serves, an HA standby's too; its PrimaryRoutes the
    ones it is elected for (as the hosted plane sends them)."""
    out = _self_base(viewer, ctx, now)
    out["CapMap"] = self_capmap(viewer, ctx)
    return out


def _self_stamp(viewer: Node, ctx: MapContext, now: datetime) -> tuple[Any, ...]:
    """Everything ``_self_base`` reads besides the viewer's fields (a changed node is a new
    object): equal stamps, equal JSON."""
    return (viewer.is_expired(now), ctx.base_domain, viewer.id in ctx.ipv4_disabled,
            tuple(ctx.routes_of(viewer.id)))


def _self_base(viewer: Node, ctx: MapContext, now: datetime) -> dict[str, Any]:
    """``self_node`` without its CapMap (the last key)."""
    served = _served_routes(viewer)
    primaries = set(ctx.routes_of(viewer.id))
    out = node_entry(viewer, ctx, now, legacy_derp=0 < viewer.capver < HOME_DERP_CAPVER,
                     routes=served, hide_v4=viewer.id in ctx.ipv4_disabled)
    prim = [p for p in served if p in primaries and not _is_exit(p)]
    if prim:
        out["PrimaryRoutes"] = [str(p) for p in sorted(prim, key=_prefix_key)]
    else:
        out.pop("PrimaryRoutes", None)
    return out


def self_capmap(viewer: Node, ctx: MapContext) -> dict[str, list[Any]]:
    capmap: dict[str, list[Any]] = {CAP_ADMIN: [], CAP_SSH: []}
    if ctx.taildrop:
        capmap[CAP_FILE_SHARING] = []
    capmap[NODE_ATTR_DEFAULT_AUTO_UPDATE] = [ctx.auto_update]
    capmap.update(ctx.policy.node_capmap(viewer) or {})
    return capmap


def peer_entry(
    peer: Node, ctx: MapContext, now: datetime, *, legacy_derp: bool, view: PeerView
) -> dict[str, Any]:
    """``peer`` as seen by every viewer with ``view`` of it (nothing else of the viewer goes
    in, which is what lets viewers share it). Its CapMap carries only caps clients read from
    peers (suggest-exit-node on approved exit nodes)."""
    out = node_entry(peer, ctx, now, legacy_derp=legacy_derp, routes=view.routes,
                     hide_v4=view.hide_v4)
    caps = ctx.policy.peer_capmap(peer)
    if caps:
        out["CapMap"] = dict(caps)
    return out


class PeerCache:
    """Encoded peer entries shared by all viewers with the same view of the peer.

    Keyed by (node.id, node.version, ctx.generation, expired-now) and, within that, by
    (legacy DERP string, PeerView). A new version or generation replaces the node's old
    entries. Not locked: use one per event loop.
    """

    def __init__(self) -> None:
        self._entries: dict[
            int,
            tuple[tuple[int, int, bool], dict[tuple[bool, PeerView], tuple[bytes, orjson.Fragment]]],
        ] = {}
        self.hits = 0
        self.misses = 0
        # Own Nodes without their CapMap, by node ID: (node, _self_stamp, JSON). Every
        # policy change resends every viewer's own Node, which seldom changed.
        self._selves: dict[int, tuple[Node, tuple[Any, ...], bytes]] = {}

    def __len__(self) -> int:
        return sum(len(v[1]) for v in self._entries.values())

    def _slot(self, peer: Node, ctx: MapContext, now: datetime, legacy_derp: bool,
              view: PeerView) -> tuple[bytes, orjson.Fragment]:
        stamp = (peer.version, ctx.generation, peer.is_expired(now))
        slot = self._entries.get(peer.id)
        if slot is None or slot[0] != stamp:
            slot = (stamp, {})
            self._entries[peer.id] = slot
        key = (legacy_derp, view)
        got = slot[1].get(key)
        if got is None:
            self.misses += 1
            raw = dumps(peer_entry(peer, ctx, now, legacy_derp=legacy_derp, view=view))
            got = slot[1][key] = (raw, orjson.Fragment(raw))
        else:
            self.hits += 1
        return got

    def get(
        self, peer: Node, ctx: MapContext, now: datetime, *, legacy_derp: bool, view: PeerView
    ) -> orjson.Fragment:
        return self._slot(peer, ctx, now, legacy_derp, view)[1]

    def encoded(self, peer: Node, ctx: MapContext, now: datetime, *, legacy_derp: bool,
                view: PeerView) -> bytes:
        """The peer's entry as JSON bytes."""
        return self._slot(peer, ctx, now, legacy_derp, view)[0]

    def self_node(self, viewer: Node, ctx: MapContext, now: datetime) -> orjson.Fragment:
        """``self_node`` encoded: the part besides the CapMap kept while the node object
        and its ``_self_stamp`` stay; the CapMap (policy attrs) encoded each time."""
        stamp = _self_stamp(viewer, ctx, now)
        hit = self._selves.get(viewer.id)
        if hit is None or hit[0] is not viewer or hit[1] != stamp:
            hit = self._selves[viewer.id] = (viewer, stamp, dumps(_self_base(viewer, ctx, now)))
        base = hit[2]
        # The base is a JSON object with at least an ID: "}" ends it, CapMap goes before.
        return orjson.Fragment(b"".join((base[:-1], b',"CapMap":',
                                         dumps(self_capmap(viewer, ctx)), b"}")))

    def forget(self, node_id: int) -> None:
        self._entries.pop(node_id, None)
        self._selves.pop(node_id, None)


def user_profile(user: User) -> dict[str, Any]:
    """tailcfg.UserProfile as Headscale builds it (``TailscaleUserProfile``)."""
    login = user.email or user.name or (user.provider_identifier or "") or str(user.id)
    out: dict[str, Any] = {
        "ID": user.id,
        "LoginName": login,
        "DisplayName": user.display_name or login,
    }
    if user.profile_pic_url:
        out["ProfilePicURL"] = user.profile_pic_url
    return out


def profile_owner(node: Node) -> int | None:
    """The UserProfile ID a node shows: its user's, or tagged-devices'."""
    return TAGGED_DEVICES_USER_ID if node.is_tagged else node.user_id


def user_profiles(owners: Iterable[Node], users: Mapping[int, User]) -> list[dict[str, Any]]:
    """Profiles of the given nodes' owners, by ID; tagged nodes map to "tagged-devices"."""
    return profiles_of({profile_owner(n) for n in owners}, users)


def profiles_of(ids: Iterable[int | None], users: Mapping[int, User]) -> list[dict[str, Any]]:
    """Profiles for profile IDs (from ``profile_owner``), by ID; unknown users are left out."""
    found: dict[int, dict[str, Any]] = {}
    for uid in ids:
        if uid is None or uid in found:
            continue
        if uid == TAGGED_DEVICES_USER_ID:
            found[uid] = TAGGED_DEVICES_PROFILE
        else:
            u = users.get(uid)
            if u is not None:
                found[uid] = user_profile(u)
    return [dict(found[k]) for k in sorted(found)]


def _node_iter(nodes: Mapping[int, Node] | Iterable[Node]) -> Iterable[Node]:
    return nodes.values() if isinstance(nodes, Mapping) else nodes


def _user_map(users: Mapping[int, User] | Iterable[User]) -> Mapping[int, User]:
    return users if isinstance(users, Mapping) else {u.id: u for u in users}


def visible_peers(
    nodes: Mapping[int, Node] | Iterable[Node], viewer: Node, ctx: MapContext
) -> list[Node]:
    """Peers the viewer may see, sorted by ID, never the viewer itself
    (a client that sees itself among its peers misbehaves).

    Expired peers stay (with Expired=true), as in Headscale.
    """
    can_see = ctx.policy.can_see
    peers = [n for n in _node_iter(nodes) if n.id != viewer.id and can_see(viewer, n)]
    peers.sort(key=lambda n: n.id)
    return peers


def map_head(viewer: Node, ctx: MapContext, now: datetime,
             profiles: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything of a full MapResponse but its Peers (which, when any, come last)."""
    resp: dict[str, Any] = {
        "ControlTime": format_time(now),
        "Node": self_node(viewer, ctx, now),
        "DERPMap": ctx.derp_fragment,
        "CollectServices": False,
        "DNSConfig": ctx.dns_fragment,
        "PacketFilter": list(ctx.policy.packet_filter(viewer)),  # [] would mean deny-all
        "UserProfiles": profiles,
    }
    domain = ctx.map_domain
    if domain:
        resp["Domain"] = domain
    if not ctx.logtail:
        resp["Debug"] = {"DisableLogTail": True}
    if 0 < viewer.capver < AUTO_UPDATE_CAP_CAPVER:
        # Headscale sends only the cap, which these clients ignore (auto_update.enabled).
        resp["DefaultAutoUpdate"] = ctx.auto_update
    ssh = ctx.policy.ssh_policy(viewer)
    if ssh and ssh.get("rules"):  # tailcfg.SSHPolicy's JSON name is "rules"
        resp["SSHPolicy"] = ssh
    return resp


def full_map_and_peers(
    nodes: Mapping[int, Node] | Iterable[Node],
    users: Mapping[int, User] | Iterable[User],
    viewer: Node,
    ctx: MapContext,
    now: datetime,
    cache: PeerCache | None = None,
) -> tuple[dict[str, Any], KnownPeers]:
    """The full MapResponse and the peers it carries with their views (the stream's known
    peers).

    The map sessions send the same response through mapper/firstmap.py, which shares the
    encoding of runs of peers between viewers; this is its reference."""
    cache = cache if cache is not None else PeerCache()
    users = _user_map(users)
    peers = visible_peers(nodes, viewer, ctx)
    legacy = 0 < viewer.capver < HOME_DERP_CAPVER
    resp = map_head(viewer, ctx, now, user_profiles([viewer, *peers], users))
    known = KnownPeers()
    entries = []
    hidden = ctx.ipv4_disabled
    for p in peers:
        # peer_view's common case inline: a peer without routes, nobody's IPv4 hidden.
        view = peer_view(viewer, p, ctx) if p.approved_routes or hidden else PLAIN_VIEW
        known[p.id] = view
        entries.append(cache.get(p, ctx, now, legacy_derp=legacy, view=view))
    if entries:  # an empty Peers would mean "unchanged": omit instead
        resp["Peers"] = entries
    return resp, known


def full_map(
    nodes: Mapping[int, Node] | Iterable[Node],
    users: Mapping[int, User] | Iterable[User],
    viewer: Node,
    ctx: MapContext,
    now: datetime,
    cache: PeerCache | None = None,
) -> dict[str, Any]:
    """The first MapResponse of a stream for ``viewer``."""
    return full_map_and_peers(nodes, users, viewer, ctx, now, cache)[0]
