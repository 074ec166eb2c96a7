"""A node's rules: the per-node pieces of autogroup:self and via grants, merging, and the
reduction of a rule list to what one node serves (Headscale's ReduceFilterRules).

compile.py turns each grant into its global rules once; what depends on the node looking
(its user's devices, the routes it steers, the destinations it serves) lives here.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from pyheadscale.policy.compile import (
    CompiledGrant,
    IPNetwork,
    NodeInfo,
    Resolver,
    _companions,
    _ports,
)
from pyheadscale.policy.ipset import THE_INTERNET, IPSet, parse_wire

__all__ = ["global_rules", "has_per_node_grants", "merge_rules", "node_rules",
           "reduce_rules", "reduce_cap_rule", "self_rules", "via_rules"]


def self_rules(cg: CompiledGrant, node: NodeInfo, res: Resolver) -> list[dict[str, Any]]:
    if node.is_tagged or node.user_id is None:
        return []
    key = (id(cg), node.user_id)
    rules = res.self_rules.get(key)
    if rules is None:
        rules = res.self_rules[key] = _user_self_rules(cg, node.user_id, res)
    return rules


def _user_self_rules(cg: CompiledGrant, user_id: int, res: Resolver) -> list[dict[str, Any]]:
    """The autogroup:self rules of grant cg for the devices of one user."""
    same = [n for n in res.nodes if not n.is_tagged and n.user_id == user_id]
    if not same:
        return []
    src = IPSet.union(n.ipset for ips in cg.self_srcs for n in same if ips.contains_any(n.ips))
    if not src:
        return []
    src_strings = res.strings(src)
    rules: list[dict[str, Any]] = []
    for ipp in cg.ip:
        dst_ports = [
            {"IP": str(ip), "Ports": _ports(p)} for n in same for p in ipp.ports for ip in n.ips
        ]
        if dst_ports:
            rule: dict[str, Any] = {"SrcIPs": src_strings, "DstPorts": dst_ports}
            proto = ipp.iana()
            if proto:
                rule["IPProto"] = proto
            rules.append(rule)
    if cg.app is not None:
        cap_grants = []
        dst_strings: list[str] = []
        for n in same:
            cap_grants.append(
                {"Dsts": [str(ipaddress.ip_network(ip)) for ip in n.ips], "CapMap": cg.app}
            )
            dst_strings.extend(str(ip) for ip in n.ips)
        if cap_grants:
            rules.append({"SrcIPs": src_strings, "CapGrant": cap_grants})
            rules.extend(_companions(dst_strings, res.prefixes(src), cg.app))
    return rules


def via_rules(cg: CompiledGrant, node: NodeInfo) -> list[dict[str, Any]]:
    if not any(t in node.tags for t in cg.via_tags):
        return []
    prefixes = [
        d
        for d in cg.via_dsts
        if any(d.version == r.version and d.overlaps(r) for r in node.subnet_routes)
    ]
    if cg.via_internet and node.is_exit:
        prefixes.extend(THE_INTERNET.prefixes())
    if not prefixes:
        return []
    rules = []
    for ipp in cg.ip:
        dst_ports = [{"IP": str(p), "Ports": _ports(pr)} for p in prefixes for pr in ipp.ports]
        if dst_ports:
            rule: dict[str, Any] = {"SrcIPs": cg.via_src_strings, "DstPorts": dst_ports}
            proto = ipp.iana()
            if proto:
                rule["IPProto"] = proto
            rules.append(rule)
    return rules


def merge_rules(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge rules sharing SrcIPs and IPProto (DstPorts concatenated, first position kept)."""
    out: list[dict[str, Any]] = []
    index: dict[tuple[Any, ...], int] = {}
    for r in rules:
        if r.get("CapGrant"):
            out.append(r)
            continue
        key = (tuple(r["SrcIPs"]), tuple(r.get("IPProto") or ()))
        if key in index:
            out[index[key]]["DstPorts"].extend(r["DstPorts"])
        else:
            index[key] = len(out)
            merged = {"SrcIPs": r["SrcIPs"], "DstPorts": list(r["DstPorts"])}
            if r.get("IPProto"):
                merged["IPProto"] = r["IPProto"]
            out.append(merged)
    return out


def has_per_node_grants(grants: list[CompiledGrant]) -> bool:
    return any(g.category != "regular" for g in grants)


def global_rules(grants: list[CompiledGrant]) -> list[dict[str, Any]]:
    return merge_rules([r for g in grants if g.category != "via" for r in g.rules])


def node_rules(grants: list[CompiledGrant], node: NodeInfo,
               res: Resolver) -> list[dict[str, Any]]:
    """A node's unreduced rules: the global ones plus its autogroup:self and via rules."""
    rules: list[dict[str, Any]] = []
    for g in grants:
        rules.extend(g.rules)
        if g.category == "self":
            rules.extend(self_rules(g, node, res))
        elif g.category == "via":
            rules.extend(via_rules(g, node))
    return merge_rules(rules)


def reduce_rules(node: NodeInfo, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep only what the node itself serves (Headscale's ReduceFilterRules)."""
    out = []
    for rule in rules:
        if rule.get("CapGrant"):
            reduced = reduce_cap_rule(node, rule)
            if reduced is not None:
                out.append(reduced)
            continue
        dests = []
        for dp in rule["DstPorts"]:
            s = parse_wire(dp["IP"])
            if s is None:
                continue
            if (
                s.contains_any(node.ips)
                or any(s.overlaps_prefix(r) for r in node.subnet_routes)
                or (node.is_exit and s.issubset(THE_INTERNET))
            ):
                dests.append(dp)
        if dests:
            r = dict(rule)
            r["DstPorts"] = dests
            out.append(r)
    return out


def reduce_cap_rule(node: NodeInfo, rule: dict[str, Any]) -> dict[str, Any] | None:
    grants = []
    for cg in rule["CapGrant"]:
        nets = [ipaddress.ip_network(d) for d in cg["Dsts"]]
        matching: list[IPNetwork] = []
        for net in nets:
            if net.num_addresses == 1:
                if net.network_address in node.ips:
                    matching.append(net)
            else:
                matching.extend(
                    ipaddress.ip_network(ip)
                    for ip in node.ips
                    if ip.version == net.version and ip in net
                )
        for net in nets:
            for r in node.subnet_routes:
                if net.version == r.version and net.overlaps(r):
                    matching.append(net)
        if matching:
            uniq = sorted(set(matching), key=lambda n: (n.version, n.network_address, n.prefixlen))
            grants.append({"Dsts": [str(n) for n in uniq], "CapMap": cg["CapMap"]})
    if not grants:
        return None
    return {"SrcIPs": rule["SrcIPs"], "CapGrant": grants}
