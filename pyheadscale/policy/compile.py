"""Pure policy compiler: (policy, users, nodes) -> per-node packet filters and visibility.

Follows Headscale 0.29's grant compiler: ACLs become grants; each grant compiles once to
global FilterRules, except autogroup:self and via grants, which need per-node work. A
node's filter is its rules reduced to the destinations it serves (its own addresses, its
approved subnet routes, or the Internet when it is an approved exit node).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, cast

from pyheadscale.policy.ipset import (
    ALL_IPS,
    ALL_V4,
    ALL_V6,
    THE_INTERNET,
    WILDCARD,
    IPSet,
    addr_key,
    is_exit_route,
    parse_wire,
)
from pyheadscale.policy.model import (
    ANY_PORT,
    Alias,
    Grant,
    Policy,
    PortRange,
    ProtocolPort,
    parse_alias,
)
from pyheadscale.state.model import Node, User

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

CAP_DRIVE = "tailscale.com/cap/drive"
CAP_DRIVE_SHARER = "tailscale.com/cap/drive-sharer"
CAP_RELAY = "tailscale.com/cap/relay"
CAP_RELAY_TARGET = "tailscale.com/cap/relay-target"
COMPANION_CAPS = ((CAP_DRIVE, CAP_DRIVE_SHARER), (CAP_RELAY, CAP_RELAY_TARGET))

FILTER_ALLOW_ALL: list[dict[str, Any]] = [
    {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}
]

# What the hosted control plane compiles when a policy has neither acls nor grants.
_IMPLICIT_ALLOW = Grant(
    src=[parse_alias("*")], dst=[parse_alias("*")], ip=[ProtocolPort("", (ANY_PORT,))]
)


@dataclass
class NodeInfo:
    """The policy-relevant facts of one node, precomputed."""

    node: Node
    id: int
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address]
    ipset: IPSet
    tags: frozenset[str]
    user_id: int | None
    subnet_routes: list[IPNetwork]
    exit_routes: list[IPNetwork]
    # IPSet keys of ips and ranges of subnet_routes: what the evaluation index looks up.
    keys: tuple[int, ...] = ()
    route_ranges: tuple[tuple[int, int], ...] = ()

    @property
    def is_tagged(self) -> bool:
        return bool(self.tags)

    @property
    def is_exit(self) -> bool:
        return bool(self.exit_routes)

    @classmethod
    def of(cls, node: Node) -> NodeInfo:
        ips = node.addresses
        approved = set(node.approved_routes)
        subnet: list[IPNetwork] = []
        exits: list[IPNetwork] = []
        for r in node.announced_routes:
            if r in approved:
                (exits if is_exit_route(r) else subnet).append(r)
        return cls(
            node=node,
            id=node.id,
            ips=list(ips),
            ipset=IPSet.of(ips),
            tags=frozenset(node.tags),
            user_id=None if node.tags else node.user_id,
            subnet_routes=subnet,
            exit_routes=exits,
            keys=tuple(addr_key(ip) for ip in ips),
            route_ranges=tuple(IPSet.of([r]).ranges[0] for r in subnet),
        )


class _RangesByText:
    """The ranges of FilterRule address strings by text, kept for the strings recent compiles
    used: a rule naming a user lists every address of its nodes, and a tag change recompiles
    the matchers of every rule whose lists changed. Two generations: a string used in this
    one stays (moved up from the last); when new strings outnumber reused ones by `floor`,
    the last generation (strings unused since) goes. Addresses are allocated sequentially, so
    churning nodes bring new strings forever: this keeps the cache near what compiles use.
    Several threads compile at once: the pair is replaced whole, dicts are read with .get."""

    def __init__(self, floor: int = 4096) -> None:
        self._gens: tuple[dict[str, tuple[tuple[int, int], ...]],
                          dict[str, tuple[tuple[int, int], ...]]] = ({}, {})
        self._floor = floor
        self._kept = 0
        self._new = 0

    def __len__(self) -> int:
        young, old = self._gens
        return len(young) + len(old)

    def ranges(self, texts: Sequence[str]) -> list[tuple[int, int]]:
        young, old = self._gens
        got = list(map(young.get, texts))
        if None in got:
            for i, t in enumerate(texts):
                if got[i] is None:
                    r = old.get(t)
                    if r is None:
                        w = parse_wire(t)
                        r = w.ranges if w is not None else ()
                        self._new += 1
                    else:
                        self._kept += 1
                    got[i] = young[t] = r
            if self._new > self._kept + self._floor:
                self._gens = ({}, young)
                self._kept = self._new = 0
        return list(chain.from_iterable(cast(list[tuple[tuple[int, int], ...]], got)))


_ranges_of_text = _RangesByText()
_wire_ranges = _ranges_of_text.ranges


@dataclass
class Matcher:
    srcs: IPSet
    dests: IPSet
    dests_internet: bool

    @classmethod
    def of(cls, rule: dict[str, Any]) -> Matcher:
        srcs = IPSet(_wire_ranges(rule.get("SrcIPs") or ()))
        texts = [d["IP"] for d in rule.get("DstPorts") or ()]
        for cg in rule.get("CapGrant") or ():
            texts.extend(cg["Dsts"])
        # Each address once: DstPorts name an address once per port range, and the ranges'
        # merge is a Python loop over all it is given (dict.fromkeys runs in C).
        dests = IPSet(_wire_ranges(list(dict.fromkeys(texts))))
        internet = (
            dests.contains_prefix(ALL_V4)
            or dests.contains_prefix(ALL_V6)
            or THE_INTERNET.issubset(dests)
        )
        return cls(srcs, dests, internet)


def can_access(src: NodeInfo, dst: NodeInfo, matchers: Iterable[Matcher]) -> bool:
    for m in matchers:
        if not (
            m.srcs.contains_any(src.ips)
            or any(m.srcs.overlaps_prefix(r) for r in src.subnet_routes)
        ):
            continue
        if m.dests.contains_any(dst.ips):
            return True
        if any(m.dests.overlaps_prefix(r) for r in dst.subnet_routes):
            return True
        if dst.is_exit and m.dests_internet:
            return True
    return False


@dataclass
class CompiledGrant:
    category: str  # "regular", "self" or "via"
    rules: list[dict[str, Any]] = field(default_factory=list)
    # autogroup:self
    self_srcs: list[IPSet] = field(default_factory=list)
    ip: list[ProtocolPort] = field(default_factory=list)
    app: dict[str, list[Any]] | None = None
    # via
    via_tags: list[str] = field(default_factory=list)
    via_dsts: list[IPNetwork] = field(default_factory=list)
    via_internet: bool = False
    via_src_strings: list[str] = field(default_factory=list)


def _ports(pr: PortRange) -> dict[str, int]:
    return {"First": pr.first, "Last": pr.last}


class Resolver:
    """Resolves aliases to address sets against one snapshot of users and nodes."""

    def __init__(
        self,
        pol: Policy,
        users: Sequence[User],
        nodes: Sequence[NodeInfo],
        idp_groups: Mapping[str, frozenset[int]] | None = None,
    ) -> None:
        self.pol = pol
        self.users = list(users)
        # group name -> user IDs from the IdP (policy/idpgroups.py); used for undefined groups.
        self.idp_groups = idp_groups or {}
        self.nodes = list(nodes)
        self._cache: dict[str, IPSet | None] = {}
        self._routes: list[str] | None = None
        self._by_user: dict[int, list[IPSet]] | None = None  # see _user_nodes
        self.atoms = frozenset(k for n in self.nodes for k in n.keys)
        # Renderings of the same sets recur across rules (one alias in many ACLs).
        self._strings: dict[tuple[tuple[int, int], ...], list[str]] = {}
        self._prefix_strings: dict[tuple[tuple[int, int], ...], list[str]] = {}
        # DstPorts entries by (First, Last) and address: one alias's addresses recur in many
        # rules (a 200-rule policy on 1,000 nodes has ~180,000 entries but a few thousand
        # distinct ones). Entries are never mutated, and nothing keys on their identity.
        self._entries: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
        # autogroup:self rules depend only on the owner: (grant id, user id) -> rules.
        self.self_rules: dict[tuple[int, int], list[dict[str, Any]]] = {}
        # SSH rules' node-independent parts (policy/ssh.py): (rule id, base URL) -> them.
        self.ssh_rules: dict[tuple[int, str], Any] = {}

    def adopt_renderings(self, previous: Resolver, max_strings: int) -> None:
        """Take over an earlier snapshot's address renderings (while they hold at most
        max_strings addresses: each change of the address sets adds some, and on a large
        tailnet one rendering is thousands) when its node addresses are these (renderings
        depend on nothing else), with its very atoms object."""
        held = (sum(map(len, previous._strings.values()))
                + sum(map(len, previous._prefix_strings.values()))
                + sum(map(len, previous._entries.values())))
        if held <= max_strings and previous.atoms == self.atoms:
            self.atoms = previous.atoms
            self._strings = previous._strings
            self._prefix_strings = previous._prefix_strings
            self._entries = previous._entries

    def dst_entries(self, ips: Iterable[str], ports: Sequence[PortRange]) -> list[dict[str, Any]]:
        """The DstPorts entries {"IP", "Ports"} of addresses x port ranges (address-major),
        each distinct one a single shared object."""
        maps = []
        for pr in ports:
            m = self._entries.get((pr.first, pr.last))
            if m is None:
                m = self._entries[(pr.first, pr.last)] = {}
            maps.append((m, _ports(pr)))
        # One comprehension (a tag change recompiles rules of tens of thousands of entries):
        # an entry is a non-empty dict, so ``or`` only builds one the map does not hold.
        return [m.get(ip) or m.setdefault(ip, {"IP": ip, "Ports": pd})
                for ip in ips for m, pd in maps]

    def strings(self, ips: IPSet) -> list[str]:
        out = self._strings.get(ips.ranges)
        if out is None:
            out = self._strings[ips.ranges] = ips.strings(self.atoms)
        return list(out)

    def prefix_strings(self, ips: IPSet) -> list[str]:
        """prefix_string() of each of prefixes(ips)."""
        out = self._prefix_strings.get(ips.ranges)
        if out is None:
            out = self._prefix_strings[ips.ranges] = ips.prefix_strings(self.atoms)
        return out

    def prefixes(self, ips: IPSet) -> list[IPNetwork]:
        return ips.prefixes(self.atoms)

    def find_users(self, token: str) -> list[User]:
        """Users a `name@` / e-mail token names; `user:*@domain` names a whole domain."""
        if token.startswith("user:*@"):
            domain = token[len("user:*@") :]
            return [u for u in self.users if u.email and u.email.rpartition("@")[2] == domain]
        trimmed = token[:-1] if token.endswith("@") else token
        for u in self.users:
            if u.provider_identifier and u.provider_identifier == trimmed:
                return [u]
        found = [u for u in self.users if u.email == trimmed or u.name == trimmed]
        if len(found) > 1:
            return []  # ambiguous: Headscale refuses such policies (validate_user_references)
        return found

    def user_ids(self, token: str) -> set[int]:
        return {u.id for u in self.find_users(token)}

    def resolve(self, alias: Alias) -> IPSet | None:
        key = alias.text
        if key in self._cache:
            return self._cache[key]
        out = self._resolve(alias)
        self._cache[key] = out
        return out

    def _user_nodes(self, ids: Iterable[int]) -> IPSet:
        """The addresses of the untagged nodes the users ``ids`` own. The nodes are sorted
        by user once: a policy names tens of users and groups, and a scan of every node
        for each was most of a recompile's alias work on a large tailnet."""
        if self._by_user is None:
            by: dict[int, list[IPSet]] = {}
            for n in self.nodes:
                if not n.is_tagged and n.user_id is not None:
                    by.setdefault(n.user_id, []).append(n.ipset)
            self._by_user = by
        by_user = self._by_user
        return IPSet.union(chain.from_iterable(by_user.get(uid, ()) for uid in ids))

    def _resolve(self, a: Alias) -> IPSet | None:
        if a.kind == "wildcard":
            return WILDCARD
        if a.kind == "prefix":
            assert a.prefix is not None
            return IPSet.of([a.prefix])
        if a.kind == "host":
            net = self.pol.hosts.get(a.text)
            return IPSet.of([net]) if net is not None else None
        if a.kind == "user":
            return self._user_nodes(self.user_ids(a.text))
        if a.kind == "group":
            ids = set()
            members = self.pol.groups.get(a.text)
            if members is None:  # a group the policy defines wins over an IdP group
                ids = set(self.idp_groups.get(a.text, ()))
            for member in members or ():
                ids |= self.user_ids(member)
            return self._user_nodes(ids)
        if a.kind == "tag":
            return IPSet.union(n.ipset for n in self.nodes if a.text in n.tags)
        if a.kind == "autogroup":
            if a.text == "autogroup:internet":
                return THE_INTERNET
            if a.text == "autogroup:member":
                return IPSet.union(n.ipset for n in self.nodes if not n.is_tagged)
            if a.text == "autogroup:tagged":
                return IPSet.union(n.ipset for n in self.nodes if n.is_tagged)
            if a.text == "autogroup:danger-all":
                return ALL_IPS
        return None  # autogroup:self / nonroot need a viewer

    def resolve_all(self, aliases: Iterable[Alias]) -> IPSet:
        return IPSet.union(self.resolve(a) for a in aliases)

    def approved_subnet_routes(self) -> list[str]:
        if self._routes is None:
            seen: dict[str, None] = {}
            for n in self.nodes:
                for r in n.subnet_routes:
                    seen.setdefault(str(r), None)
            self._routes = list(seen)
        return self._routes


