"""What one snapshot's compile hands on to the next of the same policy.

A node change (a tag set, a node joining) changes the address sets of a few aliases: the
node's tags, its owner and the groups naming them, autogroup:member/tagged. A grant whose
aliases all resolve as before compiles to the same rules, so it is not compiled again: it
keeps its rule objects, and with them the shared encodings of its source lists and
everything keyed by them. Address renderings are kept while the node addresses stay.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import itemgetter
from typing import Any

from pyheadscale.policy.compile import (
    CompiledGrant,
    Matcher,
    Resolver,
    compile_grant,
    grant_sources,
    policy_grants,
)
from pyheadscale.policy.model import Alias, Grant, Policy

__all__ = ["CompileMemo", "MatcherMemo"]

# Rendered addresses handed on at most (a few tens of MiB).
_KEEP_STRINGS = 1 << 20


def grant_signature(g: Grant, res: Resolver) -> tuple[Any, ...]:
    """Everything compile_grant() reads for g: equal signatures, equal compiled grants. The
    grant itself, its aliases' address sets, the node addresses (renderings list them one by
    one) and, with a wildcard, the approved subnet routes the wildcard adds."""
    def ranges(a: Alias) -> tuple[tuple[int, int], ...] | None:
        ips = res.resolve(a)
        return None if ips is None else ips.ranges

    wild = any(a.kind == "wildcard" for a in (*g.src, *g.dst))
    return (g, tuple(map(ranges, g.src)), tuple(map(ranges, g.dst)), res.atoms,
            tuple(res.approved_subnet_routes()) if wild else None)


def _with_new_sources(g: Grant, hit: tuple[tuple[Any, ...], CompiledGrant | None],
                      sig: tuple[Any, ...], res: Resolver) -> CompiledGrant | None:
    """The previous compile of ``g`` with only its SrcIPs redone, when nothing but its
    sources' address sets changed; None when it must be compiled whole.

    A tag change moves one node out of its user, autogroup:member and their groups, which
    most grants name as sources: their destinations (thousands of DstPorts entries each)
    are what they were, and keeping those lists also keeps their parses (entryindex)."""
    old_sig, old = hit
    if (old is None or old.category != "regular" or old_sig[0] != g or old_sig[2:] != sig[2:]
            or g.via or g.app is not None or len(old.rules) != len(g.ip)
            or any(a.text == "autogroup:self" for a in (*g.src, *g.dst))):
        return None  # app and self grants build more from their sources than SrcIPs
    resolved, src = grant_sources(g, res)
    if not resolved or not src:
        return None  # no rule at all now: compile_grant says which
    # One SrcIPs list for all the grant's rules, as compile_grant builds them (encoders
    # share a long list by its identity); the keys keep their order.
    return CompiledGrant("regular", rules=[{**r, "SrcIPs": src} for r in old.rules])


class CompileMemo:
    """The compiled grants (by position) and resolver of the last snapshot of one policy."""

    def __init__(self) -> None:
        self._grants: dict[int, tuple[tuple[Any, ...], CompiledGrant | None]] = {}
        self._res: Resolver | None = None
        self.compiled = 0  # grants compiled (not reused) over the memo's life
        self.resourced = 0  # grants whose sources alone were compiled again

    def compile_grants(self, pol: Policy, res: Resolver) -> list[CompiledGrant]:
        """compile_grants(pol, res), reusing every grant whose signature did not change."""
        if self._res is not None:
            res.adopt_renderings(self._res, _KEEP_STRINGS)
        self._res = res
        out = []
        grants = policy_grants(pol)
        for i in [i for i in self._grants if i >= len(grants)]:
            del self._grants[i]  # a shorter policy: its old tail would pin dead rules
        for i, g in enumerate(grants):
            sig = grant_signature(g, res)
            hit = self._grants.get(i)
            if hit is not None and hit[0] == sig:
                cg = hit[1]
            else:
                cg = None if hit is None else _with_new_sources(g, hit, sig, res)
                if cg is None:
                    cg = compile_grant(g, res)
                    self.compiled += 1
                else:
                    self.resourced += 1
                self._grants[i] = (sig, cg)
            if cg is not None:
                out.append(cg)
        return out


_ip = itemgetter("IP")


def _matcher_key(rule: dict[str, Any]) -> tuple[Any, ...]:
    """What Matcher.of reads of a rule. Tuples of strings hash in C: a few µs for a list of
    2,000 addresses, against milliseconds to parse and merge it."""
    return (tuple(rule.get("SrcIPs") or ()),
            tuple(map(_ip, rule.get("DstPorts") or ())),
            tuple(p for cg in rule.get("CapGrant") or () for p in cg["Dsts"]))


class MatcherMemo:
    """The global rules' matchers and their (sources, destinations) node masks, handed from
    one snapshot to the next. A node change leaves most merged rules' addresses as they
    were, and while every node keeps its addresses and routes (``layout``: a tag set, a
    user change) their masks stay too. Each ``begin``..``get`` round keeps only what it
    used."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[Any, ...], tuple[Matcher, tuple[int, int] | None]] = {}
        self._used: dict[tuple[Any, ...], tuple[Matcher, tuple[int, int] | None]] = {}
        self._layout: Any = None

    def begin(self, layout: Any) -> None:
        """A new snapshot whose node masks depend on ``layout`` (compared by equality)."""
        if self._used:
            self._by_key, self._used = self._used, {}
        if layout != self._layout:
            self._by_key = {k: (m, None) for k, (m, _) in self._by_key.items()}
            self._layout = layout

    def get(self, rule: dict[str, Any],
            masks_of: Callable[[Matcher], tuple[int, int]]) -> tuple[Matcher, tuple[int, int]]:
        key = _matcher_key(rule)
        hit = self._used.get(key) or self._by_key.get(key)
        m, masks = hit if hit is not None else (Matcher.of(rule), None)
        if masks is None:
            masks = masks_of(m)
        self._used[key] = (m, masks)
        return m, masks
