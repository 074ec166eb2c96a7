"""Per-snapshot evaluation index: every node's packet filter and peer set, fast.

Gives exactly what compile.py's straightforward definitions give (reduce_rules over
node_rules for the filter; pairwise can_access for visibility; policy/reference.py keeps
them for the equivalence tests), but organised so a node's cost follows what it is involved in:

* Filters: every DstPorts entry of the global rule pieces is indexed by its address ranges
  (policy/entryindex.py, built from parses handed across snapshots), so "which entries
  does this node serve" is a few lookups. Entries are numbered in rule order, so
  sorting the hits rebuilds Headscale's rule order; merge groups (same SrcIPs and IPProto)
  are fixed once, and per-node autogroup:self / via pieces are merged in at their grant's
  position.
* Peers: each rule (matcher) gets the node sets, as bitmasks, of its sources and of its
  destinations (kept for the next snapshot while the nodes' addresses stay). A node sees the destinations of rules it is a source of and the sources of
  rules it is a destination of. Per-node rules (autogroup:self, via) come in per class of
  nodes with the same extra rules (one class per user for autogroup:self).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from itertools import chain
from operator import itemgetter
from typing import Any

from pyheadscale.idblocks import SHIFT, IdBlocks, blocks_of
from pyheadscale.policy.compile import (
    CompiledGrant,
    Matcher,
    NodeInfo,
    Resolver,
)
from pyheadscale.policy.entryindex import EntryIndex, PieceParses, wire
from pyheadscale.policy.ipset import IPNetwork, IPSet, parse_wire
from pyheadscale.policy.memo import MatcherMemo
from pyheadscale.policy.noderules import reduce_cap_rule, self_rules, via_rules

Rule = dict[str, Any]
# A rule's position in node_rules order: (grant index, 0 for the grant's own rules and
# 1 for its per-node rules, index within those).
Pos = tuple[int, int, int]

def _rule(group: Rule, dests: list[dict[str, Any]]) -> Rule:
    """A filter rule of a merge group (its SrcIPs and IPProto) with the entries served."""
    r: Rule = {"SrcIPs": group["SrcIPs"], "DstPorts": dests}
    if group.get("IPProto"):
        r["IPProto"] = group["IPProto"]
    return r


def _merge_key(rule: Rule) -> tuple[Any, ...]:
    return (tuple(rule["SrcIPs"]), tuple(rule.get("IPProto") or ()))


def _dests_served(node: NodeInfo, dsts: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """reduce_rules' test for one rule's DstPorts, on precomputed ranges."""
    out = []
    for dp in dsts:
        w = wire(dp["IP"])
        if w is None:
            continue
        ranges, internet = w
        if _serves(node, ranges) or (node.is_exit and internet):
            out.append(dp)
    return out


def _serves(node: NodeInfo, ranges: Sequence[tuple[int, int]]) -> bool:
    for lo, hi in ranges:
        for k in node.keys:
            if lo <= k <= hi:
                return True
        for rlo, rhi in node.route_ranges:
            if lo <= rhi and rlo <= hi:
                return True
    return False


class _NodeSets:
    """Which snapshot nodes an IPSet matches (addresses, or overlapping subnet routes)."""

    def __init__(self, infos: Sequence[NodeInfo]) -> None:
        self.by_key: dict[int, list[int]] = {}
        for i, n in enumerate(infos):
            for k in n.keys:
                self.by_key.setdefault(k, []).append(i)
        self.keys = sorted(self.by_key)
        self.routers = [(i, n) for i, n in enumerate(infos) if n.route_ranges]
        self.exits = _mask_of(i for i, n in enumerate(infos) if n.is_exit)

    def mask(self, s: IPSet) -> int:
        idx: set[int] = set()
        keys = self.keys
        for lo, hi in s.ranges:
            if lo == hi:
                hit = self.by_key.get(lo)
                if hit:
                    idx.update(hit)
                continue
            idx.update(chain.from_iterable(map(self.by_key.__getitem__, keys[
                bisect.bisect_left(keys, lo):bisect.bisect_right(keys, hi)])))
        for i, n in self.routers:
            if i not in idx and any(s._overlaps_range(lo, hi) for lo, hi in n.route_ranges):
                idx.add(i)
        return _mask_of(idx)

    def matcher_masks(self, m: Matcher) -> tuple[int, int]:
        dst = self.mask(m.dests)
        if m.dests_internet:
            dst |= self.exits
        return self.mask(m.srcs), dst


def _mask_of(positions: Iterable[int]) -> int:
    """The bitmask of positions, built as bytes: OR-ing bits one by one into a growing int
    costs O(n) per bit, which on a large tailnet is quadratic."""
    pos = list(positions)
    if not pos:
        return 0
    bits = bytearray(max(pos) // 8 + 1)
    for i in pos:
        bits[i >> 3] |= 1 << (i & 7)
    return int.from_bytes(bits, "little")


class _MaskToIds:
    """Snapshot-position bitmasks -> ID blocks. Positions follow the node list, whose IDs
    mostly ascend in runs (1, 2, 3, ... with gaps where nodes were deleted): each run is one
    shift of the mask, so a set costs O(N / 64) word operations, not one step per peer."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = list(ids)
        runs: list[tuple[int, int, int]] = []  # (first position, length, first ID)
        for pos, nid in enumerate(self.ids):
            if runs and runs[-1][2] + runs[-1][1] == nid and runs[-1][0] + runs[-1][1] == pos:
                p0, n, i0 = runs[-1]
                runs[-1] = (p0, n + 1, i0)
            else:
                runs.append((pos, 1, nid))
        top = max(self.ids, default=0)
        # Shifts pay off while the runs are few and the ID range is not much wider than the
        # node count (an int over IDs costs the highest ID in bits).
        self.runs = runs if len(runs) <= 64 and top <= 8 * len(self.ids) + 4096 else None

    def __call__(self, mask: int) -> IdBlocks:
        if self.runs is None:
            ids = self.ids
            return IdBlocks(blocks_of(ids[j] for j in _bits(mask)))
        acc = 0
        for p0, n, i0 in self.runs:
            part = (mask >> p0) & ((1 << n) - 1)
            if part:
                acc |= part << i0
        width = 1 << (SHIFT - 3)  # bytes per block
        raw = acc.to_bytes((acc.bit_length() + 8 * width - 1) // (8 * width) * width, "little")
        blocks: dict[int, int] = {}
        zero = bytes(width)
        for b in range(len(raw) // width):
            chunk = raw[b * width:(b + 1) * width]
            if chunk != zero:
                blocks[b] = int.from_bytes(chunk, "little")
        return IdBlocks(blocks)


def _bits(mask: int) -> list[int]:
    s = bin(mask)[:1:-1]
    return [i for i, c in enumerate(s) if c == "1"]


class Evaluation:
    """Filters and peer sets of the nodes of one snapshot under one compiled policy.

    pieces: the global rules in node_rules order before merging (FILTER_ALLOW_ALL when
    there is no policy); grants: the compiled grants (for per-node pieces) or [] when none
    is per-node; via_app: via_app_pairs().
    """

    def __init__(
        self,
        infos: Sequence[NodeInfo],
        res: Resolver,
        pieces: Sequence[tuple[Pos, Rule]],
        global_merged: Sequence[Rule],
        grants: Sequence[CompiledGrant],
        via_app: Sequence[tuple[IPSet, set[int]]],
        parses: PieceParses | None = None,
        matchers: MatcherMemo | None = None,
    ) -> None:
        self.infos = list(infos)
        self.res = res
        self.grants = [(i, g) for i, g in enumerate(grants) if g.category != "regular"]
        self.pos_of = {n.id: i for i, n in enumerate(self.infos)}
        self._ids = [n.id for n in self.infos]
        # Pieces and merge groups (same SrcIPs and IPProto), numbered: a merge key holds a
        # whole SrcIPs list, so hashing it per DstPorts entry would cost O(sources) each.
        # group_first: group -> first position; cap rules are groups of their own.
        self.pieces = list(pieces)
        self._gid: dict[Any, int] = {}
        self.group_first: list[Pos] = []
        self.piece_group: list[int] = []
        self.cap_pieces: list[tuple[int, IPSet]] = []
        self.group_rule: list[Rule] = []  # the group's first piece (SrcIPs, IPProto)
        indexed: list[tuple[int, Rule]] = []
        self._indexed_pos: list[Pos] = []  # position of each indexed piece
        for pi, (pos, rule) in enumerate(self.pieces):
            cap = bool(rule.get("CapGrant"))
            if cap:
                key: Any = ("cap", pos)
                dsts = [parse_wire(d) for cg in rule["CapGrant"] for d in cg["Dsts"]]
                self.cap_pieces.append((pi, IPSet.union(dsts)))
            else:
                key = _merge_key(rule)
            gid = self._gid.get(key)
            if gid is None:
                gid = self._gid[key] = len(self.group_first)
                self.group_first.append(pos)
                self.group_rule.append(rule)
            self.piece_group.append(gid)
            if not cap:
                indexed.append((gid, rule))
                self._indexed_pos.append(pos)
        # Entries are labelled with their merge group: all a filter needs of an entry.
        self.index = EntryIndex(indexed, parses if parses is not None else PieceParses())
        # Peers: global matchers' node masks, and the inverse (matchers per node).
        self.nodesets = _NodeSets(self.infos)
        self.global_rules = list(global_merged)
        self._by_key = {_merge_key(r): r for r in self.global_rules if not r.get("CapGrant")}
        n = len(self.infos)
        self._src_of: list[list[int]] = [[] for _ in range(n)]
        self._dst_of: list[list[int]] = [[] for _ in range(n)]
        self._gmasks: list[tuple[int, int]] = []
        self._gmatchers: list[Matcher] = []
        memo = matchers if matchers is not None else MatcherMemo()
        memo.begin(tuple((i.keys, i.route_ranges, i.is_exit) for i in self.infos))
        for mi, rule in enumerate(self.global_rules):
            matcher, (sm, dm) = memo.get(rule, self.nodesets.matcher_masks)
            self._gmatchers.append(matcher)
            self._gmasks.append((sm, dm))
            for i in _bits(sm):
                self._src_of[i].append(mi)
            for i in _bits(dm):
                self._dst_of[i].append(mi)
        self._via: list[tuple[int, int]] = []
        for srcs, routers in via_app:
            sm = _mask_of(i for i, info in enumerate(self.infos) if srcs.contains_any(info.ips))
            rm = _mask_of(self.pos_of[rid] for rid in routers if rid in self.pos_of)
            self._via.append((sm, rm))
        self._sig_masks: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        self._mask_ids: dict[int, IdBlocks] = {}
        self._to_ids = _MaskToIds(self._ids)
        self._classes: dict[Any, _Class] | None = None
        self._by_hits: dict[tuple[int, ...], list[Rule]] = {}
        self._hits_seen: set[int] = set()  # hashes of entry sets asked for once so far
        self._class_of: list[Any] = []
        self._route_users: dict[IPNetwork, int] = {}

    # ------------------------------------------------------------------ per-node pieces

    def _extra_pieces(self, node: NodeInfo) -> list[tuple[Pos, Rule]]:
        out: list[tuple[Pos, Rule]] = []
        for gi, g in self.grants:
            rules = (
                self_rules(g, node, self.res) if g.category == "self" else via_rules(g, node)
            )
            out.extend(((gi, 1, j), r) for j, r in enumerate(rules))
        return out

    def _class_key(self, node: NodeInfo) -> Any:
        """Nodes with equal keys get equal per-node pieces."""
        uid = None if node.is_tagged else node.user_id
        via = None
        if any(g.category == "via" and any(t in node.tags for t in g.via_tags)
               for _, g in self.grants):
            via = (node.tags, tuple(node.route_ranges), node.is_exit)
        return (uid, via)

    # ------------------------------------------------------------------ packet filter

    def packet_filter(self, node: NodeInfo) -> list[Rule]:
        """reduce_rules(node, node_rules(...)) for a snapshot node."""
        return self.filter_kept(node)[0]

    def filter_kept(self, node: NodeInfo) -> tuple[list[Rule], bool]:
        """``packet_filter`` and whether the list is kept here (shared by nodes serving the
        same entries): a caller caching per node should cache only those."""
        # group -> [first position, first rule, served DstPorts]; the DstPorts come in
        # entry order, which is node_rules order for the global pieces.
        hits = tuple(sorted(self.index.hits(node)))
        extras = self._extra_pieces(node) if self.grants else []
        caps = self._caps(node)
        if not extras and not caps:
            # The filter then follows from the entries served alone: nodes serving the same
            # ones (most nodes of a user or tag) share one list, built once. A list is kept
            # from the second node that asks for it: a filter only one node has (its own
            # addresses in the DstPorts) is garbage once its frame is encoded. Kept, it is
            # ~75 container objects per node that survive into the GC's oldest generation,
            # and at 1,000 nodes one fan-out of them set off a full collection (~0.1 s).
            shared = self._by_hits.get(hits)
            if shared is not None:
                return shared, True
            key = hash(hits)  # a collision only keeps a list early
            if key not in self._hits_seen:
                self._hits_seen.add(key)
                return self._filter_of(hits, node, [], []), False
            shared = self._by_hits[hits] = self._filter_of(hits, node, [], [])
            return shared, True
        return self._filter_of(hits, node, caps, extras), False

    def _caps(self, node: NodeInfo) -> list[tuple[Pos, Rule]]:
        caps: list[tuple[Pos, Rule]] = []
        for pi, dsts in self.cap_pieces:
            if dsts.contains_any(node.ips) or any(
                dsts._overlaps_range(lo, hi) for lo, hi in node.route_ranges
            ):
                pos, rule = self.pieces[pi]
                reduced = reduce_cap_rule(node, rule)
                if reduced is not None:
                    caps.append((pos, reduced))
        return caps

    def _filter_of(self, hits: Sequence[int], node: NodeInfo, caps: list[tuple[Pos, Rule]],
                   extras: list[tuple[Pos, Rule]]) -> list[Rule]:
        groups: dict[Any, list[Any]] = {}
        group_first, group_rule = self.group_first, self.group_rule
        if not caps and not extras:
            if len(hits) > 1:  # one C call each for the hits' groups and entries
                take = itemgetter(*hits)
                pairs: Iterable[tuple[int, dict[str, Any]]] = zip(
                    take(self.index.label), take(self.index.dp), strict=True)
            else:
                pairs = [(self.index.label[e], self.index.dp[e]) for e in hits]
            # Global groups only: group numbers follow first positions (pieces come in
            # order), so sorting the numbers is Headscale's rule order.
            by_gid: dict[int, list[dict[str, Any]]] = {}
            for gid, dp in pairs:
                dests = by_gid.get(gid)
                if dests is None:
                    by_gid[gid] = [dp]
                else:
                    dests.append(dp)
            return [_rule(group_rule[gid], by_gid[gid]) for gid in sorted(by_gid)]
        # Otherwise each group also keeps its entry IDs: they give the entries' positions.
        label, dp_of = self.index.label, self.index.dp
        for eid in hits:
            gid = label[eid]
            g = groups.get(gid)
            if g is None:
                groups[gid] = [group_first[gid], group_rule[gid], [dp_of[eid]], [eid]]
            else:
                g[2].append(dp_of[eid])
                g[3].append(eid)
        if extras:
            self._merge_extras(node, groups, caps, extras)
        out: list[tuple[Pos, Rule]] = list(caps)
        for first, rule, dests, _ in groups.values():
            if dests:
                out.append((first, _rule(rule, dests)))
        out.sort(key=lambda x: x[0])
        return [r for _, r in out]

    def _merge_extras(self, node: NodeInfo, groups: dict[Any, list[Any]],
                      caps: list[tuple[Pos, Rule]], extras: list[tuple[Pos, Rule]]) -> None:
        """Merge the node's own pieces into the groups: a per-node piece's DstPorts go
        after those of its grant's global pieces and before later grants' ones."""
        added: dict[Any, list[tuple[Pos, int, dict[str, Any]]]] = {}
        seq = 0
        for pos, rule in extras:
            if rule.get("CapGrant"):
                reduced = reduce_cap_rule(node, rule)
                if reduced is not None:
                    caps.append((pos, reduced))
                continue
            # A merge key no global piece has is its own group (keyed by itself).
            mkey = _merge_key(rule)
            gid = self._gid.get(mkey)
            key = mkey if gid is None else gid
            g = groups.get(key)
            if g is None:
                first = None if gid is None else self.group_first[gid]
                g = groups[key] = [pos if first is None or pos < first else first, rule, [], []]
            elif pos < g[0]:
                g[0], g[1] = pos, rule
            for dp in _dests_served(node, rule["DstPorts"]):
                added.setdefault(key, []).append((pos, seq, dp))
                seq += 1
        for key, adds in added.items():
            g = groups[key]
            if not g[2]:
                g[2] = [dp for _, _, dp in adds]
                continue
            merged = [(self._entry_pos(eid), -1, dp)  # stable: already ordered
                      for eid, dp in zip(g[3], g[2], strict=True)]
            merged.extend(adds)
            merged.sort(key=lambda x: x[0])
            g[2] = [dp for _, _, dp in merged]

    def _entry_pos(self, eid: int) -> Pos:
        """The position of the global piece holding entry ``eid``."""
        return self._indexed_pos[bisect.bisect_right(self.index.piece_start, eid) - 1]

    # ------------------------------------------------------------------ peers

    def peer_set(self, node: NodeInfo) -> IdBlocks:
        """The IDs of the nodes ``node`` sees, possibly with its own: nodes in the same
        position towards the rules (most nodes of one user, of one tag set) share one set, so
        a tailnet holds few of them instead of one per node. Kept as ID blocks (a few ints),
        never as one int object per peer: viewers' sets differ on a large tailnet, and N sets
        of N ints is gigabytes at 10,000 nodes."""
        i = self.pos_of[node.id]
        sig = (tuple(self._src_of[i]), tuple(self._dst_of[i]))
        mask = self._sig_masks.get(sig)
        if mask is None:
            mask = 0
            for mi in sig[0]:
                mask |= self._gmasks[mi][1]
            for mi in sig[1]:
                mask |= self._gmasks[mi][0]
            self._sig_masks[sig] = mask
        bit = 1 << i
        for sm, rm in self._via:
            if sm & bit:
                mask |= rm
            if rm & bit:
                mask |= sm
        if self.grants:
            mask |= self._class_peers(i, bit)
        out = self._mask_ids.get(mask)
        if out is None:
            out = self._mask_ids[mask] = self._to_ids(mask)
        return out

    def peers(self, node: NodeInfo) -> IdBlocks:
        """The IDs of the nodes ``node`` sees (never its own)."""
        return self.peer_set(node).without(node.id)

    # ------------------------------------------------------------------ routes

    def route_users(self, route: IPNetwork) -> int:
        """Bitmask (snapshot positions) of the nodes that may use `route` as a peer route.

        Headscale's CanAccessRoute over each node's own matchers: a rule whose sources hold
        the node (its addresses or subnet routes) and whose destinations overlap the route,
        or a rule whose sources overlap the route and whose destinations the node serves
        (return traffic). Serving includes an exit node's Internet, as the hosted plane
        shows: an exit node reached from `*` gets the routes behind those sources."""
        mask = self._route_users.get(route)
        if mask is not None:
            return mask
        mask = _route_mask(route, self._gmatchers, self._gmasks)
        if self.grants:
            for c in self._ensure_classes().values():
                mask |= _route_mask(route, c.matchers, c.masks) & c.members
        self._route_users[route] = mask
        return mask

    def position(self, node_id: int) -> int | None:
        return self.pos_of.get(node_id)

    def _class_peers(self, i: int, bit: int) -> int:
        classes = self._ensure_classes()
        mask = 0
        own = self._class_of[i]
        for key, c in classes.items():
            for sm, dm in c.masks:
                if sm & bit:
                    mask |= dm if key == own else dm & c.members
                if dm & bit:
                    mask |= sm if key == own else sm & c.members
        return mask

    def _ensure_classes(self) -> dict[Any, _Class]:
        if self._classes is not None:
            return self._classes
        classes: dict[Any, _Class] = {}
        for i, n in enumerate(self.infos):
            key = self._class_key(n)
            self._class_of.append(key)
            c = classes.get(key)
            if c is None:
                c = classes[key] = _Class(self._extra_matchers(n))
            c.members |= 1 << i
        for c in classes.values():
            c.masks = [self.nodesets.matcher_masks(m) for m in c.matchers]
        self._classes = {k: c for k, c in classes.items() if c.masks}
        return self._classes

    def _extra_matchers(self, node: NodeInfo) -> list[Matcher]:
        """Matchers node_rules() has for this node beyond (or wider than) the global ones.

        A merged rule that gained per-node DstPorts has the same sources and more
        destinations than its global counterpart, so it alone stands for both."""
        touched: dict[Any, list[dict[str, Any]]] = {}
        out: list[Matcher] = []
        for _, rule in self._extra_pieces(node):
            if rule.get("CapGrant"):
                out.append(Matcher.of(rule))
                continue
            key = _merge_key(rule)
            if key not in touched:
                base = self._by_key.get(key)
                touched[key] = list(base["DstPorts"]) if base is not None else []
            touched[key].extend(rule["DstPorts"])
        for key, dsts in touched.items():
            src = list(key[0])
            out.append(Matcher.of({"SrcIPs": src, "DstPorts": dsts}))
        return out


def _route_mask(route: IPNetwork, matchers: Sequence[Matcher],
                masks: Sequence[tuple[int, int]]) -> int:
    """Nodes matchers let use `route`: the sources of rules whose destinations overlap it,
    the destinations of rules whose sources overlap it (return traffic)."""
    out = 0
    for m, (sm, dm) in zip(matchers, masks, strict=True):
        if m.dests.overlaps_prefix(route):
            out |= sm
        if m.srcs.overlaps_prefix(route):
            out |= dm
    return out


class _Class:
    __slots__ = ("matchers", "members", "masks")

    def __init__(self, matchers: list[Matcher]) -> None:
        self.matchers = matchers
        self.members = 0
        self.masks: list[tuple[int, int]] = []