def _src_ip_strings(
    merged: IPSet, has_wildcard: bool, has_danger_all: bool, res: Resolver
) -> list[str]:
    if has_danger_all:
        return ["*"]
    out = res.strings(merged)
    if has_wildcard:
        out = out + res.approved_subnet_routes()
    return out


def _companions(
    dst_strings: list[str], src_prefixes: list[IPNetwork], app: dict[str, list[Any]]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for original, companion in COMPANION_CAPS:
        if original in app:
            out.append(
                {
                    "SrcIPs": list(dst_strings),
                    "CapGrant": [
                        {"Dsts": [str(p) for p in src_prefixes], "CapMap": {companion: None}}
                    ],
                }
            )
    return out


def grant_sources(g: Grant, res: Resolver) -> tuple[list[IPSet], list[str]]:
    """A regular grant's resolved sources and its rules' SrcIPs (one list for them all)."""
    resolved: list[IPSet] = []
    non_wild: list[IPSet] = []
    for s in g.src:
        ips = res.resolve(s)
        if ips is not None:
            resolved.append(ips)
            if s.kind != "wildcard":
                non_wild.append(ips)
    has_wildcard = any(s.kind == "wildcard" for s in g.src)
    has_danger = any(s.text == "autogroup:danger-all" for s in g.src)
    merged = IPSet.union(resolved)
    src_strings: list[str] = []
    if merged:
        src_strings = _src_ip_strings(merged, has_wildcard, has_danger, res)
        if has_wildcard and non_wild:
            seen = set(src_strings)
            for ips in non_wild:
                for text in res.strings(ips):
                    if text not in seen:
                        seen.add(text)
                        src_strings.append(text)
    return resolved, src_strings


def compile_grant(g: Grant, res: Resolver) -> CompiledGrant | None:
    if g.via:
        return _compile_via_grant(g, res)
    if any(s.text == "autogroup:self" for s in g.src):
        return None
    resolved, src_strings = grant_sources(g, res)
    if not g.src or not g.dst:
        return None
    if not resolved and g.app is None:
        return None
    cg = CompiledGrant("regular")
    self_dsts = [d for d in g.dst if d.text == "autogroup:self"]
    other = [d for d in g.dst if d.text != "autogroup:self"]
    if other:
        for ipp in g.ip:
            dst_ports = _dst_ports(other, ipp.ports, res)
            if dst_ports and src_strings:
                rule: dict[str, Any] = {"SrcIPs": src_strings, "DstPorts": dst_ports}
                proto = ipp.iana()
                if proto:
                    rule["IPProto"] = proto
                cg.rules.append(rule)
        if g.app is not None:
            cap_grants = []
            dst_strings: list[str] = []
            for d in other:
                ips = res.resolve(d)
                if ips is None:
                    continue
                cap_grants.append({"Dsts": [str(p) for p in res.prefixes(ips)], "CapMap": g.app})
                dst_strings.extend(res.strings(ips))
            if cap_grants:
                src_prefixes = [p for ips in resolved for p in res.prefixes(ips)]
                cg.rules.append({"SrcIPs": list(src_strings), "CapGrant": cap_grants})
                if any(d.kind == "wildcard" for d in other):
                    dst_strings.extend(res.approved_subnet_routes())
                cg.rules.extend(_companions(dst_strings, src_prefixes, g.app))
    if self_dsts:
        cg.category = "self"
        cg.self_srcs = resolved
        cg.ip = g.ip
        cg.app = g.app
    return cg


def _dst_ports(dsts: list[Alias], ports: Sequence[PortRange],
               res: Resolver) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for d in dsts:
        if d.kind == "wildcard":
            out += res.dst_entries(("*",), ports)
            continue
        ips = res.resolve(d)
        if ips is None:
            continue
        if d.text == "autogroup:internet":
            # The hosted plane writes the Internet as address ranges, not prefixes.
            out += res.dst_entries(ips.range_strings(), ports)
            continue
        out += res.dst_entries(res.prefix_strings(ips), ports)
    return out


def _compile_via_grant(g: Grant, res: Resolver) -> CompiledGrant | None:
    if not g.ip or any(s.text == "autogroup:self" for s in g.src):
        return None
    resolved = [ips for s in g.src if (ips := res.resolve(s)) is not None]
    if not resolved:
        return None
    merged = IPSet.union(resolved)
    if not merged:
        return None
    dsts: list[IPNetwork] = []
    internet = False
    for d in g.dst:
        if d.text == "autogroup:internet":
            internet = True
            continue
        ips = res.resolve(d)
        if ips is not None:
            dsts.extend(ips.prefixes())
    return CompiledGrant(
        "via",
        ip=g.ip,
        via_tags=list(g.via),
        via_dsts=dsts,
        via_internet=internet,
        via_src_strings=_src_ip_strings(
            merged,
            any(s.kind == "wildcard" for s in g.src),
            any(s.text == "autogroup:danger-all" for s in g.src),
            res,
        ),
    )


def policy_grants(pol: Policy) -> list[Grant]:
    """The grants a policy compiles to, in order (its ACLs rewritten as grants)."""
    return [_IMPLICIT_ALLOW] if pol.allow_all else pol.all_grants()


def via_app_pairs(pol: Policy, res: Resolver) -> list[tuple[IPSet, set[int]]]:
    """App-only via grants: (sources, ids of the via routers serving the destinations).

    They compile to no packet filter, yet the hosted plane still lets the sources see the
    routers that steer their traffic."""
    out = []
    for g in pol.grants or []:
        if not g.via or g.ip or not g.app:
            continue
        srcs = res.resolve_all(g.src)
        dsts = [
            p
            for d in g.dst
            if (ips := res.resolve(d)) is not None and d.kind != "autogroup"
            for p in ips.prefixes()
        ]
        internet = any(d.text == "autogroup:internet" for d in g.dst)
        routers = set()
        for n in res.nodes:
            if not any(t in n.tags for t in g.via):
                continue
            if any(d.version == r.version and d.overlaps(r) for d in dsts for r in n.subnet_routes):
                routers.add(n.id)
            elif internet and n.is_exit:
                routers.add(n.id)
        if srcs and routers:
            out.append((srcs, routers))
    return out


def compile_node_attrs(pol: Policy | None, res: Resolver) -> dict[int, dict[str, Any]]:
    """nodeAttrs (and randomizeClientPort) as per-node CapMap entries (values null)."""
    out: dict[int, dict[str, Any]] = {}
    if pol is None:
        return out
    if pol.randomize_client_port:
        for n in res.nodes:
            out.setdefault(n.id, {}).setdefault("randomize-client-port", None)
    for na in pol.node_attrs:
        if not na.attr:
            continue
        targets = res.resolve_all(na.target)
        for n in res.nodes:
            if targets.contains_any(n.ips):
                cm = out.setdefault(n.id, {})
                for a in na.attr:
                    cm.setdefault(a, None)
    return out
