"""Which of a peer's routes a viewer is sent: "only routes a node may use are sent to it".

Headscale 0.26+ (state.RoutesForPeer) and the hosted control plane agree on the rule, which
the policy captures confirm viewer by viewer:

* a peer offers its elected primary subnet routes and its approved exit routes;
* a viewer gets those it may use under its own matchers (`Evaluation.route_users`);
* `via` grants steer a prefix per viewer: for a viewer matching a via grant's sources, a
  peer carrying one of the via tags offers the grant's destinations that overlap its subnet
  routes even when it is not the global primary, and peers without the tag do not offer
  them. Among several via-tagged routers of one prefix the lowest node ID serves it (an
  election scoped to the tag). When a regular grant of the viewer also covers the prefix,
  the global HA primary wins instead. A via grant to autogroup:internet steers exit routes
  the same way; only a regular grant to the Internet itself (autogroup:internet or "*")
  undoes that, not one that merely reaches an exit node's address (Headscale lets any IPv4
  destination "overlap" 0.0.0.0/0 there; no capture covers it);
* a viewer that serves a prefix itself sees which peer is its primary (co-router view).

Route permissions are bitmasks over the snapshot's nodes (one per prefix) and via results
are memoised by the set of grants a viewer matches, so the per-pair work is a few bit tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pyheadscale.policy.compile import NodeInfo, Resolver
from pyheadscale.policy.evaluate import Evaluation
from pyheadscale.policy.ipset import IPNetwork
from pyheadscale.policy.model import Grant, Policy


def _is_exit(r: IPNetwork) -> bool:
    return r.prefixlen == 0


def _overlaps(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version and a.overlaps(b)


@dataclass
class _GrantRoutes:
    """One grant as route steering reads it: who it is for and which prefixes it names."""

    viewers: int  # bitmask of snapshot positions whose addresses its sources hold
    dsts: list[IPNetwork]
    internet: bool  # autogroup:internet among the destinations
    everything: bool  # destinations that reach the Internet: autogroup:internet or "*"
    via: tuple[str, ...]


@dataclass
class _Via:
    include: list[IPNetwork] = field(default_factory=list)
    exclude: list[IPNetwork] = field(default_factory=list)
    use_primary: list[IPNetwork] = field(default_factory=list)


def _compile(pol: Policy, res: Resolver, infos: Sequence[NodeInfo]) -> list[_GrantRoutes]:
    out = []
    grants: list[Grant] = pol.all_grants()
    for g in grants:
        srcs = [ips for s in g.src if (ips := res.resolve(s)) is not None]
        viewers = 0
        for i, n in enumerate(infos):
            if any(s.contains_any(n.ips) for s in srcs):
                viewers |= 1 << i
        dsts: list[IPNetwork] = []
        internet = wildcard = False
        for d in g.dst:
            if d.text == "autogroup:internet":
                internet = True
                continue
            wildcard = wildcard or d.kind == "wildcard"
            ips = res.resolve(d)
            if ips is not None:
                dsts.extend(ips.prefixes())
        out.append(_GrantRoutes(viewers, dsts, internet, internet or wildcard, tuple(g.via)))
    return out


class RouteSteering:
    """Per-viewer route sets for one policy snapshot."""

    def __init__(self, pol: Policy | None, res: Resolver, ev: Evaluation) -> None:
        self.ev = ev
        # Steering needs every grant resolved against every node, only when a via grant exists.
        steer = pol is not None and any(g.via for g in pol.grants or ())
        self.grants = _compile(pol, res, ev.infos) if pol is not None and steer else []
        self._via_memo: dict[tuple[tuple[int, ...], int], _Via] = {}
        # tag -> node IDs carrying it, for the via-scoped election
        self._tagged: dict[str, list[NodeInfo]] = {}
        for n in ev.infos:
            for t in n.tags:
                self._tagged.setdefault(t, []).append(n)

    def routes_for_peer(
        self, viewer: NodeInfo, peer: NodeInfo, primaries: Sequence[IPNetwork]
    ) -> list[IPNetwork]:
        """The routes `peer` offers to `viewer` (subnet and exit), in no particular order."""
        if not primaries and not peer.exit_routes and not (self.grants and peer.subnet_routes):
            return []
        pos = self.ev.position(viewer.id)
        if pos is None or viewer.id == peer.id:
            return []
        bit = 1 << pos
        offered = [*primaries, *peer.exit_routes]
        via = self._via(pos, peer) if self.grants else None
        if via is None or not (via.include or via.exclude):
            out = [r for r in offered if self.ev.route_users(r) & bit]
        else:
            out = [r for r in offered
                   if r not in via.exclude and self.ev.route_users(r) & bit]
            for p in via.include:
                if p in out:
                    continue
                # Primary: always; not primary: only when no regular grant defers it to HA.
                if p in primaries or p not in via.use_primary:
                    out.append(p)
        for p in primaries:  # co-routers learn which peer is primary for their prefix
            if p in viewer.subnet_routes and p not in out:
                out.append(p)
        return out

    def _via(self, pos: int, peer: NodeInfo) -> _Via:
        bit = 1 << pos
        matched = tuple(i for i, g in enumerate(self.grants) if g.viewers & bit)
        key = (matched, peer.id)
        hit = self._via_memo.get(key)
        if hit is None:
            hit = self._via_memo[key] = self._compute_via(matched, peer)
        return hit

    def _compute_via(self, matched: tuple[int, ...], peer: NodeInfo) -> _Via:
        """Headscale's ViaRoutesForPeer for a viewer matching the grants `matched`."""
        res = _Via()
        via_grants = [self.grants[i] for i in matched if self.grants[i].via]
        for g in via_grants:
            hits = [r for d in g.dsts for r in peer.subnet_routes if _overlaps(d, r)]
            if g.internet and peer.is_exit:
                hits.extend(peer.exit_routes)
            if not hits:
                continue
            if any(t in peer.tags for t in g.via):
                res.include.extend(hits)
            else:
                res.exclude.extend(hits)
        if not (res.include or res.exclude):
            return res
        for g in via_grants:
            for d in g.dsts:
                for p in list(res.include):
                    if not _overlaps(d, p):
                        continue
                    winner = self._via_primary(g.via, p)
                    if winner is not None and winner != peer.id:
                        res.include = [x for x in res.include if x != p]
                        if p not in res.exclude:
                            res.exclude.append(p)
        for i in matched:
            g = self.grants[i]
            if g.via:
                continue
            # A regular grant of the viewer covering a prefix hands it back to the global
            # election. Exit routes are covered only by a grant that reaches the Internet
            # (any IPv4 destination "overlaps" 0.0.0.0/0; that must not undo the steering).
            if g.everything:
                res.exclude = [x for x in res.exclude if not _is_exit(x)]
            for d in g.dsts:
                for p in res.include:
                    if not _is_exit(p) and _overlaps(d, p) and p not in res.use_primary:
                        res.use_primary.append(p)
                res.exclude = [x for x in res.exclude if _is_exit(x) or not _overlaps(d, x)]
        return res

    def _via_primary(self, tags: tuple[str, ...], route: IPNetwork) -> int | None:
        """The lowest node ID among the via-tagged nodes serving `route` (online or not,
        as Headscale elects it)."""
        best: int | None = None
        for t in tags:
            for n in self._tagged.get(t, ()):
                if route in n.subnet_routes and (best is None or n.id < best):
                    best = n.id
        return best
