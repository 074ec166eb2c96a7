"""The DstPorts entries of a snapshot's global rule pieces, indexed by address.

"Which entries does this node serve" must be a few lookups (policy/evaluate.py), and the
index is rebuilt with every snapshot: after a policy set, and after every node change the
policy reads (a tag set). At 1,000 nodes a 200-rule policy has ~110,000 entries (a rule
naming a user or autogroup:member lists every node's address), so the build must not cost
a Python step per entry:

* each distinct DstPorts list is parsed once and the parse is handed to the next
  snapshot (``PieceParses``), since a node change leaves most rules' destinations as
  they were;
* single addresses (almost every entry) go into two flat arrays sorted once by address (a
  C sort), looked up by bisection; only ranges and prefixes get the segment table.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Sequence
from itertools import repeat
from operator import itemgetter
from typing import Any

from pyheadscale.policy.compile import NodeInfo
from pyheadscale.policy.ipset import THE_INTERNET, parse_wire

__all__ = ["EntryIndex", "PieceParses", "wire"]

Rule = dict[str, Any]
Ranges = tuple[tuple[int, int], ...]

_wire_cache: dict[str, tuple[Ranges, bool] | None] = {}


def wire(text: str) -> tuple[Ranges, bool] | None:
    """(ranges, subset of the Internet) of a FilterRule address string; None if bad."""
    hit = _wire_cache.get(text, False)
    if hit is not False:
        return hit  # type: ignore[return-value]
    s = parse_wire(text)
    out = None if s is None else (s.ranges, s.issubset(THE_INTERNET))
    if len(_wire_cache) > 200_000:
        _wire_cache.clear()
    _wire_cache[text] = out
    return out


_point_cache: dict[str, int | None] = {}


def _point(text: str) -> int | None:
    """The address of a FilterRule address string naming a single address outside the
    Internet (a node address, as almost every entry is), else None."""
    w = wire(text)
    if w is None or w[1] or len(w[0]) != 1 or w[0][0][0] != w[0][0][1]:
        return None
    return w[0][0][0]


class _Parse:
    """One piece's DstPorts by address; indexes are positions in its DstPorts list. Almost
    every entry is a single address: those are found with C-level passes (map, filtered
    comprehensions); only the rest are parsed one by one."""

    __slots__ = ("points", "point_at", "wide", "internet")

    def __init__(self, ips: Sequence[str]) -> None:
        cache = _point_cache
        if len(cache) > 200_000:
            cache.clear()
        for text in ips:
            if text not in cache:
                cache[text] = _point(text)
        keys = list(map(cache.__getitem__, ips))
        # Single addresses (the address ints the wire cache holds) and their entries (as
        # machine words: a large tailnet's parses hold millions, kept between snapshots).
        self.points: list[int] = [k for k in keys if k is not None]
        self.point_at = array("l", [i for i, k in enumerate(keys) if k is not None])
        self.wide: list[tuple[int, int, int]] = []  # (lo, hi, entry) of wider ranges
        self.internet: list[int] = []  # entries covering the Internet (exit nodes serve them)
        for i in [i for i, k in enumerate(keys) if k is None]:
            w = wire(ips[i])
            if w is None:
                continue
            ranges, internet = w
            for lo, hi in ranges:
                if lo == hi:  # a public address (an exit node serves it)
                    self.points.append(lo)
                    self.point_at.append(i)
                else:
                    self.wide.append((lo, hi, i))
            if internet:
                self.internet.append(i)


_ip = itemgetter("IP")


class PieceParses:
    """Parses of rule pieces' DstPorts by their addresses, handed from one snapshot to the
    next. A node change recompiles a few grants (policy/memo.py), and many of those keep
    their destinations (only their sources changed): both reuse their parse. Each
    ``EntryIndex`` build keeps only what it used."""

    def __init__(self) -> None:
        self._by_ips: dict[tuple[str, ...], _Parse] = {}
        self._used: dict[tuple[str, ...], _Parse] = {}

    def get(self, dsts: Sequence[dict[str, Any]]) -> _Parse:
        ips = tuple(map(_ip, dsts))
        parse = self._by_ips.get(ips) or self._used.get(ips)
        if parse is None:
            parse = _Parse(ips)
        self._used[ips] = parse
        return parse

    def build_done(self) -> None:
        """Forget every parse the last build did not use."""
        self._by_ips, self._used = self._used, {}


def _take(values: Sequence[int], order: Sequence[int]) -> list[int]:
    if len(order) < 2:
        return [values[i] for i in order]
    return list(itemgetter(*order)(values))


class EntryIndex:
    """Entry IDs (positions in entry order: pieces in order, each piece's DstPorts in order)
    by the addresses they contain; ``label[eid]`` (its piece's) and ``dp[eid]`` give the
    entry back."""

    def __init__(self, pieces: Sequence[tuple[int, Rule]], parses: PieceParses) -> None:
        """pieces: (label, rule) of the pieces with DstPorts, in order."""
        self.label: list[int] = []
        self.dp: list[dict[str, Any]] = []
        # First entry ID of each piece: an entry's piece, hence its rule position, is found
        # by bisection (one DstPorts dict may sit in several pieces, so never by identity).
        self.piece_start: list[int] = []
        keys: list[int] = []
        eids: list[int] = []
        self.wide: dict[tuple[int, int], list[int]] = {}
        self.internet: list[int] = []
        for label, rule in pieces:
            dsts = rule["DstPorts"]
            p = parses.get(dsts)
            base = len(self.dp)
            self.piece_start.append(base)
            keys.extend(p.points)
            eids.extend(map(base.__add__, p.point_at))
            for lo, hi, i in p.wide:
                self.wide.setdefault((lo, hi), []).append(base + i)
            self.internet.extend(map(base.__add__, p.internet))
            self.label.extend(repeat(label, len(dsts)))
            self.dp.extend(dsts)
        parses.build_done()
        order = sorted(range(len(keys)), key=keys.__getitem__)
        self._keys = _take(keys, order)
        # Stable sort: one address's entries stay in order. Kept as machine words: entry IDs
        # are mostly distinct ints above the small-int cache, 28 bytes each as objects.
        self._eids = array("l", _take(eids, order))
        # Elementary segments between the wide ranges' edges, each listing the entry lists
        # of the ranges covering it: a point query is one bisect.
        bounds = sorted({lo for lo, _ in self.wide} | {hi + 1 for _, hi in self.wide})
        segments: list[list[list[int]]] = [[] for _ in bounds]
        for (lo, hi), ids in self.wide.items():
            for i in range(bisect.bisect_left(bounds, lo), bisect.bisect_left(bounds, hi + 1)):
                segments[i].append(ids)
        self._bounds = bounds
        self._segments = segments

    def hits(self, node: NodeInfo) -> set[int]:
        out: set[int] = set()
        keys, eids = self._keys, self._eids
        for k in node.keys:
            i = bisect.bisect_left(keys, k)
            j = bisect.bisect_right(keys, k, i)
            if i < j:
                out.update(eids[i:j])
            s = bisect.bisect_right(self._bounds, k) - 1
            if s >= 0:
                for ids in self._segments[s]:
                    out.update(ids)
        for lo, hi in node.route_ranges:
            out.update(eids[bisect.bisect_left(keys, lo):bisect.bisect_right(keys, hi)])
            for (wlo, whi), ids in self.wide.items():
                if wlo <= hi and lo <= whi:
                    out.update(ids)
        if node.is_exit:
            out.update(self.internet)
        return out
